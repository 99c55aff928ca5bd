"""The whole preprocessing of one run: read, correct motion, smooth, confounds, write.

Memory: one float32 copy of the run is held (read volume by volume straight into it);
motion is estimated from it, each volume is resliced back into its own slot, confounds are
computed in slabs of slices, and smoothing runs volume by volume in place. Peak RSS
(``bench/run_bench.py``, see ``bench/RESULTS.md``) is the run's float32 size plus about
80-110 MB (interpreter, numpy, nibabel, gzip and per-volume buffers):

- default run, 64 x 64 x 32 x 150 (79 MB as float32): about 160 MB -> MemorySize 256;
- twice as long, 64 x 64 x 32 x 300 (157 MB): about 265 MB -> MemorySize 384 or more.

Outputs (BIDS derivatives, fMRIPrep names) appear complete or not at all: each is written
to a hidden temporary name in the output directory and renamed with ``os.replace``.
"""

from __future__ import annotations

import gzip
import json
import os
import platform
import resource
import sys
import time
import uuid
import zlib
from contextlib import contextmanager
from pathlib import Path

import nibabel as nib
import numpy as np

from . import __version__
from .confounds import (brain_mask, confounds_metadata, confounds_table, dvars, non_steady_state,
                        tsnr, write_tsv)
from .contract import (FRAMEWISE_DISPLACEMENT, MOTION_OUTLIER, PreprocResult, Run, Sidecar,
                       run_from_key)
from .inputs import InputError, load_run
from .motion import estimate_motion, reference_index, reslice_volume
from .smoothing import smooth
from .transforms import affine_to_params

__all__ = ["preprocess", "peak_memory_mb"]


def peak_memory_mb() -> float:
    """Peak resident memory of this process so far, in MB.

    Linux: the kernel's high-water mark of this program (VmHWM). ``getrusage`` would also
    count the memory of a large parent copied at fork, before this program started.
    Elsewhere: ``getrusage`` (KiB on Linux, bytes on macOS).
    """
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status
                        if line.startswith("VmHWM:")) / 1024.0
    except (OSError, StopIteration):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 1024.0 if sys.platform != "darwin" else peak / 1024.0**2


