"""What a run needs (memory, /tmp, time), from its header alone, and whether a function fits.

The engine's memory is flat in the run's length (:mod:`fmri_preproc.pipeline`): a fixed
part (the interpreter, numpy, nibabel, boto3 in the function, the MNI template and its
sampling weights, the confounds passes' bounded slabs, aCompCor's T x T matrix) plus a cost
per voxel of *one volume* (the motion estimator's images and gradients, a few volumes in
flight). Disk and time grow with the number of voxel-volumes, of the run and of its copy
in MNI space (nilearn's 2 mm grid, whatever the run's size).
The constants below were measured with ``bench/bench_scale.py`` (``bench/RESULTS_scale.md``),
which prints the model beside its measurements; re-measure them when the engine changes.

Lambda gives CPU in proportion to memory: one vCPU at 1,769 MB, and the engine uses one
(it works volume by volume, one BLAS thread), so memory above 1,769 MB buys no speed.

References
----------
Lambda memory and CPU: https://docs.aws.amazon.com/lambda/latest/dg/configuration-memory.html
Lambda quotas (timeout 900 s, memory 128-10,240 MB, /tmp 512-10,240 MB):
https://docs.aws.amazon.com/lambda/latest/dg/gettingstarted-limits.html
"""
from __future__ import annotations

import io
import math
import zlib
from dataclasses import dataclass

import nibabel as nib
import numpy as np

from .inputs import InputError

__all__ = ["RunShape", "Needs", "RunTooLarge", "needs", "check_fits", "shape_from_header_bytes",
           "largest_run", "LAMBDA_MB_PER_VCPU", "LAMBDA_MAX_TIMEOUT_S", "LAMBDA_MAX_MEMORY_MB",
           "LAMBDA_MAX_EPHEMERAL_MB", "HEADER_BYTES"]

# Lambda's limits
LAMBDA_MB_PER_VCPU = 1769       # one full vCPU at this memory size
LAMBDA_MAX_TIMEOUT_S = 900      # 15 minutes
LAMBDA_MIN_MEMORY_MB = 128
LAMBDA_MAX_MEMORY_MB = 10240
LAMBDA_MIN_EPHEMERAL_MB = 512
LAMBDA_MAX_EPHEMERAL_MB = 10240

# The engine, measured (bench/bench_scale.py; 64^3-ish to 128x128x64 grids, 16-600 volumes)
BASE_MB = 110.0                 # interpreter + numpy + nibabel + boto3 + template + buffers
BYTES_PER_VOXEL = 85.0          # per voxel of one volume (motion estimation's working set)
SECONDS_PER_MVV = 0.35          # s per million voxel-volumes on one vCPU, whole command
MNI_VOXELS = 99 * 117 * 95      # the MNI series' grid (normalize.Template.grid_shape)
MNI_COMPRESSED_RATIO = 0.3      # its RLE gzip: three quarters of the grid is 0 (measured 0.25)
MNI_SECONDS_PER_MVV = 0.03      # resampling into that grid, per million template voxel-volumes
S3_MB_PER_S = 60.0              # download + upload in the same region, conservative
FIXED_S = 5.0                   # start, small files, marker
MARGIN = 1.25                   # on every estimate: another machine, another run
COMPRESSED_RATIO = 1.0          # float32 outputs: Huffman-only gzip keeps ~94 % of the size

#: Enough of a .nii.gz's start for the header and usual extensions.
HEADER_BYTES = 64 * 1024


@dataclass(frozen=True)
class RunShape:
    """A run's size as its header states it."""

    shape: tuple          # (X, Y, Z)
    n_volumes: int
    itemsize: int = 2     # bytes per stored value (int16: 2)

    @property
    def n_voxels(self) -> int:
        return int(np.prod(self.shape))

    @property
    def float32_bytes(self) -> int:
        return self.n_voxels * self.n_volumes * 4

    @property
    def stored_bytes(self) -> int:
        return self.n_voxels * self.n_volumes * self.itemsize

    def __str__(self) -> str:
        return "x".join(map(str, (*self.shape, self.n_volumes)))


@dataclass(frozen=True)
class Needs:
    """What a run needs: peak ``memory_mb``, ``tmp_mb`` of /tmp, ``seconds`` at ``at_memory_mb``."""

    memory_mb: float
    tmp_mb: float
    seconds: float
    at_memory_mb: int


def cpu_share(memory_mb: float) -> float:
    """The vCPUs the engine can use at this memory size (Lambda: memory / 1,769, at most 1)."""
    return min(1.0, memory_mb / LAMBDA_MB_PER_VCPU)


