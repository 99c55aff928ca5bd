"""Confounds and quality measures with fMRIPrep's names (numpy only).

Motion parameters follow :mod:`fmri_preproc.transforms` (mm and radians, rotations about
the field-of-view centre). Column names, units and first-row ``n/a`` follow fMRIPrep's
``desc-confounds_timeseries.tsv``.
"""

from __future__ import annotations

import numpy as np

from dataclasses import dataclass

from .contract import (A_COMP_COR, COSINE, CSF, DVARS, FRAMEWISE_DISPLACEMENT, GLOBAL_SIGNAL,
                       MOTION_OUTLIER, MOTION_PARAMS, NON_STEADY_STATE, RMSD, STD_DVARS,
                       WHITE_MATTER, expansion_names, indexed_column)
from .transforms import fov_centre, rms_deviation

__all__ = [
    "framewise_displacement",
    "motion_expansion",
    "brain_mask",
    "dvars",
    "tsnr",
    "non_steady_state",
    "confounds_table",
    "confounds_metadata",
    "write_tsv",
    "tissue_masks",
    "tissue_signals",
    "signal_expansion",
    "cosine_drift",
    "acompcor",
    "rmsd",
    "RunConfounds",
    "compute_confounds",
]


def framewise_displacement(params: np.ndarray, *, radius: float = 50.0) -> np.ndarray:
    """Framewise displacement (mm) of Power et al. (2012).

    Parameters
    ----------
    params : (T, 6) array
        ``[trans_x, trans_y, trans_z (mm), rot_x, rot_y, rot_z (radians)]`` per volume.
    radius : float, optional
        Sphere radius (mm) turning rotations into displacements (50 mm, a head).

    Returns
    -------
    fd : (T,) ndarray
        ``sum |d trans| + radius * sum |d rot|`` between consecutive volumes; the first
        value is NaN (written as ``n/a``, like fMRIPrep).

    References
    ----------
    .. [1] Power JD, Barnes KA, Snyder AZ, Schlaggar BL, Petersen SE (2012). Spurious but
       systematic correlations in functional connectivity MRI networks arise from subject
       motion. NeuroImage 59:2142-2154. :doi:`10.1016/j.neuroimage.2011.10.018`
    """
    params = np.asarray(params, dtype=np.float64)
    if params.ndim != 2 or params.shape[1] != 6:
        raise ValueError("params must have shape (T, 6)")
    if radius <= 0:
        raise ValueError("radius must be positive")
    diff = np.abs(np.diff(params, axis=0))
    fd = diff[:, :3].sum(axis=1) + radius * diff[:, 3:].sum(axis=1)
    return np.concatenate([[np.nan], fd])


def motion_expansion(params: np.ndarray) -> dict[str, np.ndarray]:
    """The 24 motion regressors: parameters, derivatives, and their squares.

    Returns ``{name: column}`` with fMRIPrep's names ``trans_x``, ``trans_x_derivative1``,
    ``trans_x_power2``, ``trans_x_derivative1_power2`` ... (derivative = backward
    difference, first row NaN).

    References
    ----------
    .. [1] Satterthwaite TD et al. (2013). An improved framework for confound regression
       and filtering for control of motion artifact in the preprocessing of resting-state
       functional connectivity data. NeuroImage 64:240-256.
       :doi:`10.1016/j.neuroimage.2012.08.052`
    """
    params = np.asarray(params, dtype=np.float64)
    if params.ndim != 2 or params.shape[1] != 6:
        raise ValueError("params must have shape (T, 6)")
    columns = {}
    for k, base in enumerate(MOTION_PARAMS):
        p = params[:, k]
        d = np.concatenate([[np.nan], np.diff(p)])
        for name, values in zip(expansion_names(base), (p, d, p**2, d**2)):
            columns[name] = values
    return columns


def brain_mask(volume: np.ndarray, *, fraction: float = 0.2) -> np.ndarray:
    """Voxels brighter than ``fraction`` of the volume's robust maximum (98th percentile).

    A simple intensity mask for DVARS and tSNR on EPI, where the background is dark.
    """
    if volume.ndim != 3:
        raise ValueError("volume must be 3D")
    finite = volume[np.isfinite(volume)]
    top = np.percentile(finite, 98) if finite.size else 0.0
    mask = volume > fraction * top
    if not mask.any():
        mask = np.ones(volume.shape, dtype=bool)
    return mask


