"""Checking and reading an input run: every bad input becomes an :class:`InputError`.

``check_input`` looks at the file and its NIfTI header only (no voxel data is read or
allocated), so a header claiming billions of voxels is rejected before any allocation.
The data is then read forward once, volume by volume, as float32 (``scl_slope`` /
``scl_inter`` applied), and read failures (truncated or corrupt files) become
``InputError``:

- ``unpack_run`` writes it to a :class:`VolumeFile` on disk (what the engine uses: memory
  holds a few volumes whatever the run's length);
- ``load_run`` returns it as one array in memory (for notebooks and small runs).

Non-finite values (NaN / Inf): set to 0, as ``nilearn.image.smooth_img`` does, and their
count is recorded in the outputs' sidecar; a run where more than half of the values are
non-finite is rejected (there is nothing sensible left to process).
"""

from __future__ import annotations

import gzip
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

__all__ = ["InputError", "RunInfo", "VolumeFile", "VoxelSlabs", "check_input", "load_run",
           "unpack_run", "repetition_time", "MIN_VOLUMES", "MAX_TR_S"]

MIN_VOLUMES = 4  # motion, FD, DVARS and tSNR need a time series
MIN_SPATIAL = 4  # voxels per spatial axis, for registration
MAX_VOXELS = 500_000_000  # 2 GB as float32: beyond any Lambda-sized run
# Longest plausible TR (s): sparse-sampling designs reach 10-20 s; a "TR" of 100 or more is
# a value in milliseconds (720, 800, 2000) written where seconds belong.
MAX_TR_S = 100.0
_TIME_UNITS_S = {"msec": 1e-3, "usec": 1e-6}
TR_SOURCES = ("override", "sidecar", "header")  # in order of precedence
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
    # pixdim[4] in the header's declared time unit (seconds unless it says otherwise)
    unit = _TIME_UNITS_S.get(header.get_xyzt_units()[1], 1.0)
    tr = round(float(zooms[3]) * unit, 6) if len(zooms) > 3 and zooms[3] > 0 else None
    return RunInfo(path, shape, str(dtype), affine, voxel_size, tr, size)


def _volumes(info: RunInfo):
    """Yield each volume of the run as float32, in order, with its count of non-finite values.

    The file is read forward once, one volume at a time (a gzip stream cannot seek back):
    memory holds one volume whatever the run's length. ``scl_slope`` / ``scl_inter`` are
    applied and non-finite values set to 0.
    """
    # the on-disk layout as nibabel's own reader sees it (the image's header copy has its
    # offset reset, the array proxy keeps the file's)
    proxy = nib.load(info.path).dataobj
    dtype = np.dtype(proxy.dtype)
    slope, inter = float(proxy.slope), float(proxy.inter)
    offset = int(proxy.offset)
    shape3, n_volumes = info.shape[:3], info.shape[3]
    vol_bytes = int(np.prod(shape3)) * dtype.itemsize
    opener = gzip.open if info.path.name.endswith(".gz") else open
    with opener(info.path, "rb") as f:
        f.read(offset)  # header and extensions (a forward read: works for gzip streams)
        for t in range(n_volumes):
            raw = f.read(vol_bytes)
            if len(raw) != vol_bytes:
                raise EOFError(f"the file ends inside volume {t + 1} of {n_volumes}")
            out = np.frombuffer(raw, dtype=dtype).reshape(shape3, order="F").astype(
                np.float32, order="F")
            if slope != 1.0:
                out *= np.float32(slope)
            if inter != 0.0:
                out += np.float32(inter)
            bad = ~np.isfinite(out)
            n_bad = int(np.count_nonzero(bad))
            if n_bad:
                out[bad] = 0  # as nilearn does before smoothing; recorded in the sidecar
            yield out, n_bad