def preprocess(
    in_file,
    out_dir,
    *,
    fwhm: float = 6.0,
    reference="middle",
    max_bytes: int | None = None,
) -> PreprocResult:
    """Preprocess one BOLD run: motion correction, smoothing, confounds.

    Parameters
    ----------
    in_file : str or Path
        4D NIfTI run (``.nii`` or ``.nii.gz``) with a BIDS-style name
        (``sub-01_task-rest_bold.nii.gz``); never modified.
    out_dir : str or Path
        Output directory (created if needed); outputs are written flat, with the names of
        :data:`fmri_preproc.contract.OUTPUTS`.
    fwhm : float, optional
        Smoothing FWHM in mm (6 mm by default); 0 for none (no smoothed series then).
    reference : {"middle", "first"} or int, optional
        Motion-correction reference volume (``T // 2`` by default).
    max_bytes : int, optional
        Reject input files larger than this many bytes.

    Returns
    -------
    PreprocResult
        ``outputs``: kind -> path, for ``preproc_bold`` (realigned, unsmoothed) and its
        ``preproc_json``, ``smoothed_bold`` and ``smoothed_json`` (when ``fwhm > 0``),
        ``boldref`` (the reference volume), ``brain_mask``, ``confounds`` and
        ``confounds_json``. ``summary``: ``n_volumes``, ``reference_volume``,
        ``max_fd_mm``, ``mean_fd_mm``, ``mean_tsnr`` (median over the brain mask, after
        motion correction, before smoothing), ``n_motion_outliers``,
        ``n_non_steady_state``, ``n_nonfinite``, ``peak_memory_mb``, ``duration_s``.

    Raises
    ------
    InputError
        For bad inputs (see :func:`fmri_preproc.check_input`); nothing is written then.

    Notes
    -----
    Motion parameters are in the convention of :func:`fmri_preproc.params_to_affine`;
    each volume is resliced once (trilinear) onto the reference volume's grid.
    """
    start = time.perf_counter()
    timings = {}
    if not np.isfinite(fwhm) or fwhm < 0:
        raise ValueError("fwhm must be a finite number >= 0 (mm)")
    out_dir = Path(out_dir)
    run = _run_of(in_file)

    tic = time.perf_counter()
    data, info, n_nonfinite = load_run(in_file, max_bytes=max_bytes)
    affine = info.affine
    shape = info.shape[:3]
    n_volumes = info.n_volumes
    ref = reference_index(reference, n_volumes)
    if not np.ptp(data[..., ref]) > 0:
        raise InputError(f"{Path(in_file).name}: the reference volume is constant (no image).",
                         cause="The run holds no signal (all values equal, e.g. all zero).",
                         action="Upload the original BOLD run.")
    timings["read_s"] = time.perf_counter() - tic

    tic = time.perf_counter()
    try:
        matrices = estimate_motion(data, affine, reference=ref)
    except ValueError as exc:  # e.g. a reference with too little structure to register
        raise InputError(f"{Path(in_file).name}: motion correction failed ({exc}).",
                         cause="The run has too little image structure (not a brain EPI run?).",
                         action="Check the run in a viewer and upload the BOLD run.") from exc
    # --- motion plausibility (block owned by the motion work; keep it whole at merge) ---
    from .plausibility import check_motion  # raises InputError for diverged estimates
    motion_warnings = check_motion(data, affine, matrices, ref, name=Path(in_file).name)
    # integrator: put motion_warnings into summary["warnings"] (-> _done.json, sidecar)
    # --- end motion plausibility ---
    params = np.array([affine_to_params(m, affine, shape) for m in matrices])
    timings["estimate_motion_s"] = time.perf_counter() - tic

    tic = time.perf_counter()
    for t in range(n_volumes):  # reslice each volume once, back into its own slot
        if t != ref:
            data[..., t] = reslice_volume(data[..., t], affine, matrices[t])
    timings["reslice_s"] = time.perf_counter() - tic

    tic = time.perf_counter()
    boldref = data[..., ref].copy()
    mask = brain_mask(boldref)
    dvars_values, std_dvars = dvars(data, mask)
    global_signal = np.array([data[..., t][mask].mean() for t in range(n_volumes)])
    n_non_steady = non_steady_state(global_signal)
    columns = confounds_table(params, dvars_values, std_dvars, n_non_steady=n_non_steady)
    steady = data[..., n_non_steady:]  # a view: no copy
    mean_tsnr = tsnr(steady, mask) if steady.shape[3] > 1 else float("nan")
    timings["confounds_s"] = time.perf_counter() - tic

    fd = columns[FRAMEWISE_DISPLACEMENT]
    summary = {
        "n_volumes": n_volumes,
        "reference_volume": ref,
        "max_fd_mm": float(np.nanmax(fd)) if n_volumes > 1 else 0.0,
        "mean_fd_mm": float(np.nanmean(fd)) if n_volumes > 1 else 0.0,
        "mean_tsnr": mean_tsnr,
        "n_motion_outliers": sum(c.startswith(MOTION_OUTLIER) for c in columns),
        "n_non_steady_state": n_non_steady,
        "n_nonfinite": n_nonfinite,
        "warnings": motion_warnings,
    }

    out_dir.mkdir(parents=True, exist_ok=True)
    outputs = {kind: out_dir / run.filename(kind) for kind in _kinds(fwhm)}
    with _visible_when_complete(outputs) as tmp:
        tic = time.perf_counter()
        header = _float_header(info.path)
        _write_nifti_gz(_image(data, affine, header, "motion corrected"), tmp["preproc_bold"])
        _write_nifti_gz(_image(boldref, affine, header, "motion reference volume"),
                        tmp["boldref"])
        mask_header = header.copy()
        mask_header.set_data_dtype(np.uint8)
        _write_nifti_gz(_image(mask.astype(np.uint8), affine, mask_header, "brain mask"),
                        tmp["brain_mask"])
        write_tsv(tmp["confounds"], columns)
        _write_json(tmp["confounds_json"], confounds_metadata(columns))
        timings["write_s"] = time.perf_counter() - tic
        if fwhm > 0:
            tic = time.perf_counter()
            smooth(data, affine, fwhm, out=data)  # in place, volume by volume
            _write_nifti_gz(_image(data, affine, header, f"motion corrected, smoothed "
                                   f"{fwhm:g} mm"), tmp["smoothed_bold"])
            timings["smooth_s"] = time.perf_counter() - tic
        del data
        summary["duration_s"] = time.perf_counter() - start
        summary["peak_memory_mb"] = peak_memory_mb()
        sidecar = _sidecar(info, 0.0, ref, n_nonfinite, timings, summary)
        _write_json(tmp["preproc_json"], sidecar)
        if fwhm > 0:
            _write_json(tmp["smoothed_json"], {**sidecar, Sidecar.SMOOTHING_FWHM: fwhm})
    return PreprocResult(run=run, outputs=outputs, summary=summary)


def _run_of(in_file) -> Run:
    """The run named by the input file (BIDS-style names only)."""
    try:
        return run_from_key(Path(in_file).name)
    except ValueError as exc:
        raise InputError(f"{Path(in_file).name} is not named like a BIDS BOLD run.",
                         cause="Outputs are named from the input's BIDS entities.",
                         action="Rename it, e.g. sub-01_task-rest_bold.nii.gz.") from exc


