"""The whole preprocessing of one run: read, correct motion, confounds, write, smooth.

Memory is flat in the run's length: the run is decompressed once into a float32 scratch file
(:class:`fmri_preproc.inputs.VolumeFile`, in ``work_dir``: ``/tmp`` in the function), and
every stage reads and writes it one volume at a time. Motion is estimated volume by volume,
each volume is resliced back into its own slot, confounds are a second pass over the file
(slabs of a bounded number of values), and the outputs are written as gzip streams, the
smoothed series smoothed volume by volume on its way out. Peak memory is the interpreter and
libraries plus a few volumes and the motion estimator's working set: it depends on the
volume's size, not on the number of volumes (``bench/bench_scale.py``; what a run needs is
computed from its header by :mod:`fmri_preproc.resources`).

Disk (``work_dir`` and ``out_dir``): the run as float32 plus the compressed outputs.

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

from . import __version__, normalize
from .confounds import compute_confounds, write_tsv
from .contract import (FRAMEWISE_DISPLACEMENT, MOTION_OUTLIER, PreprocResult, Run, Sidecar,
                       run_from_key)
from .inputs import InputError, VoxelSlabs, check_input, repetition_time, unpack_run
from .motion import estimate_motion, reference_index, reslice_volume
from .plausibility import check_motion
from .smoothing import smoothed_volumes
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
    work_dir=None,
    sidecar: dict | None = None,
    tr_override: float | None = None,
) -> PreprocResult:
    """Preprocess one BOLD run: motion correction, smoothing, confounds, normalisation.

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
    work_dir : str or Path, optional
        Scratch folder for the run as float32 (``X*Y*Z*T*4`` bytes); default ``out_dir``.
        The scratch file is removed at the end, also on errors.
    sidecar : dict, optional
        The run's BIDS sidecar (inherited keys merged); its ``RepetitionTime`` wins over the
        header's (:func:`fmri_preproc.inputs.repetition_time`).
    tr_override : float, optional
        A TR in seconds stated by the user: wins over sidecar and header.

    Returns
    -------
    PreprocResult
        ``outputs``: kind -> path, for ``preproc_bold`` (realigned, unsmoothed) and its
        ``preproc_json``, ``smoothed_bold`` and ``smoothed_json`` (when ``fwhm > 0``),
        ``boldref`` (the reference volume), ``brain_mask``, ``confounds`` and
        ``confounds_json``; when normalisation to the MNI template succeeds also
        ``mni_preproc_bold`` and its ``mni_preproc_json``, ``mni_brain_mask`` and its
        ``mni_brain_mask_json``,
        ``xfm_to_mni`` (ITK text) and ``normalization_figure`` (PNG)
        (:func:`fmri_preproc.normalize.write_mni_outputs`). If normalisation fails (e.g. a
        field of view holding under 30 % of a brain), the run is still processed: native
        outputs only, and the reason in ``summary["warnings"]``. ``summary``: ``warnings``
        (a list of str, empty when none), ``n_volumes``, ``reference_volume``,
        ``max_fd_mm``, ``mean_fd_mm``, ``mean_tsnr`` (median over the brain mask, after
        motion correction, before smoothing), ``n_motion_outliers``,
        ``n_non_steady_state``, ``n_nonfinite``, ``repetition_time_s``,
        ``peak_memory_mb``, ``duration_s``.

    Raises
    ------
    InputError
        For bad inputs (see :func:`fmri_preproc.check_input`); nothing is written then.

    Notes
    -----
    Motion parameters are in the convention of :func:`fmri_preproc.params_to_affine`;
    each volume is resliced once onto the reference volume's grid.
    """
    start = time.perf_counter()
    timings = {}
    if not np.isfinite(fwhm) or fwhm < 0:
        raise ValueError("fwhm must be a finite number >= 0 (mm)")
    out_dir = Path(out_dir)
    run = _run_of(in_file)
    info = check_input(in_file, max_bytes=max_bytes)
    tr_s, tr_record = repetition_time(info, sidecar, tr_override)
    out_dir.mkdir(parents=True, exist_ok=True)

    tic = time.perf_counter()
    store, n_nonfinite = unpack_run(info, work_dir or out_dir)
    timings["read_s"] = time.perf_counter() - tic
    try:
        return _process(store, info, run, out_dir, fwhm, reference, n_nonfinite,
                        (tr_s, tr_record), timings, start)
    finally:
        store.close()
        os.unlink(store.path)


def _process(store, info, run, out_dir, fwhm, reference, n_nonfinite, tr, timings, start):
    """The stages after reading: motion, reslicing, confounds, outputs (one step each)."""
    affine, n_volumes = info.affine, info.n_volumes
    ref = reference_index(reference, n_volumes)
    boldref = store[..., ref]
    if not np.ptp(boldref) > 0:
        raise InputError(f"{info.path.name}: the reference volume is constant (no image).",
                         cause="The run holds no signal (all values equal, e.g. all zero).",
                         action="Upload the original BOLD run.")

    # --- motion: estimated volume by volume from the scratch file
    tic = time.perf_counter()
    matrices = _estimate_motion(store, info, ref)
    # raises InputError for diverged estimates; warns of constant volumes and gain jumps
    motion_warnings = check_motion(store, affine, matrices, ref, name=info.path.name)
    params = np.array([affine_to_params(m, affine, info.shape[:3]) for m in matrices])
    timings["estimate_motion_s"] = time.perf_counter() - tic

    # --- reslicing: each volume once, back into its own slot
    tic = time.perf_counter()
    for t in range(n_volumes):
        if t != ref:
            store[..., t] = reslice_volume(store[..., t], affine, matrices[t])
    timings["reslice_s"] = time.perf_counter() - tic

    # --- confounds: a second pass over the scratch file
    tic = time.perf_counter()
    found = compute_confounds(store, boldref, params, matrices, affine, tr=tr[0],
                              slabs=VoxelSlabs(store))
    mask, columns = found.brain_mask, found.columns
    n_non_steady, mean_tsnr = found.n_non_steady, found.tsnr
    timings["confounds_s"] = time.perf_counter() - tic

    summary = _summary(columns, n_volumes, ref, mean_tsnr, n_non_steady, n_nonfinite, tr[0])
    summary["warnings"] += motion_warnings
    kinds = _kinds(fwhm)
    # --- normalisation to MNI: a failure is a warning, and the run keeps its native outputs
    tic = time.perf_counter()
    fit = normalize.normalize_or_warn(boldref, affine, summary)
    if fit is not None:
        kinds[-1:-1] = normalize.MNI_KINDS  # before the preproc sidecar, made visible last
    timings["normalize_s"] = time.perf_counter() - tic
    outputs = {kind: out_dir / run.filename(kind) for kind in kinds}
    with _visible_when_complete(outputs) as tmp:
        # --- outputs: streamed, one volume at a time
        tic = time.perf_counter()
        header = _float_header(info.path, tr[0])
        _write_nifti_gz(tmp["preproc_bold"], _image(store.shape, affine, header,
                                                    "motion corrected"),
                        (store[..., t] for t in range(n_volumes)))
        _write_nifti_gz(tmp["boldref"], _image(boldref.shape, affine, header,
                                               "motion reference volume"), [boldref])
        mask_header = header.copy()
        mask_header.set_data_dtype(np.uint8)
        _write_nifti_gz(tmp["brain_mask"], _image(mask.shape, affine, mask_header,
                                                  "brain mask"), [mask.astype(np.uint8)])
        write_tsv(tmp["confounds"], columns)
        _write_json(tmp["confounds_json"], found.metadata)
        timings["write_s"] = time.perf_counter() - tic

        # --- smoothing: volume by volume, on the way into its output stream
        if fwhm > 0:
            tic = time.perf_counter()
            _write_nifti_gz(tmp["smoothed_bold"],
                            _image(store.shape, affine, header,
                                   f"motion corrected, smoothed {fwhm:g} mm"),
                            smoothed_volumes(store, affine, fwhm))
            timings["smooth_s"] = time.perf_counter() - tic

        if fit is not None:  # --- the run in MNI space, streamed like the native series
            tic = time.perf_counter()
            normalize.write_mni_outputs(tmp, fit, store, mask, affine, tr=tr,
                                        sources=[outputs["preproc_bold"].name,
                                                 outputs["xfm_to_mni"].name],
                                        mask_sources=[outputs["brain_mask"].name,
                                                      outputs["xfm_to_mni"].name],
                                        write_nifti=_write_nifti_gz)
            timings["write_mni_s"] = time.perf_counter() - tic

        summary["duration_s"] = time.perf_counter() - start
        summary["peak_memory_mb"] = peak_memory_mb()
        sidecar = _sidecar(info, 0.0, ref, n_nonfinite, timings, summary, tr)
        _write_json(tmp["preproc_json"], sidecar)
        if fwhm > 0:
            _write_json(tmp["smoothed_json"], {**sidecar, Sidecar.SMOOTHING_FWHM: fwhm})
    return PreprocResult(run=run, outputs=outputs, summary=summary)


def _estimate_motion(store, info, ref: int) -> np.ndarray:
    """:func:`estimate_motion` on the scratch file, its failures as :class:`InputError`."""
    try:
        return estimate_motion(store, info.affine, reference=ref)
    except ValueError as exc:  # e.g. a reference with too little structure to register
        raise InputError(f"{info.path.name}: motion correction failed ({exc}).",
                         cause="The run has too little image structure (not a brain EPI run?).",
                         action="Check the run in a viewer and upload the BOLD run.") from exc


def _summary(columns, n_volumes, ref, mean_tsnr, n_non_steady, n_nonfinite, tr_s) -> dict:
    fd = columns[FRAMEWISE_DISPLACEMENT]
    return {
        "n_volumes": n_volumes,
        "reference_volume": ref,
        "max_fd_mm": float(np.nanmax(fd)) if n_volumes > 1 else 0.0,
        "mean_fd_mm": float(np.nanmean(fd)) if n_volumes > 1 else 0.0,
        "mean_tsnr": mean_tsnr,
        "n_motion_outliers": sum(c.startswith(MOTION_OUTLIER) for c in columns),
        "n_non_steady_state": n_non_steady,
        "n_nonfinite": n_nonfinite,
        "repetition_time_s": tr_s,
        "warnings": [],  # strings: processed, but a person should look (-> _done.json)
    }


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


def _float_header(path, tr_s: float):
    """The input's header (orientation, units), set for float32 output, unscaled, with the
    TR that was used (``tr_s``, in seconds): tools that read the TR from the header (nilearn
    does) then agree with the sidecar, whichever source it came from."""
    header = nib.load(path).header.copy()  # header only: no data read
    header.set_data_dtype(np.float32)
    header.set_slope_inter(1.0, 0.0)
    header.set_xyzt_units(header.get_xyzt_units()[0], "sec")
    header["pixdim"][4] = tr_s
    return header


def _image(shape, affine, header, description: str):
    """The header of a NIfTI image of ``shape`` with the run's header (NIfTI-1 or -2 as the
    input), as nibabel would write it; no data is allocated."""
    kind = nib.Nifti1Image if isinstance(header, nib.Nifti1Header) else nib.Nifti2Image
    placeholder = np.broadcast_to(np.zeros((), header.get_data_dtype()), shape)  # 0 bytes
    img = kind(placeholder, affine, header=header)
    img.header.set_slope_inter(1.0, 0.0)
    img.header["descrip"] = f"fmri_preproc: {description}"[:79].encode()
    if len(shape) == 3:
        img.header.set_xyzt_units(*header.get_xyzt_units())
    img.update_header()
    return img.header


def _write_json(path, document: dict) -> None:
    Path(path).write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")


def _write_nifti_gz(path, header, volumes, strategy: int = zlib.Z_HUFFMAN_ONLY) -> None:
    """Write a NIfTI file gzip-compressed, its volumes in a stream, Huffman-only deflate.

    Parameters
    ----------
    path : Path
    header : nibabel.Nifti1Header or Nifti2Header
        From :func:`_image` (shape, dtype, orientation); written first.
    volumes : iterable of (X, Y, Z) arrays
        Written one at a time, in order: memory holds one volume, whatever the run's length.
    strategy : int, optional
        zlib strategy: Huffman-only (default) for brain data; ``zlib.Z_RLE`` for volumes
        that are mostly 0 (the MNI series: 2.5x faster and smaller than Huffman-only).

    Notes
    -----
    Float32 BOLD data barely compresses (about 94 % of its size at any level); Huffman-only
    coding gives the same size about 2.5x faster than nibabel's default (level 1), and
    the result is an ordinary .nii.gz any reader opens.
    """
    dtype = header.get_data_dtype()
    # No file name and mtime 0 in the gzip header: the same input gives the same bytes.
    with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw,
                                                 compresslevel=1, mtime=0) as gz:
        if hasattr(gz, "compress"):  # CPython's GzipFile keeps its compressor here
            gz.compress = zlib.compressobj(1, zlib.DEFLATED, -zlib.MAX_WBITS,
                                           zlib.DEF_MEM_LEVEL, strategy)
        header.write_to(gz)
        gz.write(b"\0" * (int(header.get_data_offset()) - gz.tell()))  # to vox_offset
        for volume in volumes:
            gz.write(np.asarray(volume, dtype=dtype).tobytes(order="F"))


def _sidecar(info, fwhm, ref, n_nonfinite, timings, summary, tr) -> dict:
    """The BIDS JSON sidecar of the preprocessed run; ``tr`` = (seconds, its provenance)."""
    return {
        Sidecar.REPETITION_TIME: tr[0],
        Sidecar.REPETITION_TIME_SOURCE: tr[1],
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
            "Reslicing": "fmri_preproc.reslice_volume, once per volume; outside the field "
                         "of view = 0",
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
