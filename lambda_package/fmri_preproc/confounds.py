"""Confounds and quality measures with fMRIPrep's names (numpy only).

Motion parameters follow :mod:`fmri_preproc.transforms` (mm and radians, rotations about
the field-of-view centre). Column names, units and first-row ``n/a`` follow fMRIPrep's
``desc-confounds_timeseries.tsv``.
"""

from __future__ import annotations

import numpy as np

from .contract import (DVARS, FRAMEWISE_DISPLACEMENT, MOTION_OUTLIER, MOTION_PARAMS,
                       NON_STEADY_STATE, STD_DVARS, expansion_names, indexed_column)

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


def confounds_metadata(columns: dict[str, np.ndarray]) -> dict[str, dict]:
    """The confounds file's JSON sidecar: a description (and units) of every column.

    fMRIPrep writes one entry per column; ours says what each column is, in what units, and
    how it was computed.
    """
    meta = {}
    for name in columns:
        base = next((b for b in MOTION_PARAMS if name.startswith(b)), None)
        if name in _DESCRIPTIONS:
            units, text = _DESCRIPTIONS[name]
        elif base is not None:
            units = "mm" if base.startswith("trans") else "rad"
            kind = name[len(base):].lstrip("_") or "parameter"
            units = units if kind == "parameter" else (f"{units}^2" if "power2" in kind else units)
            text = (f"Rigid-body {base} ({kind}); translations along and rotations about the "
                    "world axes, about the field-of-view centre (fmri_preproc.params_to_affine).")
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