def _kinds(fwhm: float) -> list[str]:
    """The outputs written for a run, in the order they are made visible."""
    kinds = ["preproc_bold", "boldref", "brain_mask", "confounds", "confounds_json"]
    if fwhm > 0:
        kinds += ["smoothed_bold", "smoothed_json"]
    return kinds + ["preproc_json"]


@contextmanager
def _visible_when_complete(outputs: dict):
    """Yield hidden temporary paths; once all are written, rename them into place.

    Each output appears complete or not at all (``os.replace``), and all of them only after
    every one was written; on an error none appears and the temporaries are removed.
    """
    tmp = {k: p.with_name(f".{uuid.uuid4().hex[:12]}.tmp{''.join(p.suffixes)}")
           for k, p in outputs.items()}
    try:
        yield tmp
        for kind in outputs:  # insertion order: the preproc sidecar last
            os.replace(tmp[kind], outputs[kind])
    finally:
        for path in tmp.values():
            if path.exists():
                path.unlink()


def _float_header(path):
    """The input's header (orientation, TR, units), set for float32 output, unscaled."""
    header = nib.load(path).header.copy()  # header only: no data read
    header.set_data_dtype(np.float32)
    header.set_slope_inter(1.0, 0.0)
    return header


def _image(data, affine, header, description: str):
    """A NIfTI image of ``data`` with the run's header (NIfTI-1 or -2 as the input)."""
    kind = nib.Nifti1Image if isinstance(header, nib.Nifti1Header) else nib.Nifti2Image
    img = kind(data, affine, header=header)
    img.header.set_slope_inter(1.0, 0.0)
    img.header["descrip"] = f"fmri_preproc: {description}"[:79].encode()
    if data.ndim == 3:
        img.header.set_xyzt_units(*header.get_xyzt_units())
    return img


def _write_json(path, document: dict) -> None:
    Path(path).write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")


def _write_nifti_gz(img, path) -> None:
    """Write a NIfTI image gzip-compressed with Huffman-only deflate.

    Float32 BOLD data barely compresses (about 94 % of its size at any level); Huffman-only
    coding gives the same size about 2.5x faster than nibabel's default (level 1), and
    the result is an ordinary .nii.gz any reader opens.
    """
    # No file name and mtime 0 in the gzip header: the same input gives the same bytes.
    with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw,
                                                 compresslevel=1, mtime=0) as gz:
        if hasattr(gz, "compress"):  # CPython's GzipFile keeps its compressor here
            gz.compress = zlib.compressobj(1, zlib.DEFLATED, -zlib.MAX_WBITS,
                                           zlib.DEF_MEM_LEVEL, zlib.Z_HUFFMAN_ONLY)
        img.to_file_map({"image": nib.FileHolder(fileobj=gz), "header": nib.FileHolder(fileobj=gz)})


def _sidecar(info, fwhm, ref, n_nonfinite, timings, summary) -> dict:
    """The BIDS JSON sidecar of the preprocessed run."""
    return {
        Sidecar.REPETITION_TIME: info.tr_s,
        Sidecar.SKULL_STRIPPED: False,
        Sidecar.SOURCES: [info.path.name],
        Sidecar.SMOOTHING_FWHM: fwhm,
        Sidecar.REFERENCE_VOLUME: ref,
        Sidecar.MOTION_CORRECTION: {
            "Method": "rigid-body, least squares with a smooth intensity-gain model, "
                      "inverse-compositional Gauss-Newton (Levenberg-Marquardt damped), "
                      "coarse-to-fine (trilinear then cubic B-spline), world (mm) space",
            "ParameterConvention": "M(p) = R (p - c) + c + t, R = Rx Ry Rz, c = field-of-view "
                                   "centre; maps reference to moving "
                                   "(fmri_preproc.params_to_affine)",
            "Reslicing": "trilinear, once per volume; outside the field of view = 0",
        },
        "NonFiniteValuesSetToZero": n_nonfinite,
        "Input": {
            "shape": list(info.shape),
            "dtype": info.dtype,
            "voxel_size_mm": list(info.voxel_size_mm),
            "file_bytes": info.file_bytes,
        },
        Sidecar.SOFTWARE: {
            "fmri_preproc": __version__,
            "numpy": np.__version__,
            "nibabel": nib.__version__,
            "python": platform.python_version(),
        },
        Sidecar.TIMINGS: {k: round(v, 3) for k, v in timings.items()},
        Sidecar.SUMMARY: summary,
    }
