"""How much of the connectivity is head motion: QC-FC and FD coupling.

* :func:`qcfc` - QC-FC, the across-subject correlation between mean framewise displacement
  and each edge (Power et al. 2012; Ciric et al. 2017), and its dependence on distance;
* :func:`fd_coupling` - a within-subject analogue: how strongly region signals follow FD.
"""
from __future__ import annotations

import numpy as np
from scipy import stats

from helpers.analysis.connectome import fisher_z, upper_triangle

__all__ = ["qcfc", "qcfc_summary", "region_distances", "fd_coupling"]


def qcfc(matrices: np.ndarray, mean_fd) -> tuple[np.ndarray, np.ndarray]:
    """QC-FC: correlation across subjects between mean FD and each edge.

    Parameters
    ----------
    matrices : (n_subjects, R, R) ndarray
        Correlation matrices (Fisher z is applied here).
    mean_fd : (n_subjects,) array
        Each subject's mean framewise displacement (mm).

    Returns
    -------
    r, p : (n_edges,) ndarray
        Pearson correlation and its two-sided p-value for each upper-triangle edge.

    References
    ----------
    .. [1] Ciric R, et al. (2017). Benchmarking of participant-level confound regression
       strategies for the control of motion artifact in studies of functional
       connectivity. NeuroImage 154:174-187. :doi:`10.1016/j.neuroimage.2017.03.020`
    """
    edges = upper_triangle(fisher_z(matrices))
    mean_fd = np.asarray(mean_fd, dtype=float)
    if len(mean_fd) != len(edges) or len(edges) < 3:
        raise ValueError("need one mean FD per subject and at least 3 subjects for QC-FC")
    fd = (mean_fd - mean_fd.mean()) / mean_fd.std()
    z = (edges - edges.mean(0)) / np.where(edges.std(0) > 0, edges.std(0), 1)
    r = np.clip(fd @ z / len(fd), -1, 1)
    dof = len(fd) - 2
    t = r * np.sqrt(dof / np.clip(1 - r**2, 1e-12, None))
    return r, 2 * stats.t.sf(np.abs(t), dof)


def region_distances(coords) -> np.ndarray:
    """Euclidean distance (mm) between region centres, for each upper-triangle edge."""
    coords = np.asarray(coords, dtype=float)
    return upper_triangle(np.linalg.norm(coords[:, None] - coords[None], axis=2))


def qcfc_summary(r: np.ndarray, p: np.ndarray, distances=None) -> dict:
    """Median |QC-FC|, share of edges with p < 0.05, and QC-FC's dependence on distance."""
    out = {"median_abs": float(np.median(np.abs(r))), "fraction_p05": float(np.mean(p < 0.05))}
    if distances is not None:
        out["distance_rho"] = float(stats.spearmanr(distances, r).statistic)
    return out


def fd_coupling(timeseries: np.ndarray, fd, sample_mask=None) -> float:
    """Mean absolute correlation between FD and each region's signal (within a subject).

    A subject-level view of the motion artefact: 0 when region signals ignore the head's
    movement. ``fd`` is the full-length trace; ``sample_mask`` selects the volumes that
    the time series kept.
    """
    fd = np.nan_to_num(np.asarray(fd, dtype=float))
    if sample_mask is not None:
        fd = fd[np.asarray(sample_mask)]
    if len(fd) != len(timeseries):
        raise ValueError("fd and timeseries must cover the same volumes")
    if fd.std() == 0:
        return 0.0
    z_fd = (fd - fd.mean()) / fd.std()
    ts = np.asarray(timeseries, dtype=float)
    z_ts = (ts - ts.mean(0)) / np.where(ts.std(0) > 0, ts.std(0), 1)
    return float(np.mean(np.abs(z_fd @ z_ts / len(fd))))
