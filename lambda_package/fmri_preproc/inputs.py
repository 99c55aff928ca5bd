"""Checking and reading an input run: every bad input becomes an :class:`InputError`.

``check_input`` looks at the file and its NIfTI header only (no voxel data is read or
allocated), so a header claiming billions of voxels is rejected before any allocation.
``load_run`` then reads the data once, as float32 (nibabel applies ``scl_slope`` /
``scl_inter``), and wraps read failures (truncated or corrupt files) in ``InputError``.

Non-finite values (NaN / Inf): set to 0, as ``nilearn.image.smooth_img`` does, and their
count is recorded in the outputs' sidecar; a run where more than half of the values are
non-finite is rejected (there is nothing sensible left to process).
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

__all__ = ["InputError", "RunInfo", "check_input", "load_run", "MIN_VOLUMES"]

MIN_VOLUMES = 4  # motion, FD, DVARS and tSNR need a time series
MIN_SPATIAL = 4  # voxels per spatial axis, for registration
MAX_VOXELS = 500_000_000  # 2 GB as float32: beyond any Lambda-sized run
_GZIP_MAGIC = b"\x1f\x8b"


class InputError(ValueError):
    """A bad input file, with a student-readable message.

    Attributes
    ----------
    cause : str
        The likely cause.
    action : str
        What to do about it.
    """

    def __init__(self, message: str, *, cause: str, action: str):
        super().__init__(message)
        self.message = message
        self.cause = cause
        self.action = action

    def to_dict(self) -> dict:
        """``{"error", "cause", "action"}`` for an error record."""
        return {"error": self.message, "cause": self.cause, "action": self.action}

    def __str__(self) -> str:
        return f"{self.message} Likely cause: {self.cause} What to do: {self.action}"


@dataclass(frozen=True)
class RunInfo:
    """What the header says about a run (no data read)."""

    path: Path
    shape: tuple
    dtype: str
    affine: np.ndarray
    voxel_size_mm: tuple
    tr_s: float | None
    file_bytes: int

    @property
    def n_volumes(self) -> int:
        return int(self.shape[3])


def _bad(message, cause, action):
    return InputError(message, cause=cause, action=action)


def check_input(path, *, max_bytes: int | None = None, max_voxels: int = MAX_VOXELS) -> RunInfo:
    """Validate a run from its file and header, before reading any voxel data.

    Parameters
    ----------
    path : str or Path
        A 4D NIfTI-1/2 file, ``.nii`` or ``.nii.gz``.
    max_bytes : int, optional
        Largest accepted file size in bytes (no limit by default).
    max_voxels : int, optional
        Largest accepted number of values (x * y * z * t) claimed by the header.

    Returns
    -------
    info : RunInfo
        Shape, dtype, affine, voxel sizes (mm), TR (s, or None) and file size.

    Raises
    ------
    InputError
        Empty, too large, not gzip despite ``.gz``, not NIfTI, not 4D, too few volumes,
        too many voxels, complex or RGB data, or an unusable affine.
    """
    path = Path(path)
    name = path.name
    if not path.is_file():
        raise _bad(f"{name}: file not found.", "The path is wrong or the upload failed.",
                   "Check the file name and upload it again.")
    size = path.stat().st_size
    if size == 0:
        raise _bad(f"{name} is empty (0 bytes).", "The upload was interrupted or the file was "
                   "created without data.", "Upload the complete NIfTI file again.")
    if max_bytes is not None and size > max_bytes:
        raise _bad(f"{name} is {size / 1e6:.1f} MB, over the {max_bytes / 1e6:.1f} MB limit.",
                   "The run is larger than this function is configured to process.",
                   "Process a shorter or smaller run, or raise the size limit and the "
                   "function's memory.")
    if not (name.endswith(".nii.gz") or name.endswith(".nii")):
        raise _bad(f"{name} is not named .nii or .nii.gz.", "Only NIfTI files are processed.",
                   "Convert the run to NIfTI (e.g. with dcm2niix) and upload the .nii.gz.")
    with open(path, "rb") as f:
        magic = f.read(2)
    if name.endswith(".gz") and magic != _GZIP_MAGIC:
        raise _bad(f"{name} is named .nii.gz but is not gzip-compressed.",
                   "The file was renamed instead of compressed, or is not a NIfTI file.",
                   "Compress it with `gzip file.nii`, or rename it to .nii if it is NIfTI.")
    if not name.endswith(".gz") and magic == _GZIP_MAGIC:
        raise _bad(f"{name} is gzip-compressed but named .nii.",
                   "The .gz extension was dropped.", "Rename the file to .nii.gz.")
    try:
        img = nib.load(path)
        header = img.header
        shape = tuple(int(n) for n in img.shape)
        dtype = header.get_data_dtype()
        affine = np.asarray(img.affine, dtype=np.float64)
    except Exception as exc:  # nibabel raises many types for garbage (ImageFileError, ...)
        raise _bad(f"{name} could not be read as NIfTI ({type(exc).__name__}: {exc}).",
                   "The file is corrupt, truncated, or not a NIfTI image.",
                   "Check that the file opens in a viewer (e.g. `nib-ls`), then upload it "
                   "again.") from exc
    if len(shape) == 5 and shape[4] == 1:
        shape = shape[:4]
    if len(shape) != 4:
        raise _bad(f"{name} is a {len(shape)}D image {shape}; a 4D fMRI run is needed.",
                   "This looks like a single volume (e.g. an anatomical scan) or other data.",
                   "Upload the 4D BOLD run (x, y, z, time).")
    if shape[3] < MIN_VOLUMES:
        raise _bad(f"{name} has {shape[3]} volume(s); at least {MIN_VOLUMES} are needed.",
                   "The run is too short for motion correction and confounds.",
                   "Upload the complete BOLD run.")
    if min(shape[:3]) < MIN_SPATIAL:
        raise _bad(f"{name} has spatial shape {shape[:3]}; each axis needs {MIN_SPATIAL}+ voxels.",
                   "The image is not a brain volume.", "Upload the 4D BOLD run.")
    n_values = int(np.prod(shape, dtype=np.int64))
    if n_values > max_voxels:
        raise _bad(f"{name}: the header claims {shape} = {n_values:,} values "
                   f"(over {max_voxels:,}).",
                   "The header is corrupt, or the run is far larger than a Lambda can hold.",
                   "Check the file's header (`nib-ls`); split very long runs.")
    if dtype.kind == "c" or dtype.fields is not None or dtype.kind not in "biuf":
        raise _bad(f"{name} stores {dtype} values; real-valued intensities are needed.",
                   "Complex (raw MRI) or RGB (colour) data is not a magnitude BOLD image.",
                   "Export magnitude images from the scanner or converter.")
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise _bad(f"{name} has an unusable affine (voxel-to-world matrix).",
                   "The header's qform/sform is missing or corrupt.",
                   "Fix the header's orientation (e.g. re-convert with dcm2niix).")
    voxel_size = tuple(float(v) for v in np.sqrt(np.sum(affine[:3, :3] ** 2, axis=0)))
    zooms = header.get_zooms()
    tr = float(zooms[3]) if len(zooms) > 3 and zooms[3] > 0 else None
    return RunInfo(path, shape, str(dtype), affine, voxel_size, tr, size)


def _read_volumes(info: RunInfo) -> tuple[np.ndarray, int]:
    """Read the voxel data volume by volume into one float32 array (one copy of the run).

    Reading the whole file through nibabel would hold the raw bytes and the float32 array
    at once (about twice the run's size); streaming one volume at a time keeps the peak at
    the run's float32 size plus one volume. ``scl_slope`` / ``scl_inter`` are applied and
    non-finite values set to 0 as each volume arrives.
    """
    # the on-disk layout as nibabel's own reader sees it (the image's header copy has its
    # offset reset, the array proxy keeps the file's)
    proxy = nib.load(info.path).dataobj
    dtype = np.dtype(proxy.dtype)
    slope, inter = float(proxy.slope), float(proxy.inter)
    offset = int(proxy.offset)
    shape3, n_volumes = info.shape[:3], info.shape[3]
    vol_bytes = int(np.prod(shape3)) * dtype.itemsize
    data = np.empty(info.shape, dtype=np.float32, order="F")
    n_nonfinite = 0
    opener = gzip.open if info.path.name.endswith(".gz") else open
    with opener(info.path, "rb") as f:
        f.read(offset)  # header and extensions (a forward read: works for gzip streams)
        for t in range(n_volumes):
            raw = f.read(vol_bytes)
            if len(raw) != vol_bytes:
                raise EOFError(f"the file ends inside volume {t + 1} of {n_volumes}")
            vol = np.frombuffer(raw, dtype=dtype).reshape(shape3, order="F")
            out = data[..., t]
            out[...] = vol  # cast to float32
            if slope != 1.0:
                out *= np.float32(slope)
            if inter != 0.0:
                out += np.float32(inter)
            bad = ~np.isfinite(out)
            if bad.any():
                n_nonfinite += int(np.count_nonzero(bad))
                out[bad] = 0  # as nilearn does before smoothing; recorded in the sidecar
    return data, n_nonfinite


def load_run(path, *, max_bytes: int | None = None, max_voxels: int = MAX_VOXELS):
    """Check, then read a run as one float32 array.

    Parameters
    ----------
    path, max_bytes, max_voxels
        As for :func:`check_input`.

    Returns
    -------
    data : (X, Y, Z, T) ndarray of float32
        Scaled intensities (``scl_slope`` / ``scl_inter`` applied); non-finite values
        replaced by 0.
    info : RunInfo
        From :func:`check_input`.
    n_nonfinite : int
        How many values were NaN or infinite (and set to 0).

    Raises
    ------
    InputError
        As :func:`check_input`, plus truncated or corrupt data and mostly non-finite runs.
    """
    info = check_input(path, max_bytes=max_bytes, max_voxels=max_voxels)
    name = info.path.name
    try:
        data, n_nonfinite = _read_volumes(info)
    except MemoryError:
        raise
    except Exception as exc:
        raise _bad(f"{name} could not be read completely ({type(exc).__name__}: {exc}).",
                   "The file is truncated (an interrupted upload or copy) or corrupt.",
                   "Upload the complete file again.") from exc
    if n_nonfinite > 0.5 * data.size:
        raise _bad(f"{name}: {n_nonfinite:,} of {data.size:,} values are NaN or infinite.",
                   "The run was produced by a failed processing step.",
                   "Upload the original (unprocessed) BOLD run.")
    return data, info, n_nonfinite