def _read_volumes(info: RunInfo) -> tuple[np.ndarray, int]:
    """Read the voxel data into one float32 array (one copy of the run, plus one volume)."""
    data = np.empty(info.shape, dtype=np.float32, order="F")
    n_nonfinite = 0
    for t, (vol, n_bad) in enumerate(_volumes(info)):
        data[..., t] = vol
        n_nonfinite += n_bad
    return data, n_nonfinite


class VolumeFile:
    """A 4D float32 run in a raw file on disk, read and written one volume at a time.

    It stands in for an ``(X, Y, Z, T)`` array wherever code reads ``data[..., t]`` (motion
    estimation, reslicing, smoothing, confounds): each access is one ``pread`` / ``pwrite``
    of a volume, so memory holds only the volumes in use, whatever the run's length.

    Why not ``numpy.memmap``: every page of a mapped file that has been touched counts in the
    process's resident memory (its high-water mark, VmHWM, and Lambda's "Max Memory Used")
    until the kernel needs it back, so a pass over a mapped 2 GB run looks like 2 GB of
    memory. Explicit reads leave the bytes in the page cache, which the kernel reclaims.

    Parameters
    ----------
    path : Path
        The raw file (volumes in order, each in Fortran order: the NIfTI layout).
    shape : (X, Y, Z, T) tuple
    """

    dtype = np.dtype(np.float32)
    ndim = 4

    def __init__(self, path: Path, shape: tuple):
        self.path = Path(path)
        self.shape = tuple(int(n) for n in shape)
        self.n_voxels = int(np.prod(self.shape[:3]))
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)

    @property
    def size(self) -> int:
        return self.n_voxels * self.shape[3]

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    def _volume_index(self, index) -> int:
        """``t`` of ``data[..., t]`` (or ``data[:, :, :, t]``); anything else is refused
        (``data[0]`` would mean an x-slice to numpy)."""
        if not (isinstance(index, tuple) and len(index) in (2, 4) and all(
                i is Ellipsis or i == slice(None) for i in index[:-1])):
            raise TypeError("a VolumeFile is read one volume at a time: data[..., t]")
        index = index[-1]
        if not isinstance(index, (int, np.integer)) or isinstance(index, bool):
            raise TypeError("a VolumeFile is read one volume at a time: data[..., t]")
        t = int(index) + (self.shape[3] if index < 0 else 0)
        if not 0 <= t < self.shape[3]:
            raise IndexError(f"volume {index} of a run of {self.shape[3]}")
        return t

    def __getitem__(self, index) -> np.ndarray:
        t = self._volume_index(index)
        return self.read_voxels(0, self.n_voxels, t).reshape(self.shape[:3], order="F")

    def __setitem__(self, index, volume) -> None:
        t = self._volume_index(index)
        volume = np.asarray(volume, dtype=np.float32)
        if volume.shape != self.shape[:3]:
            raise ValueError(f"a volume of shape {self.shape[:3]} is needed, not {volume.shape}")
        os.pwrite(self._fd, volume.tobytes(order="F"), t * self.n_voxels * 4)

    def read_voxels(self, start: int, stop: int, t: int) -> np.ndarray:
        """Voxels ``start:stop`` (flat, Fortran order) of volume ``t``, as float32."""
        n_bytes = (stop - start) * 4
        raw = os.pread(self._fd, n_bytes, (t * self.n_voxels + start) * 4)
        if len(raw) != n_bytes:
            raise EOFError(f"{self.path.name} ends inside volume {t + 1}")
        return np.frombuffer(raw, dtype=np.float32).copy()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> "VolumeFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def unpack_run(info: RunInfo, work_dir) -> tuple[VolumeFile, int]:
    """Decompress a checked run into a float32 :class:`VolumeFile` in ``work_dir``.

    Parameters
    ----------
    info : RunInfo
        From :func:`check_input`.
    work_dir : str or Path
        Scratch folder with room for the run as float32 (``X*Y*Z*T*4`` bytes); in the
        function, ``/tmp``. The file is removed when the :class:`VolumeFile` is deleted by
        the caller (``os.unlink(store.path)``).

    Returns
    -------
    store : VolumeFile
        Scaled intensities (``scl_slope`` / ``scl_inter`` applied), non-finite values 0.
    n_nonfinite : int

    Raises
    ------
    InputError
        Truncated or corrupt data, or a mostly non-finite run (the scratch file is removed).
    """
    fd, path = tempfile.mkstemp(prefix=".run-", suffix=".f32", dir=work_dir)
    os.close(fd)
    store = VolumeFile(Path(path), info.shape)
    try:
        n_nonfinite = _fill(store, info)
    except BaseException:
        store.close()
        os.unlink(path)
        raise
    return store, n_nonfinite


