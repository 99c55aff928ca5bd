"""Denoising strategies compared as Ciric et al. (2017) and Parkes et al. (2018) do.

A strategy is a set of fMRIPrep confound columns (read with
:func:`nilearn.interfaces.fmriprep.load_confounds`) plus, for scrubbing, a censoring rule.
:func:`compare_strategies` cleans every subject's region signals with each strategy and
scores it on the benchmarks of those papers:

* **QC-FC**: the share of edges whose across-subject correlation with mean FD has
  p < 0.05, and the median |QC-FC| (:func:`helpers.analysis.motion_qc.qcfc`);
* **QC-FC distance dependence**: Spearman's rho between QC-FC and inter-region distance;
* **tDOF-loss**: regressors plus censored volumes, mean over subjects;
* **error against the truth**: RMS difference from the true correlation matrix, read
  against a noise ceiling (:func:`noise_ceiling`) - what an analysis without any motion or
  noise would still get wrong, from sampling alone.

Region means are extracted once per subject (``NiftiLabelsMasker`` without cleaning) and
cleaned per strategy with :func:`nilearn.signal.clean`, which is what the masker does
internally after averaging: the results are the masker's, at a fraction of the cost.

References
----------
.. [1] Ciric R, Wolf DH, Power JD, et al. (2017). Benchmarking of participant-level confound
   regression strategies for the control of motion artifact in studies of functional
   connectivity. NeuroImage 154:174-187. :doi:`10.1016/j.neuroimage.2017.03.020`
.. [2] Parkes L, Fulcher B, Yücel M, Fornito A (2018). An evaluation of the efficacy,
   reliability, and sensitivity of motion correction strategies for resting-state
   functional MRI. NeuroImage 171:415-436. :doi:`10.1016/j.neuroimage.2017.12.073`
.. [3] Satterthwaite TD, Elliott MA, Gerraty RT, et al. (2013). An improved framework for
   confound regression and filtering for control of motion artifact in the preprocessing
   of resting-state functional connectivity data. NeuroImage 64:240-256.
   :doi:`10.1016/j.neuroimage.2012.08.052`
.. [4] Power JD, Mitra A, Laumann TO, Snyder AZ, Schlaggar BL, Petersen SE (2014). Methods
   to detect, characterize, and remove motion artifact in resting state fMRI. NeuroImage
   84:320-341. :doi:`10.1016/j.neuroimage.2013.08.048`
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from fmri_preproc.contract import FRAMEWISE_DISPLACEMENT
from helpers.analysis.connectome import connectivity_matrices, matrix_error
from helpers.analysis.motion_qc import qcfc, qcfc_summary

__all__ = ["Strategy", "STRATEGIES", "censor_mask", "strategy_confounds", "clean_signals",
           "region_means", "StrategyResult", "included_subjects", "compare_strategies", "noise_ceiling",
           "strategy_table", "winners", "lesson"]


@dataclass(frozen=True)
class Strategy:
    """A denoising strategy.

    Attributes
    ----------
    name : str
    confounds : dict
        Keyword arguments of ``load_confounds`` (``strategy=...`` and its options); empty
        for no regression.
    scrub : bool
        Censor high-motion volumes (:func:`censor_mask`).
    description : str
    """

    name: str
    confounds: dict = field(default_factory=dict)
    scrub: bool = False
    description: str = ""


#: The strategies of notebook 04. Drifts are removed by the same band-pass in every strategy
#: (nilearn filters the confounds with the signals); the aCompCor strategies also take the
#: cosine columns, because the components were computed after that high-pass (nilearn
#: requires them with ``compcor``).
STRATEGIES = {s.name: s for s in (
    Strategy("none", {}, False, "no regression (band-pass only)"),
    Strategy("24P+scrub", {"strategy": ("motion",), "motion": "full"}, True,
             "6 motion parameters, derivatives, squares (Satterthwaite 2013) + censoring "
             "(Power 2014)"),
    Strategy("36P", {"strategy": ("motion", "wm_csf", "global_signal"), "motion": "full",
                     "wm_csf": "full", "global_signal": "full"}, False,
             "24P + WM, CSF and global signal with derivatives and squares (Ciric 2017)"),
    Strategy("aCompCor", {"strategy": ("motion", "high_pass", "compcor"), "motion": "derivatives",
                          "compcor": "anat_combined", "n_compcor": "all"}, False,
             "12 motion (parameters + derivatives) + aCompCor (WM+CSF, 50 % variance; "
             "Behzadi 2007, Muschelli 2014)"),
    Strategy("aCompCor+GSR", {"strategy": ("motion", "high_pass", "compcor",
                                           "global_signal"),
                              "motion": "derivatives", "compcor": "anat_combined",
                              "n_compcor": "all", "global_signal": "basic"}, False,
             "aCompCor + the global signal (Parkes 2018)"),
)}


def censor_mask(fd, threshold: float, *, before: int = 1, after: int = 2,
                min_segment: int = 5) -> np.ndarray | None:
    """Indices of the volumes kept after censoring high-motion volumes.

    A volume with FD > ``threshold`` is censored together with ``before`` volumes before
    it and ``after`` after it (Power et al. 2014 censor 1 before and 2 after, because a
    movement's signal change outlasts the volume in which it happens); kept segments
    shorter than ``min_segment`` volumes are censored too.

    Parameters
    ----------
    fd : (T,) array
        Framewise displacement (mm); the first value (n/a) counts as 0.
    threshold : float
        mm.

    Returns
    -------
    ndarray of int or None
        Kept volume indices; None when nothing is censored.
    """
    fd = np.nan_to_num(np.asarray(fd, dtype=float))
    bad = np.zeros(len(fd), dtype=bool)
    for t in np.flatnonzero(fd > threshold):
        bad[max(0, t - before): t + after + 1] = True
    keep = ~bad
    edges = np.flatnonzero(np.diff(np.r_[0, keep.astype(int), 0]))
    for start, stop in zip(edges[::2], edges[1::2]):
        if stop - start < min_segment:
            keep[start:stop] = False
    return None if keep.all() else np.flatnonzero(keep)


def strategy_confounds(preproc_path, strategy: Strategy, *, fd_threshold: float = 0.5):
    """The regressors and kept volumes of one run under ``strategy``.

    The regressors come from ``nilearn.interfaces.fmriprep.load_confounds`` on the run's
    confounds TSV; the censoring from :func:`censor_mask` on its FD column (nilearn's
    own ``scrub`` censors no neighbours).

    Returns
    -------
    confounds : pandas.DataFrame or None
    sample_mask : ndarray of int or None
    """
    from nilearn.interfaces.fmriprep import load_confounds

    from helpers.analysis.derivatives import read_confounds

    confounds = None
    if strategy.confounds:
        confounds, _ = load_confounds(str(preproc_path), **strategy.confounds)
    sample_mask = None
    if strategy.scrub:
        table = read_confounds(_confounds_path(preproc_path))
        sample_mask = censor_mask(table[FRAMEWISE_DISPLACEMENT], fd_threshold)
    return confounds, sample_mask


def _confounds_path(preproc_path):
    """The confounds TSV beside a ``*_desc-preproc_bold.nii.gz`` (fMRIPrep's naming)."""
    from pathlib import Path

    from fmri_preproc.contract import parse_bids_name

    path = Path(preproc_path)
    name = parse_bids_name(path.name).with_entities(space=None, res=None, desc="confounds",
                                                    suffix="timeseries", extension=".tsv")
    return path.with_name(str(name))


def region_means(img, labels_img) -> np.ndarray:
    """Mean signal of each region per volume, uncleaned (``NiftiLabelsMasker`` defaults).

    Returns
    -------
    (T, R) ndarray
    """
    from nilearn.maskers import NiftiLabelsMasker

    # standardize=None: the means in scanner units (cleaning comes later, per strategy)
    masker = NiftiLabelsMasker(labels_img, standardize=None, keep_masked_labels=False)
    return masker.fit_transform(img)


def clean_signals(means: np.ndarray, *, tr: float, confounds=None, sample_mask=None,
                  low_pass: float | None = 0.1, high_pass: float | None = 0.01) -> np.ndarray:
    """Clean region means as ``NiftiLabelsMasker`` would: detrend, censor, band-pass,
    regress the (equally filtered) confounds, z-score (:func:`nilearn.signal.clean`)."""
    from nilearn.signal import clean

    conf = None if confounds is None else np.asarray(confounds, dtype=float)
    return clean(np.asarray(means, dtype=float), detrend=True, standardize="zscore_sample",
                 confounds=conf, sample_mask=sample_mask, low_pass=low_pass,
                 high_pass=high_pass, t_r=tr)


@dataclass
class StrategyResult:
    """One strategy's matrices and scores across the included subjects."""

    strategy: str
    matrices: np.ndarray
    per_subject: pd.DataFrame
    scores: dict
    included: np.ndarray = None  # (n_subjects,) bool: the subjects scored


def included_subjects(fd_traces: list, fd_threshold: float, *,
                      min_kept_fraction: float = 0.5) -> np.ndarray:
    """Subjects that keep at least ``min_kept_fraction`` of their volumes after censoring.

    Parkes et al. (2018) exclude subjects whom censoring leaves too little data: with
    fewer volumes than regressors the regression fits noise perfectly, and a subject's
    matrix then tracks how much was censored (hence motion) rather than the brain. The
    same subjects are used for every strategy, so the comparison stays paired.

    Returns
    -------
    (n_subjects,) bool ndarray
    """
    keep = []
    for fd in fd_traces:
        mask = censor_mask(fd, fd_threshold)
        kept = len(fd) if mask is None else len(mask)
        keep.append(kept >= min_kept_fraction * len(fd))
    return np.array(keep)


def _score(matrices, mean_fd, distances, true_matrix) -> dict:
    """QC-FC, its distance dependence, and the mean matrix error."""
    scores = {}
    if len(matrices) >= 3:
        r, p = qcfc(matrices, mean_fd)
        qc = qcfc_summary(r, p, distances)
        scores.update(qcfc_fraction_p05=qc["fraction_p05"], qcfc_median_abs=qc["median_abs"],
                      qcfc_distance_rho=qc.get("distance_rho", np.nan))
    if true_matrix is not None:
        scores["matrix_error"] = float(np.mean([matrix_error(m, true_matrix)
                                                for m in matrices]))
    return scores


def compare_strategies(means: list, preproc_paths: list, fd_traces: list, *, tr: float,
                       strategies=None, distances=None, true_matrix=None,
                       fd_threshold: float = 0.5, min_kept_fraction: float = 0.5,
                       low_pass=0.1, high_pass=0.01) -> dict:
    """Clean every subject with every strategy and score each strategy.

    Parameters
    ----------
    means : list of (T, R) ndarray
        Uncleaned region means per subject (:func:`region_means`).
    preproc_paths : list
        Each subject's ``*_desc-preproc_bold.nii.gz`` (its confounds beside it).
    fd_traces : list of (T,) array
        Framewise displacement per subject (mm).
    tr : float
        s.
    strategies : iterable of Strategy, optional
        Default: :data:`STRATEGIES`.
    distances : (n_edges,) array, optional
        Inter-region distances (mm), for QC-FC's distance dependence.
    true_matrix : (R, R) array, optional
        True correlation matrix, for ``matrix_error``.
    fd_threshold : float
        Censoring threshold (mm) of scrubbing strategies.
    min_kept_fraction : float
        Subjects whom censoring would leave less than this share of their volumes are left
        out of every strategy (:func:`included_subjects`).

    Returns
    -------
    dict of str to StrategyResult
        ``scores``: ``qcfc_fraction_p05``, ``qcfc_median_abs``, ``qcfc_distance_rho``,
        ``tdof_loss`` (regressors + censored volumes, mean over subjects) and
        ``matrix_error`` (mean over subjects).
    """
    strategies = list(STRATEGIES.values()) if strategies is None else list(strategies)
    included = included_subjects(fd_traces, fd_threshold, min_kept_fraction=min_kept_fraction)
    means = [m for m, ok in zip(means, included) if ok]
    preproc_paths = [p for p, ok in zip(preproc_paths, included) if ok]
    fd_traces = [f for f, ok in zip(fd_traces, included) if ok]
    mean_fd = np.array([np.nanmean(fd) for fd in fd_traces])
    results = {}
    for strategy in strategies:
        series, rows = [], []
        for signal, path in zip(means, preproc_paths):
            conf, keep = strategy_confounds(path, strategy, fd_threshold=fd_threshold)
            series.append(clean_signals(signal, tr=tr, confounds=conf, sample_mask=keep,
                                        low_pass=low_pass, high_pass=high_pass))
            n_censored = 0 if keep is None else len(signal) - len(keep)
            n_regressors = 0 if conf is None else conf.shape[1]
            rows.append({"regressors": n_regressors, "censored": n_censored,
                         "tdof_loss": n_regressors + n_censored})
        matrices = connectivity_matrices(series)
        table = pd.DataFrame(rows)
        table["mean_fd"] = mean_fd
        if true_matrix is not None:
            table["matrix_error"] = [matrix_error(m, true_matrix) for m in matrices]
        scores = _score(matrices, mean_fd, distances, true_matrix)
        scores["tdof_loss"] = float(table["tdof_loss"].mean())
        results[strategy.name] = StrategyResult(strategy.name, matrices, table, scores,
                                                included)
    return results


def noise_ceiling(true_signals: list, twin_means: list, true_matrix, *, tr: float,
                  low_pass=0.1, high_pass=0.01) -> dict:
    """The best achievable matrix error, from the simulation's own signals.

    Parameters
    ----------
    true_signals : list of (T, R) array
        Noise-free, motion-free region signals (``truth/*_signals.tsv``).
    twin_means : list of (T, R) array
        Region means of the motion-free noisy twins (``truth/*_desc-nomotion_bold``).
    true_matrix : (R, R) array

    Returns
    -------
    dict
        ``signals``: mean error of the noise-free signals (sampling error only: a finite
        run's correlations scatter about the population's); ``nomotion``: mean error of
        the motion-free twins with no regression (sampling + physiological and thermal
        noise). Both after the same band-pass as the strategies.
    """
    def error(series_list):
        cleaned = [clean_signals(s, tr=tr, low_pass=low_pass, high_pass=high_pass)
                   for s in series_list]
        return float(np.mean([matrix_error(m, true_matrix)
                              for m in connectivity_matrices(cleaned)]))

    return {"signals": error(true_signals), "nomotion": error(twin_means)}


#: The benchmark metrics; lower is better for all (|rho| for the distance dependence).
METRICS = ("qcfc_fraction_p05", "qcfc_median_abs", "qcfc_distance_rho", "tdof_loss",
           "matrix_error")


def strategy_table(results: dict) -> pd.DataFrame:
    """Strategies as rows, metrics as columns (``qcfc_distance_rho`` as |rho|: 0 is best)."""
    table = pd.DataFrame({name: res.scores for name, res in results.items()}).T
    return table.reindex(columns=list(METRICS))  # a metric without its input stays NaN


def winners(table: pd.DataFrame) -> dict:
    """The best strategy per metric: lowest value (lowest |rho| for the distance
    dependence)."""
    best = {}
    for metric in table.columns[table.notna().any()]:
        values = table[metric].abs() if metric == "qcfc_distance_rho" else table[metric]
        best[metric] = str(values.idxmin())
    return best


def lesson(table: pd.DataFrame, *, raw: dict | None = None,
           ceiling: dict | None = None) -> tuple[str, dict]:
    """What the numbers say, as sentences built from them (and the claims, for tests).

    Parameters
    ----------
    table : pandas.DataFrame
        :func:`strategy_table` of the preprocessed runs.
    raw : dict, optional
        Scores of the raw runs analysed with no regression (a ``StrategyResult.scores``).
    ceiling : dict, optional
        :func:`noise_ceiling`.

    Returns
    -------
    text : str
        Markdown.
    claims : dict
        ``winners`` (metric -> strategy), ``preproc_beats_raw_error`` and
        ``preproc_beats_raw_qcfc`` (the best strategy against raw; None without raw),
        ``error_over_ceiling`` (strategy -> error / ceiling).
    """
    best = winners(table)
    claims: dict = {"winners": best, "preproc_beats_raw_error": None,
                    "preproc_beats_raw_qcfc": None, "error_over_ceiling": {}}
    lines = [f"* **{metric}**: best is **{name}** ({table.loc[name, metric]:.3g})"
             for metric, name in best.items()]
    if raw is not None and "matrix_error" in raw and "qcfc_fraction_p05" in raw:
        err = table["matrix_error"].min()
        qc = table["qcfc_fraction_p05"].min()
        claims["preproc_beats_raw_error"] = bool(err < raw["matrix_error"])
        claims["preproc_beats_raw_qcfc"] = bool(qc < raw["qcfc_fraction_p05"])
        lines.append(
            f"* Against the raw runs (no realignment, no regression; error "
            f"{raw['matrix_error']:.3f}, QC-FC p < 0.05 on {100 * raw['qcfc_fraction_p05']:.1f} "
            f"% of edges): the best preprocessed error ({err:.3f}) is "
            f"{'lower' if claims['preproc_beats_raw_error'] else 'not lower'}, and the best "
            f"QC-FC ({100 * qc:.1f} %) is "
            f"{'lower' if claims['preproc_beats_raw_qcfc'] else 'not lower'}.")
    if ceiling:
        ratios = (table["matrix_error"] / ceiling["signals"]).to_dict()
        claims["error_over_ceiling"] = {k: float(v) for k, v in ratios.items()}
        lines.append(
            f"* Noise ceiling: noise-free signals reach an error of {ceiling['signals']:.3f} "
            f"(sampling alone), the motion-free noisy twins {ceiling['nomotion']:.3f}. The "
            "strategies' errors are " + ", ".join(
                f"{k} {v:.2f}x" for k, v in ratios.items()) + " the best achievable.")
    return "\n".join(lines), claims