def needs(run: RunShape, *, memory_mb: int = LAMBDA_MB_PER_VCPU, input_bytes: int | None = None,
          smoothed: bool = True, normalised: bool = True,
          seconds_per_mvv: float = SECONDS_PER_MVV) -> Needs:
    """Memory, /tmp and time a run needs in the function, with a margin (``MARGIN``).

    Parameters
    ----------
    run : RunShape
    memory_mb : int, optional
        The function's memory size, which sets its CPU (and so the time).
    input_bytes : int, optional
        The uploaded file's size (compressed); default: the stored size (no compression).
    smoothed : bool, optional
        Whether a smoothed series is written too (FWHM > 0).
    normalised : bool, optional
        Whether the run is also written in MNI space (every run whose field of view can
        hold a brain; counting it for a smaller one only over-estimates).
    seconds_per_mvv : float, optional
        Engine time per million voxel-volumes on one vCPU.

    Returns
    -------
    Needs
        ``tmp_mb``: the download, the run as float32 (the engine's scratch file) and the
        outputs (one or two float32 series, gzip barely shrinks them, and the MNI series).
    """
    mb = 2.0**20
    input_bytes = run.stored_bytes if input_bytes is None else input_bytes
    series = 2 if smoothed else 1
    voxel_volumes = run.n_voxels * run.n_volumes
    mni_bytes = MNI_VOXELS * run.n_volumes * 4 * MNI_COMPRESSED_RATIO if normalised else 0
    memory = BASE_MB + BYTES_PER_VOXEL * run.n_voxels / mb
    outputs = series * run.float32_bytes * COMPRESSED_RATIO + mni_bytes
    tmp = (input_bytes + run.float32_bytes + outputs) / mb + 8
    transfer = (input_bytes + outputs) / mb / S3_MB_PER_S
    mni_s = MNI_SECONDS_PER_MVV * MNI_VOXELS * run.n_volumes / 1e6 if normalised else 0.0
    compute = (seconds_per_mvv * voxel_volumes / 1e6 + mni_s) / cpu_share(memory_mb)
    return Needs(memory * MARGIN, tmp * MARGIN, (FIXED_S + transfer + compute) * MARGIN,
                 memory_mb)


class RunTooLarge(InputError):
    """A run that the function, as configured, cannot process; says which setting fixes it.

    Attributes
    ----------
    limit : str
        The Lambda setting to change: ``"MemorySize"``, ``"EphemeralStorage"`` or
        ``"Timeout"``.
    """

    def __init__(self, message: str, *, cause: str, action: str, limit: str):
        super().__init__(message, cause=cause, action=action)
        self.limit = limit


def check_fits(run: RunShape, *, name: str, memory_mb: int, tmp_free_mb: float,
               remaining_s: float, input_bytes: int | None = None,
               smoothed: bool = True) -> Needs:
    """Raise :class:`RunTooLarge` if the run does not fit the function; else return its needs.

    Parameters
    ----------
    run : RunShape
        From the header (:func:`shape_from_header_bytes`), before any data is read.
    name : str
        The run's file name, for the message.
    memory_mb : int
        The function's ``MemorySize`` (``AWS_LAMBDA_FUNCTION_MEMORY_SIZE``).
    tmp_free_mb : float
        Free space in /tmp now.
    remaining_s : float
        Time left in this invocation (``context.get_remaining_time_in_millis() / 1000``).
    """
    need = needs(run, memory_mb=memory_mb, input_bytes=input_bytes, smoothed=smoothed)
    what = (f"{name}: the header claims a run of {run} ({run.float32_bytes / 2**20:,.0f} MB "
            "as float32), which")
    fix = "Size the function for your largest run (FunctionSpec.sized_for, notebook 02) and " \
          "upload the run again (the estimate has a margin: size_check=False skips it)"
    if need.memory_mb > memory_mb:
        raise RunTooLarge(
            f"{what} needs about {need.memory_mb:,.0f} MB of memory; this function has "
            f"{memory_mb:,} MB (MemorySize).",
            cause="Its volumes are larger than the function's memory is sized for.",
            action=f"Raise MemorySize to at least {_round_up(need.memory_mb, 64):,} MB. {fix}.",
            limit="MemorySize")
    if need.tmp_mb > tmp_free_mb:
        raise RunTooLarge(
            f"{what} needs about {need.tmp_mb:,.0f} MB in /tmp; this function has "
            f"{tmp_free_mb:,.0f} MB free (EphemeralStorage).",
            cause="The run as float32 plus its outputs do not fit in the function's /tmp.",
            action=_tmp_action(need.tmp_mb, fix), limit="EphemeralStorage")
    if need.seconds > remaining_s:
        raise RunTooLarge(
            f"{what} needs about {need.seconds:,.0f} s at {memory_mb:,} MB "
            f"({cpu_share(memory_mb):.2f} vCPU); this invocation has {remaining_s:,.0f} s "
            "(Timeout).", cause="The run is longer than the function's timeout allows.",
            action=_time_action(run, need, memory_mb, fix, input_bytes, smoothed),
            limit="Timeout")
    return need


