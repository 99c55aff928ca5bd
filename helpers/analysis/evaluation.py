"""A whole analysis arm (raw or preprocessed) and its summary against the truth.

:func:`analyze_runs` extracts region signals, computes the matrices and scores each run, so
notebook 04 can compare arms with exactly the same code; :func:`summarize` writes the
numbers of ``connectivity_summary.json``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from helpers.analysis.denoising import strategy_table, winners
from helpers.analysis.motion_qc import fd_coupling, qcfc, qcfc_summary
from helpers.analysis.connectome import (connectivity_matrices, fisher_z, matrix_error,
                                       network_recovery)
from helpers.analysis.timeseries import region_timeseries

__all__ = ["AnalysisResult", "analyze_runs", "summarize", "write_summary"]


@dataclass
class AnalysisResult:
    """Time series, matrices and scores of one analysis arm ("raw" or "preproc")."""

    arm: str
    subjects: list
    timeseries: list
    matrices: np.ndarray
    mean_fd: np.ndarray
    kept: list
    per_subject: pd.DataFrame = field(default_factory=pd.DataFrame)


def analyze_runs(images: list, fd_traces: list, labels_img, *, tr: float, arm: str,
                 subjects: list, confounds: list | None = None, sample_masks: list | None = None,
                 true_connectivity=None, true_networks=None, low_pass=0.1, high_pass=0.01,
                 seed: int = 0) -> AnalysisResult:
    """Extract region signals, compute correlation matrices and score them for each run.

    Parameters
    ----------
    images : list of str, Path or Nifti1Image
        One 4D run per subject.
    fd_traces : list of (T,) array
        Framewise displacement of each run (mm), used for mean FD and :func:`fd_coupling`.
    labels_img :
        Parcellation.
    tr : float
        Repetition time (s).
    arm : str
        A name for this analysis ("raw", "preproc").
    subjects : list of str
    confounds, sample_masks : list, optional
        Per-run regressors and kept volumes (None: no regression, no scrubbing).
    true_connectivity : (R, R) array, optional
        True matrix; enables ``matrix_error``.
    true_networks : sequence, optional
        True network of each region; enables ``ari``.
    low_pass, high_pass : float or None
        Band-pass (Hz).
    seed : int
        Seed of the community detection.

    Returns
    -------
    AnalysisResult
        ``per_subject`` has columns ``subject``, ``mean_fd``, ``kept_volumes``,
        ``fd_coupling``, ``matrix_error``, ``ari``.
    """
    n = len(images)
    confounds = confounds or [None] * n
    sample_masks = sample_masks or [None] * n
    series = [region_timeseries(img, labels_img, tr=tr, confounds=conf, sample_mask=mask,
                                low_pass=low_pass, high_pass=high_pass)
              for img, conf, mask in zip(images, confounds, sample_masks)]
    matrices = connectivity_matrices(series)
    mean_fd = np.array([np.nanmean(fd) for fd in fd_traces])
    rows = []
    for k in range(n):
        row = {"subject": subjects[k], "mean_fd": mean_fd[k], "kept_volumes": len(series[k]),
               "fd_coupling": fd_coupling(series[k], fd_traces[k], sample_masks[k])}
        row["matrix_error"] = (matrix_error(matrices[k], true_connectivity)
                               if true_connectivity is not None else np.nan)
        row["ari"] = (network_recovery(matrices[k], true_networks, seed=seed)
                      if true_networks is not None else np.nan)
        rows.append(row)
    return AnalysisResult(arm=arm, subjects=list(subjects), timeseries=series, matrices=matrices,
                          mean_fd=mean_fd, kept=[len(s) for s in series],
                          per_subject=pd.DataFrame(rows))


def _group_matrix(matrices: np.ndarray) -> np.ndarray:
    """Group-average correlation: mean Fisher z, back-transformed."""
    group = np.tanh(fisher_z(matrices).mean(0))
    np.fill_diagonal(group, 1.0)
    return group


def _none_if_nan(value):
    """JSON-friendly number: NaN becomes None."""
    value = float(value)
    return None if np.isnan(value) else round(value, 4)


def summarize(results: dict, *, distances=None, true_connectivity=None, true_networks=None,
              seed: int = 0, strategies: dict | None = None,
              noise_ceiling: dict | None = None) -> dict:
    """The summary written to ``connectivity_summary.json``.

    Parameters
    ----------
    results : dict
        Arm name ("raw", "preproc") -> :class:`AnalysisResult` (same subjects in both).
    distances : (n_edges,) array, optional
        Inter-region distances (mm) for QC-FC's distance dependence.
    true_connectivity, true_networks : optional
        Ground truth, for the group matrix's error and ARI.
    strategies : dict, optional
        Strategy name -> :class:`helpers.analysis.denoising.StrategyResult`; written as
        ``strategies`` {name: {qcfc_fraction_p05, qcfc_median_abs, qcfc_distance_rho,
        tdof_loss, matrix_error}} with ``winners`` (best strategy per metric).
    noise_ceiling : dict, optional
        :func:`helpers.analysis.denoising.noise_ceiling`, written as ``noise_ceiling``.

    Returns
    -------
    dict
        ``{subject: {"ari": {arm: ...}, "matrix_error": {...}, "fd_coupling": {...}, ...},
        "group": {...}, "definitions": {...}}`` (+ ``strategies``, ``winners`` and
        ``noise_ceiling`` when given). Per subject, ``fd_coupling`` is the within-subject
        FD coupling (:func:`fd_coupling`); under ``group``, ``qcfc`` is the median absolute
        QC-FC across edges. Group ``ari`` and ``matrix_error`` are means over subjects.
    """
    arms = list(results)
    summary: dict = {}
    first = results[arms[0]]
    for k, subject in enumerate(first.subjects):
        entry = {}
        for key, column in (("ari", "ari"), ("matrix_error", "matrix_error"),
                            ("fd_coupling", "fd_coupling")):
            entry[key] = {arm: _none_if_nan(results[arm].per_subject[column].iloc[k])
                          for arm in arms}
        entry["mean_fd"] = _none_if_nan(first.mean_fd[k])
        entry["kept_volumes"] = {arm: int(results[arm].kept[k]) for arm in arms}
        summary[subject] = entry
    group: dict = {"ari": {}, "matrix_error": {}, "fd_coupling": {}, "qcfc": {},
                   "qcfc_fraction_p05": {},
                   "qcfc_distance_rho": {}, "ari_group_matrix": {}, "matrix_error_group_matrix": {}}
    for arm in arms:
        res = results[arm]
        group["ari"][arm] = _none_if_nan(res.per_subject["ari"].mean())
        group["matrix_error"][arm] = _none_if_nan(res.per_subject["matrix_error"].mean())
        group["fd_coupling"][arm] = _none_if_nan(res.per_subject["fd_coupling"].mean())
        if len(res.subjects) >= 3:
            r, p = qcfc(res.matrices, res.mean_fd)
            qc = qcfc_summary(r, p, distances)
            group["qcfc"][arm] = round(qc["median_abs"], 4)
            group["qcfc_fraction_p05"][arm] = round(qc["fraction_p05"], 4)
            group["qcfc_distance_rho"][arm] = round(qc.get("distance_rho", np.nan), 4)
        else:
            group["qcfc"][arm] = None
        average = _group_matrix(res.matrices)
        group["ari_group_matrix"][arm] = (
            _none_if_nan(network_recovery(average, true_networks, seed=seed))
            if true_networks is not None else None)
        group["matrix_error_group_matrix"][arm] = (
            _none_if_nan(matrix_error(average, true_connectivity))
            if true_connectivity is not None else None)
    group["n_subjects"] = len(first.subjects)
    summary["group"] = group
    if strategies:
        summary["strategies"] = {name: {k: _none_if_nan(v) for k, v in res.scores.items()}
                                 for name, res in strategies.items()}
        summary["winners"] = winners(strategy_table(strategies))
    if noise_ceiling:
        summary["noise_ceiling"] = {k: _none_if_nan(v) for k, v in noise_ceiling.items()}
    summary["definitions"] = {
        "ari": "adjusted Rand index, Louvain communities of the correlation matrix vs true "
               "networks",
        "matrix_error": "RMS difference between estimated and true correlation (off-diagonal)",
        "fd_coupling": "per subject: mean |corr(FD, region signal)| over regions",
        "qcfc": "median |QC-FC| over edges (corr across subjects of mean FD with Fisher-z "
                "edge strength; Power 2012, Ciric 2017)",
        "strategies": "per denoising strategy: qcfc_fraction_p05 (share of edges with QC-FC "
                      "p < 0.05), qcfc_median_abs, qcfc_distance_rho (Spearman rho of QC-FC "
                      "with inter-region distance), tdof_loss (regressors + censored "
                      "volumes, mean over subjects), matrix_error (mean RMS error vs truth)",
        "noise_ceiling": "matrix_error of the noise-free motion-free signals (signals) and "
                         "of the motion-free noisy twins without regression (nomotion)",
        "group": "ari and matrix_error are means over subjects; *_group_matrix use the "
                 "group-average matrix",
    }
    return summary


def write_summary(summary: dict, path) -> Path:
    """Write the summary as indented JSON (creating the folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=2))
    return path
