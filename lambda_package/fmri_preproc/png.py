"""PNG images from numpy arrays with zlib only (no matplotlib or Pillow in the Lambda).

A PNG is an 8-byte signature and chunks (length, type, data, CRC-32): ``IHDR`` (size,
8-bit depth, colour type 2 = RGB or 0 = grey), ``IDAT`` (the zlib-compressed scanlines,
each preceded by its filter type, 0 = none) and ``IEND``.

References
----------
.. [1] W3C (2003). Portable Network Graphics (PNG) Specification, Second Edition.
   https://www.w3.org/TR/png/
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np

__all__ = ["encode_png", "write_png"]

_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _chunk(kind: bytes, data: bytes) -> bytes:
    """One PNG chunk: length, type, data and the CRC-32 of type + data."""
    crc = zlib.crc32(data, zlib.crc32(kind)) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def encode_png(image: np.ndarray, *, level: int = 6) -> bytes:
    """The bytes of a PNG file holding an 8-bit grey (H, W) or RGB (H, W, 3) image.

    Parameters
    ----------
    image : (H, W) or (H, W, 3) array of uint8
        Row 0 is the top of the picture.
    level : int, optional
        zlib compression level (0-9).

    Returns
    -------
    png : bytes
    """
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError("image must be uint8")
    if image.ndim == 2:
        colour = 0
    elif image.ndim == 3 and image.shape[2] == 3:
        colour = 2
    else:
        raise ValueError("image must be (H, W) grey or (H, W, 3) RGB")
    height, width = image.shape[:2]
    if height == 0 or width == 0:
        raise ValueError("image must not be empty")
    rows = np.ascontiguousarray(image).reshape(height, -1)
    # every scanline starts with its filter type (0: none)
    raw = np.concatenate([np.zeros((height, 1), dtype=np.uint8), rows], axis=1)
    header = struct.pack(">IIBBBBB", width, height, 8, colour, 0, 0, 0)
    return (_SIGNATURE + _chunk(b"IHDR", header)
            + _chunk(b"IDAT", zlib.compress(raw.tobytes(), level)) + _chunk(b"IEND", b""))


def write_png(path, image: np.ndarray) -> Path:
    """Write :func:`encode_png` of ``image`` to ``path`` (plain write: the pipeline writes
    outputs under a temporary name and renames them when all are complete)."""
    path = Path(path)
    path.write_bytes(encode_png(image))
    return path