def _fill(store: VolumeFile, info: RunInfo) -> int:
    """Write the run's volumes into ``store``; return the count of non-finite values."""
    name, n_nonfinite = info.path.name, 0
    volumes = _volumes(info)
    for t in range(info.n_volumes):
        try:
            vol, n_bad = next(volumes)
        except MemoryError:
            raise
        except Exception as exc:  # truncated gzip, bad CRC, short file: the input's fault
            raise _unreadable(name, exc) from exc
        store[..., t] = vol  # a full disk raises OSError(ENOSPC) itself: not the input's fault
        n_nonfinite += n_bad
    if n_nonfinite > 0.5 * store.size:
        raise _mostly_nonfinite(name, n_nonfinite, store.size)
    return n_nonfinite


def _unreadable(name: str, exc: Exception) -> InputError:
    return _bad(f"{name} could not be read completely ({type(exc).__name__}: {exc}).",
                "The file is truncated (an interrupted upload or copy) or corrupt.",
                "Upload the complete file again.")


def _mostly_nonfinite(name: str, n_nonfinite: int, size: int) -> InputError:
    return _bad(f"{name}: {n_nonfinite:,} of {size:,} values are NaN or infinite.",
                "The run was produced by a failed processing step.",
                "Upload the original (unprocessed) BOLD run.")


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
        raise _unreadable(name, exc) from exc
    if n_nonfinite > 0.5 * data.size:
        raise _mostly_nonfinite(name, n_nonfinite, data.size)
    return data, info, n_nonfinite