def _tmp_action(tmp_mb: float, fix: str) -> str:
    if tmp_mb > LAMBDA_MAX_EPHEMERAL_MB:
        return (f"Lambda's /tmp holds at most {LAMBDA_MAX_EPHEMERAL_MB:,} MB: split the run "
                "into shorter runs.")
    return f"Raise EphemeralStorage to at least {_round_up(tmp_mb, 512):,} MB. {fix}."


def _time_action(run, need, memory_mb, fix, input_bytes, smoothed) -> str:
    fastest = needs(run, memory_mb=LAMBDA_MB_PER_VCPU, input_bytes=input_bytes,
                    smoothed=smoothed)
    if fastest.seconds > LAMBDA_MAX_TIMEOUT_S:
        return (f"Even at {LAMBDA_MB_PER_VCPU:,} MB (one vCPU) it needs about "
                f"{fastest.seconds:,.0f} s, over Lambda's {LAMBDA_MAX_TIMEOUT_S} s: split the "
                "run into shorter runs.")
    if need.seconds <= LAMBDA_MAX_TIMEOUT_S:
        return f"Raise Timeout to at least {_round_up(need.seconds, 30):,} s. {fix}."
    return (f"Raise MemorySize to {LAMBDA_MB_PER_VCPU:,} MB (one vCPU: about "
            f"{fastest.seconds:,.0f} s) and Timeout to at least "
            f"{_round_up(fastest.seconds, 30):,} s. {fix}.")


def _round_up(value: float, step: int) -> int:
    return int(math.ceil(value / step) * step)


def shape_from_header_bytes(start: bytes) -> RunShape:
    """The run's shape from the first bytes of its file (``.nii`` or ``.nii.gz``).

    Parameters
    ----------
    start : bytes
        The file's first bytes (``HEADER_BYTES`` is plenty): a gzip stream may be cut off.

    Raises
    ------
    ValueError
        If the bytes hold no NIfTI-1/2 header of a 4D image.
    """
    raw = start
    if start[:2] == b"\x1f\x8b":  # a partial gzip stream: decompress what there is
        try:
            raw = zlib.decompressobj(wbits=31).decompress(start)
        except zlib.error as exc:
            raise ValueError(f"not a gzip stream ({exc})") from exc
    kind = nib.Nifti2Header if int.from_bytes(raw[:4], "little") == 540 or \
        int.from_bytes(raw[:4], "big") == 540 else nib.Nifti1Header
    header = kind.from_fileobj(io.BytesIO(raw), check=False)
    if not bytes(header["magic"].item()).startswith((b"n+", b"ni")):
        raise ValueError("no NIfTI magic: not a NIfTI header")
    shape = tuple(int(n) for n in header.get_data_shape())
    if len(shape) == 5 and shape[4] == 1:
        shape = shape[:4]
    if len(shape) != 4:
        raise ValueError(f"not a 4D image (shape {shape})")
    return RunShape(shape[:3], shape[3], int(header.get_data_dtype().itemsize))


def largest_run(shape, memory_mb: int, *, timeout_s: float = LAMBDA_MAX_TIMEOUT_S,
                ephemeral_mb: int = LAMBDA_MAX_EPHEMERAL_MB, itemsize: int = 2,
                compressed_ratio: float = 0.5, smoothed: bool = True,
                seconds_per_mvv: float = SECONDS_PER_MVV) -> int:
    """The most volumes of grid ``shape`` one invocation can process (0: none fits).

    ``compressed_ratio``: the upload's size over its stored size (int16 EPI: about 0.5).
    """
    def fits(n: int) -> bool:
        run = RunShape(tuple(shape), n, itemsize)
        need = needs(run, memory_mb=memory_mb, input_bytes=int(run.stored_bytes *
                     compressed_ratio), smoothed=smoothed, seconds_per_mvv=seconds_per_mvv)
        return (need.memory_mb <= memory_mb and need.tmp_mb <= ephemeral_mb
                and need.seconds <= timeout_s)

    if not fits(1):
        return 0
    low, high = 1, 2
    while fits(high) and high < 10**7:
        low, high = high, high * 2
    while high - low > 1:  # fits(low), not fits(high)
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low