def _voxel_chunks(mask: np.ndarray, size: int = 4):
    """Slabs of ``size`` z-slices: (slab index, slab mask) for chunked time-series work."""
    for z0 in range(0, mask.shape[2], size):
        yield np.s_[:, :, z0 : z0 + size], mask[:, :, z0 : z0 + size]


def dvars(data: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """DVARS and standardised DVARS of a 4D run within a mask.

    Parameters
    ----------
    data : (X, Y, Z, T) array
        Motion-corrected run (before smoothing).
    mask : (X, Y, Z) bool array
        Brain mask.

    Returns
    -------
    dvars : (T,) ndarray
        RMS over the mask of the backward temporal difference, after scaling the run so the
        median in-mask intensity is 1000 (as Nipype / fMRIPrep); first value NaN.
    std_dvars : (T,) ndarray
        DVARS divided by its expected value under stationarity,
        ``mean(sqrt(2 (1 - AR1)) * robust_sd)`` (Nichols 2017); first value NaN.

    References
    ----------
    .. [1] Power JD et al. (2012). :doi:`10.1016/j.neuroimage.2011.10.018`
    .. [2] Afyouni S, Nichols TE (2018). Insight and inference for DVARS. NeuroImage
       172:291-312. :doi:`10.1016/j.neuroimage.2017.12.098`
    """
    if data.ndim != 4 or mask.shape != data.shape[:3]:
        raise ValueError("data must be 4D and mask must match its spatial shape")
    n_t = data.shape[3]
    sq_sum = np.zeros(n_t - 1)
    sd_hat = []
    medians = []
    n_vox = 0
    # chunks of z-slices: never more than a slab of time series in memory
    for index, slab_mask in _voxel_chunks(mask):
        ts = data[index][slab_mask].astype(np.float64)  # (voxels, T)
        if ts.size == 0:
            continue
        n_vox += ts.shape[0]
        medians.append(np.median(ts, axis=1))
        sq_sum += np.sum(np.diff(ts, axis=1) ** 2, axis=0)
        q75, q25 = np.percentile(ts, [75, 25], axis=1)
        robust_sd = (q75 - q25) / 1.349
        centred = ts - ts.mean(axis=1, keepdims=True)
        denom = np.sum(centred**2, axis=1)
        ar1 = np.divide(np.sum(centred[:, 1:] * centred[:, :-1], axis=1), denom,
                        out=np.zeros_like(denom), where=denom > 0)
        sd_hat.append(np.sqrt(np.clip(2.0 * (1.0 - ar1), 0, None)) * robust_sd)
    if n_vox == 0:
        raise ValueError("mask is empty")
    # intensity normalisation as Nipype / fMRIPrep: median in-mask intensity -> 1000
    median = float(np.median(np.concatenate(medians)))
    scale = 1000.0 / median if median > 0 else 1.0
    raw = np.sqrt(sq_sum / n_vox)
    expected = np.mean(np.concatenate(sd_hat))
    std = raw / expected if expected > 0 else np.full_like(raw, np.nan)
    nan = [np.nan]
    return np.concatenate([nan, raw * scale]), np.concatenate([nan, std])


def tsnr(data: np.ndarray, mask: np.ndarray) -> float:
    """Median over the mask of temporal SNR, mean / standard deviation over time."""
    values = []
    for index, slab_mask in _voxel_chunks(mask):
        ts = data[index][slab_mask].astype(np.float64)
        if ts.size:
            sd = ts.std(axis=1)
            values.append(np.divide(ts.mean(axis=1), sd, out=np.zeros_like(sd), where=sd > 0))
    return float(np.median(np.concatenate(values))) if values else float("nan")


def non_steady_state(global_signal: np.ndarray, *, threshold: float = 3.5) -> int:
    """Number of leading volumes whose global signal is an outlier (not yet at steady state).

    A volume is an outlier when its modified z-score, ``0.6745 |x - median| / MAD`` over
    the first 50 volumes, exceeds ``threshold`` (Nipype's NonSteadyStateDetector test);
    the count stops at the first volume that is not an outlier.
    """
    signal = np.asarray(global_signal, dtype=np.float64)[:50]
    med = np.median(signal)
    mad = np.median(np.abs(signal - med))
    if mad == 0:
        return 0
    outlier = 0.6745 * np.abs(signal - med) / mad > threshold
    count = 0
    while count < len(outlier) and outlier[count]:
        count += 1
    return count


def confounds_table(
    params: np.ndarray,
    dvars_values: np.ndarray,
    std_dvars: np.ndarray,
    *,
    n_non_steady: int = 0,
    fd_threshold: float = 0.5,
    std_dvars_threshold: float = 1.5,
) -> dict[str, np.ndarray]:
    """All confound columns, fMRIPrep names, in order.

    Motion outliers: volumes with FD > ``fd_threshold`` mm or std_dvars >
    ``std_dvars_threshold`` (fMRIPrep's defaults), one indicator column each
    (``motion_outlier00``, ...); leading non-steady volumes likewise
    (``non_steady_state_outlier00``, ...).
    """
    fd = framewise_displacement(params)
    columns = {FRAMEWISE_DISPLACEMENT: fd, DVARS: dvars_values, STD_DVARS: std_dvars}
    columns.update(motion_expansion(params))
    n_t = params.shape[0]
    for k in range(n_non_steady):
        columns[indexed_column(NON_STEADY_STATE, k)] = _indicator(n_t, k)
    with np.errstate(invalid="ignore"):
        bad = (np.nan_to_num(fd) > fd_threshold) | (np.nan_to_num(std_dvars) > std_dvars_threshold)
    for k, t in enumerate(np.flatnonzero(bad)):
        columns[indexed_column(MOTION_OUTLIER, k)] = _indicator(n_t, t)
    return columns


def _indicator(n: int, index: int) -> np.ndarray:
    column = np.zeros(n)
    column[index] = 1
    return column


_DESCRIPTIONS = {
    FRAMEWISE_DISPLACEMENT: ("mm", "Framewise displacement (Power et al. 2012), 50 mm head "
                                   "radius; first volume n/a."),
    DVARS: ("a.u.", "RMS of the temporal derivative over the brain mask, median intensity "
                    "scaled to 1000; first volume n/a."),
    STD_DVARS: ("", "DVARS divided by its expected value (Nichols 2017); first volume n/a."),
}


_TISSUES = {GLOBAL_SIGNAL: "Mean signal over the brain mask",
            CSF: "Mean signal over the CSF mask (brightest interior EPI voxels)",
            WHITE_MATTER: "Mean signal over the white-matter mask (darkest interior EPI "
                          "voxels, eroded)"}


def confounds_metadata(columns: dict[str, np.ndarray]) -> dict[str, dict]:
    """The confounds file's JSON sidecar: a description (and units) of every column.

    fMRIPrep writes one entry per column; ours says what each column is, in what units, and
    how it was computed.
    """
    meta = {}
    for name in columns:
        base = next((b for b in MOTION_PARAMS if name.startswith(b)), None)
        tissue = next((b for b in _TISSUES if name.startswith(b)), None)
        if name in _DESCRIPTIONS:
            units, text = _DESCRIPTIONS[name]
        elif base is not None:
            units = "mm" if base.startswith("trans") else "rad"
            kind = name[len(base):].lstrip("_") or "parameter"
            units = units if kind == "parameter" else (f"{units}^2" if "power2" in kind else units)
            text = (f"Rigid-body {base} ({kind}); translations along and rotations about the "
                    "world axes, about the field-of-view centre (fmri_preproc.params_to_affine).")
        elif tissue is not None:
            kind = name[len(tissue):].lstrip("_") or "mean"
            units = "a.u.^2" if "power2" in kind else "a.u."
            text = f"{_TISSUES[tissue]} ({kind}), per volume, after realignment."
        elif name == RMSD:
            units, text = "mm", ("RMS deviation from the previous volume over an 80 mm "
                                 "sphere (Jenkinson 1999); first volume n/a.")
        elif name.startswith(COSINE):
            units, text = "", ("Discrete cosine basis regressor for drifts slower than "
                               f"{HIGH_PASS_PERIOD_S:g} s (high-pass filter).")
        elif name.startswith(MOTION_OUTLIER):
            units, text = "", "Indicator of a volume with FD > 0.5 mm or std_dvars > 1.5."
        elif name.startswith(NON_STEADY_STATE):
            units, text = "", "Indicator of a leading volume before steady state."
        else:
            units, text = "", ""
        meta[name] = {"Description": text, **({"Units": units} if units else {})}
    return meta


def write_tsv(path, columns: dict[str, np.ndarray]) -> None:
    """Write columns as a BIDS TSV: header row, tab-separated, NaN as ``n/a``."""
    names = list(columns)
    n_rows = len(next(iter(columns.values()))) if names else 0
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write("\t".join(names) + "\n")
        for i in range(n_rows):
            row = []
            for name in names:
                value = float(columns[name][i])
                row.append("n/a" if not np.isfinite(value) else f"{value:.10g}")
            f.write("\t".join(row) + "\n")


# ------------------------------------------------------------------------------------------
# Tissue signals, aCompCor, drift and RMSD (fMRIPrep's columns for denoising strategies)

#: fMRIPrep's high-pass cut-off for cosine regressors and aCompCor's pre-filter (s).
HIGH_PASS_PERIOD_S = 128.0
#: Cumulative variance a_comp_cor components must explain (fMRIPrep keeps 50 %).
ACOMPCOR_VARIANCE = 0.5


def _erode(mask: np.ndarray, iterations: int = 1) -> np.ndarray:
    """Binary erosion with the 6-neighbourhood; voxels at the grid's edge are eroded too."""
    out = mask.copy()
    for _ in range(iterations):
        padded = np.pad(out, 1, constant_values=False)
        core = padded[1:-1, 1:-1, 1:-1].copy()
        for axis in range(3):
            for step in (-1, 1):
                core &= np.roll(padded, step, axis=axis)[1:-1, 1:-1, 1:-1]
        out = core
    return out


def tissue_masks(reference: np.ndarray, brain: np.ndarray, *, csf_fraction: float = 0.05,
                 wm_fraction: float = 0.25, min_voxels: int = 10) -> dict[str, np.ndarray]:
    """CSF and white-matter masks from the EPI reference volume alone (no T1w, no template).

    In T2*-weighted EPI at 3 T the contrast is CSF > grey matter > white matter (T2* and
    proton density both rank them so), so inside the brain the brightest voxels are CSF
    (ventricles, sulci) and the darkest are white matter. Both are taken from the brain
    mask eroded twice, which drops the brain's edge: partial volumes with the scalp and the
    dark background would otherwise read as "WM". The WM mask is eroded once more
    (fMRIPrep erodes its WM mask for aCompCor, to keep grey-matter signal out of it);
    if that would leave fewer than ``min_voxels`` the uneroded one is kept. At 3-4 mm voxels
    the brightest 5 % share their voxels with grey matter (on the simulated head they are
    about 40 % CSF, four times the brain's share): a CSF regressor from EPI alone is
    CSF-weighted, not pure, which aCompCor tolerates because it takes several components.

    Parameters
    ----------
    reference : (X, Y, Z) array
        The motion reference volume (``boldref``).
    brain : (X, Y, Z) bool array
        Brain mask (:func:`brain_mask`).
    csf_fraction, wm_fraction : float
        Share of the eroded brain's voxels taken as CSF (brightest) and WM (darkest).
    min_voxels : int
        Smallest acceptable mask; below it a mask falls back to its uneroded version.

    Returns
    -------
    dict
        ``{"csf": mask, "white_matter": mask, "combined": csf | white_matter}`` (bool).

    References
    ----------
    .. [1] Behzadi Y, Restom K, Liau J, Liu TT (2007). A component based noise correction
       method (CompCor) for BOLD and perfusion based fMRI. NeuroImage 37:90-101.
       :doi:`10.1016/j.neuroimage.2007.04.042`
    """
    if reference.shape != brain.shape:
        raise ValueError("reference and brain mask must have the same shape")
    interior = _erode(brain, 2)
    if interior.sum() < 4 * min_voxels:  # a tiny brain (small test grids): no erosion
        interior = brain
    values = reference[interior]
    csf = interior & (reference >= np.quantile(values, 1.0 - csf_fraction))
    wm = interior & (reference <= np.quantile(values, wm_fraction))
    eroded = _erode(wm, 1)
    wm = eroded if eroded.sum() >= min_voxels else wm
    return {CSF: csf, WHITE_MATTER: wm, "combined": csf | wm}


def tissue_signals(data, masks: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Mean signal per volume in each mask, read one volume at a time.

    ``data`` is anything indexable as ``data[..., t]`` (an array or a ``np.memmap``); no
    more than one float64 volume is held at a time.
    """
    n_t = data.shape[-1]
    out = {name: np.empty(n_t) for name in masks}
    for t in range(n_t):
        volume = np.asarray(data[..., t], dtype=np.float64)
        for name, mask in masks.items():
            out[name][t] = volume[mask].mean()
    return out


def signal_expansion(name: str, values: np.ndarray) -> dict[str, np.ndarray]:
    """``name``, ``name_derivative1``, ``name_power2``, ``name_derivative1_power2``
    (fMRIPrep's expansion; backward difference, first row NaN)."""
    values = np.asarray(values, dtype=np.float64)
    d = np.concatenate([[np.nan], np.diff(values)])
    return dict(zip(expansion_names(name), (values, d, values**2, d**2)))


def cosine_drift(n_volumes: int, tr: float, *, period_s: float = HIGH_PASS_PERIOD_S) -> np.ndarray:
    """Discrete cosine basis that spans drifts slower than ``period_s`` (fMRIPrep's
    ``cosine00`` ...).

    As Nipype's ``_cosine_drift`` (used by fMRIPrep): ``order = floor(2 T TR / period)``;
    columns ``sqrt(2 / T) cos(pi k (n + 1/2) / T)`` for ``k = 1 .. order - 1`` (the
    constant is left out). nilearn's ``create_cosine_drift`` has the same columns and one
    more (``k = order``).

    Returns
    -------
    (T, K) ndarray
        ``K = order - 1`` may be 0 for short runs.
    """
    if not (np.isfinite(tr) and tr > 0):
        raise ValueError("tr must be a positive number of seconds")
    order = int(np.floor(2.0 * n_volumes * tr / period_s))
    n = np.arange(n_volumes)
    k = np.arange(1, max(order, 1))
    return np.sqrt(2.0 / n_volumes) * np.cos(np.pi / n_volumes * (n[:, None] + 0.5) * k[None])


def acompcor(series, drift: np.ndarray, *,
             variance: float = ACOMPCOR_VARIANCE) -> tuple[np.ndarray, list[dict]]:
    """Anatomical CompCor: principal components of the noise-tissue voxels.

    As fMRIPrep (Nipype ``compute_noise_components``): each voxel's series is
    high-passed by regressing out a constant and the cosine basis, scaled to unit
    variance, and decomposed into principal components; components are kept until they
    explain ``variance`` of the variance (50 %).

    The decomposition is that of the ``T x T`` matrix ``X X'`` of the scaled series
    ``X`` (T x V), summed over chunks of voxels: its eigenvectors are ``X``'s left singular
    vectors and its eigenvalues their squared singular values, as an SVD of ``X`` would
    give, but memory holds one chunk and ``T x T`` numbers, not every noise voxel's
    series.

    Parameters
    ----------
    series : (V, T) array, or an iterable of (v, T) arrays
        Time series of the combined WM + CSF mask's voxels, whole or in chunks.
    drift : (T, K) array
        Cosine regressors (:func:`cosine_drift`).
    variance : float
        Cumulative variance explained by the retained components.

    Returns
    -------
    components : (T, n_retained) ndarray
        Retained components (unit-norm temporal singular vectors).
    metadata : list of dict
        One per component (retained or not): ``SingularValue``, ``VarianceExplained``,
        ``CumulativeVarianceExplained``, ``Retained``.

    References
    ----------
    .. [1] Behzadi Y et al. (2007). :doi:`10.1016/j.neuroimage.2007.04.042`
    .. [2] Esteban O et al. (2019). fMRIPrep: a robust preprocessing pipeline for functional
       MRI. Nat Methods 16:111-116. :doi:`10.1038/s41592-018-0235-4`
    """
    chunks = [series] if isinstance(series, np.ndarray) else series
    design = np.column_stack([np.ones(len(drift)), drift])
    project = np.linalg.pinv(design)
    gram = np.zeros((len(design), len(design)))
    for chunk in chunks:
        x = np.asarray(chunk, dtype=np.float64).T  # (T, v)
        x -= design @ (project @ x)
        sd = x.std(axis=0)
        x /= np.where(sd > 0, sd, 1.0)
        gram += x @ x.T
    eigenvalues, vectors = np.linalg.eigh(gram)
    eigenvalues, vectors = eigenvalues[::-1], vectors[:, ::-1]
    # the residuals' rank is at most T - K - 1: drop the numerically-zero directions
    keep = eigenvalues > eigenvalues[0] * 1e-10 if eigenvalues.size and eigenvalues[0] > 0 \
        else np.zeros(eigenvalues.size, dtype=bool)
    s, u = np.sqrt(eigenvalues[keep]), vectors[:, keep]
    explained = s**2 / np.sum(s**2) if s.size else s
    cumulative = np.cumsum(explained)
    n_keep = int(np.searchsorted(cumulative, variance) + 1) if s.size else 0
    metadata = [{"SingularValue": float(s[k]), "VarianceExplained": float(explained[k]),
                 "CumulativeVarianceExplained": float(cumulative[k]), "Retained": k < n_keep}
                for k in range(len(s))]
    return u[:, :n_keep], metadata


def rmsd(matrices, affine: np.ndarray, shape, *, radius: float = 80.0) -> np.ndarray:
    """RMS deviation (mm) of each volume from the previous one (Jenkinson 1999), as
    fMRIPrep's ``rmsd`` (MCFLIRT's relative RMS); first value NaN.

    An 80 mm sphere about the field-of-view centre; ``matrices`` are the engine's motion
    matrices (reference -> moving, world mm).
    """
    centre = fov_centre(affine, shape)
    values = [rms_deviation(matrices[t], matrices[t - 1], radius=radius, centre=centre)
              for t in range(1, len(matrices))]
    return np.concatenate([[np.nan], values])


@dataclass
class RunConfounds:
    """Everything :func:`compute_confounds` derives from a realigned run.

    Attributes
    ----------
    columns : dict of str to (T,) ndarray
        The TSV's columns, fMRIPrep's names and order of kinds.
    metadata : dict
        The TSV's JSON sidecar (:func:`confounds_metadata` plus a_comp_cor metadata).
    brain_mask, csf_mask, wm_mask : (X, Y, Z) bool ndarray
    n_non_steady : int
    tsnr : float
        Median tSNR over the brain after the non-steady volumes (NaN for one volume).
    """

    columns: dict
    metadata: dict
    brain_mask: np.ndarray
    csf_mask: np.ndarray
    wm_mask: np.ndarray
    n_non_steady: int
    tsnr: float


def compute_confounds(data, reference: np.ndarray, params: np.ndarray, matrices, affine,
                      *, tr: float | None, slabs=None) -> RunConfounds:
    """All confounds of a realigned run, reading it one volume (or one slab) at a time.

    Parameters
    ----------
    data : (X, Y, Z, T) array-like
        The realigned run; anything indexable as ``data[..., t]`` and ``data[:, :, z0:z1]``
        (a float32 array or a ``np.memmap``). No float64 copy of the run is made.
    reference : (X, Y, Z) array
        The reference volume (``boldref``): brain and tissue masks come from it.
    params : (T, 6) array
        Motion parameters (mm, radians).
    matrices : (T, 4, 4) array
        Motion matrices (for ``rmsd``).
    affine : (4, 4) array
        The run's voxel-to-world affine.
    tr : float or None
        Repetition time (s); without it no cosine regressors are written and aCompCor is
        high-passed by a constant only.
    slabs : optional
        Another view of ``data`` for the per-voxel time-series passes (DVARS, tSNR), read as
        ``slabs[:, :, z0:z1]``, with a ``mask(mask)`` method that lays a spatial mask out on
        its grid (:class:`fmri_preproc.inputs.VoxelSlabs`, for a run kept in a scratch file).
        By default ``data`` itself.

    Returns
    -------
    RunConfounds
    """
    n_t = data.shape[-1]
    brain = brain_mask(reference)
    tissues = tissue_masks(reference, brain)
    means = tissue_signals(data, {GLOBAL_SIGNAL: brain, CSF: tissues[CSF],
                                  WHITE_MATTER: tissues[WHITE_MATTER]})
    n_non_steady = non_steady_state(means[GLOBAL_SIGNAL])
    series, series_mask = (data, brain) if slabs is None else (slabs, slabs.mask(brain))
    dvars_values, std_dvars = (dvars(series, series_mask) if n_t > 1
                               else (np.full(1, np.nan),) * 2)
    columns: dict[str, np.ndarray] = {}
    for name in (GLOBAL_SIGNAL, CSF, WHITE_MATTER):
        columns.update(signal_expansion(name, means[name]))
    motion = confounds_table(params, dvars_values, std_dvars, n_non_steady=n_non_steady)
    columns.update(motion)
    columns[RMSD] = rmsd(matrices, affine, reference.shape)
    drift = cosine_drift(n_t, tr) if tr else np.zeros((n_t, 0))
    combined = tissues["combined"] if slabs is None else slabs.mask(tissues["combined"])
    components, component_meta = _acompcor_of(series, combined, drift, n_non_steady)
    for k in range(components.shape[1]):
        columns[indexed_column(A_COMP_COR, k)] = components[:, k]
    for k in range(drift.shape[1]):
        columns[indexed_column(COSINE, k)] = drift[:, k]
    metadata = confounds_metadata(columns)
    metadata.update(_acompcor_metadata(component_meta, int(tissues["combined"].sum())))
    steady = _SkipVolumes(series, n_non_steady) if n_non_steady else series
    value = tsnr(steady, series_mask) if n_t - n_non_steady > 1 else float("nan")
    return RunConfounds(columns, metadata, brain, tissues[CSF], tissues[WHITE_MATTER],
                        n_non_steady, value)


class _SkipVolumes:
    """Slabs of a run without its first ``skip`` volumes (tSNR over the steady state)."""

    ndim = 4

    def __init__(self, data, skip: int):
        self.data, self.skip = data, skip
        self.shape = (*data.shape[:3], data.shape[3] - skip)

    def __getitem__(self, index):
        return self.data[index][..., self.skip:]


def _acompcor_of(series, mask, drift, n_non_steady):
    """aCompCor on the steady-state volumes; leading non-steady rows are 0 (as Nipype).

    ``series`` is read in slabs of voxels (``series[:, :, z0:z1]``, all volumes), so memory
    holds one slab, never the noise voxels' whole series.
    """
    n_t = series.shape[-1]
    steady = _SkipVolumes(series, n_non_steady) if n_non_steady else series
    if n_t - n_non_steady < 3 or mask.sum() < 2:
        return np.zeros((n_t, 0)), []
    chunks = (steady[index][slab_mask] for index, slab_mask in _voxel_chunks(mask)
              if slab_mask.any())
    components, meta = acompcor(chunks, drift[n_non_steady:])
    return np.vstack([np.zeros((n_non_steady, components.shape[1])), components]), meta


def _acompcor_metadata(component_meta: list[dict], n_voxels: int) -> dict:
    """fMRIPrep's JSON entries: retained components as ``a_comp_cor_NN``, the others as
    ``dropped_N`` (their columns are not in the TSV)."""
    entries, dropped = {}, 0
    for k, meta in enumerate(component_meta):
        name = indexed_column(A_COMP_COR, k) if meta["Retained"] else f"dropped_{dropped}"
        dropped += not meta["Retained"]
        entries[name] = {"Method": "aCompCor", "Mask": "combined", **meta,
                         "Description": f"Principal component {k} of the {n_voxels} WM + CSF "
                                        "voxels' series (cosine high-pass 128 s, unit "
                                        "variance); kept until 50 % of the variance."}
    return entries