class VoxelSlabs:
    """A :class:`VolumeFile` seen as ``(k, 1, n, T)``, for code that reads z-slabs of time series.

    ``dvars`` and ``tsnr`` (:mod:`fmri_preproc.confounds`) read ``data[:, :, z0:z0 + 4]``
    (every volume of a few slices) and reduce over voxels with sums, means and medians, which
    do not depend on where a voxel sits. Presenting the voxels, in file order, as ``k`` per
    "slice" makes each slab ``4 k`` voxels by ``T`` volumes; ``k`` is chosen so that a slab
    holds about ``budget`` values whatever ``T`` is, which keeps that pass's memory flat in
    the run's length. Voxels past the end of the run are 0 and outside :meth:`mask`.

    Parameters
    ----------
    store : VolumeFile
    budget : int, optional
        Values per 4-slice slab (2**21: 8 MB as float32).
    """

    ndim = 4
    dtype = np.dtype(np.float32)

    def __init__(self, store: VolumeFile, budget: int = 2**21):
        n_t = store.shape[3]
        self.store = store
        self.k = max(1, min(store.n_voxels, budget // (4 * n_t)))
        self.shape = (self.k, 1, -(-store.n_voxels // self.k), n_t)

    def mask(self, mask: np.ndarray) -> np.ndarray:
        """A spatial mask of the run, laid out as this view's ``(k, 1, n)`` grid."""
        flat = np.zeros(self.k * self.shape[2], dtype=bool)
        flat[:self.store.n_voxels] = np.asarray(mask, dtype=bool).ravel(order="F")
        return flat.reshape(self.shape[:3], order="F")

    def __getitem__(self, index) -> np.ndarray:
        if not (isinstance(index, tuple) and len(index) == 3 and index[0] == slice(None)
                and index[1] == slice(None) and isinstance(index[2], slice)):
            raise TypeError("VoxelSlabs reads slabs only: data[:, :, z0:z1]")
        z0, z1, _ = index[2].indices(self.shape[2])
        start, stop = z0 * self.k, min(z1 * self.k, self.store.n_voxels)
        out = np.zeros((self.k * (z1 - z0), self.shape[3]), dtype=np.float32, order="F")
        for t in range(self.shape[3]):
            out[:stop - start, t] = self.store.read_voxels(start, stop, t)
        return out.reshape((self.k, 1, z1 - z0, self.shape[3]), order="F")


def repetition_time(info: RunInfo, sidecar: dict | None = None,
                    override: float | None = None) -> tuple[float, dict]:
    """The run's TR in seconds, and where it came from: override, then sidecar, then header.

    Parameters
    ----------
    info : RunInfo
        From :func:`check_input` (the header's TR, in its declared unit, as seconds).
    sidecar : dict, optional
        The run's BIDS sidecar (``RepetitionTime`` in seconds, by the BIDS standard).
    override : float, optional
        A TR in seconds stated by the user (for files whose TR is known to be wrong).

    Returns
    -------
    tr_s : float
    record : dict
        ``{"Source": "override" | "sidecar" | "header", "Header": s, "Sidecar": s,
        "Override": s}`` (the values present) and ``"Note"`` when the header and the value
        used disagree by more than 1 %: written into the output sidecar.

    Raises
    ------
    InputError
        No TR anywhere, or the chosen one is not a number, <= 0, NaN, or looks like
        milliseconds (>= ``MAX_TR_S``).
    """
    name = info.path.name
    values = {"override": override, "sidecar": (sidecar or {}).get("RepetitionTime"),
              "header": info.tr_s}
    present = {k: v for k, v in values.items() if v is not None}
    if not present:
        raise _bad(f"{name}: no repetition time (TR): the header's is 0 and there is no sidecar "
                   "RepetitionTime.", "The converter did not record the TR.",
                   "Add the run's JSON sidecar with RepetitionTime in seconds (e.g. 2.0).")
    source = next(k for k in TR_SOURCES if k in present)
    tr_s = _checked_tr(name, source, present[source])
    record = {"Source": source, **{k.title(): v for k, v in present.items()}}
    header = info.tr_s
    if source != "header" and header is not None and abs(header - tr_s) > 0.01 * tr_s:
        record["Note"] = (f"The header says {header:g} s; the {source}'s {tr_s:g} s was used.")
    return tr_s, record


_TR_FIX = {"override": "Set the TR override in seconds (e.g. 2.0).",
           "sidecar": "Fix RepetitionTime in the run's JSON sidecar: seconds, e.g. 2.0.",
           "header": "Add a JSON sidecar with RepetitionTime in seconds (BIDS), or fix the "
                     "header's pixdim[4]."}


def _checked_tr(name: str, source: str, value) -> float:
    """``value`` as a TR in seconds, or an :class:`InputError` saying what is wrong."""
    try:
        tr_s = float(value)
    except (TypeError, ValueError):
        tr_s = float("nan")
    if not np.isfinite(tr_s) or tr_s <= 0:
        raise _bad(f"{name}: the {source} gives a repetition time of {value!r}; a TR must be a "
                   "positive number of seconds.", "The TR was not recorded, or recorded wrongly.",
                   _TR_FIX[source])
    if tr_s >= MAX_TR_S:
        raise _bad(f"{name}: the {source} gives a repetition time of {tr_s:g} s, which looks like "
                   "milliseconds.", f"The {source} stores the TR in ms where seconds belong "
                   "(some converters do).", _TR_FIX[source])
    return tr_s
