"""Functional connectivity from preprocessed runs, and how well it recovers the truth.

The analysis side of the workbook, built on nilearn: maskers extract region time series
(with confound regression, scrubbing and band-pass filtering in one step),
:class:`nilearn.connectome.ConnectivityMeasure` computes the matrices, networkx finds
communities, and a few small functions measure what motion did:

* :func:`matrix_error` - distance between an estimated and the true correlation matrix;
* :func:`network_recovery` - adjusted Rand index between detected and true networks;
* :func:`qcfc` - QC-FC, the across-subject correlation between mean framewise
  displacement and each edge (Power et al. 2012; Ciric et al. 2017);
* :func:`fd_coupling` - a within-subject analogue: how strongly region signals follow FD.

:func:`analyze_runs` runs the whole pipeline for a list of runs, so notebook 04 can compare
raw and preprocessed data with exactly the same code.
"""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

__all__ = [
    "find_runs",
    "load_motion_confounds",
    "read_confounds",
    "relative_motion",
    "reference_volume",
    "region_timeseries",
    "sphere_timeseries",
    "connectivity_matrices",
    "fisher_z",
    "detect_communities",
    "network_recovery",
    "matrix_error",
    "qcfc",
    "qcfc_summary",
    "region_distances",
    "fd_coupling",
    "group_edge_test",
    "data_driven_labels",
    "region_coordinates",
    "AnalysisResult",
    "analyze_runs",
    "summarize",
    "write_summary",
]

MOTION_COLUMNS = ["trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z"]


# --------------------------------------------------------------------------------------
# Files


def _run_name(path: Path) -> str:
    """``sub-01_task-rest`` from any of a run's file names."""
    name = Path(path).name
    for tail in ("_desc-preproc_bold", "_desc-confounds_timeseries", "_error", "_bold"):
        if tail in name:
            return name.split(tail)[0]
    raise ValueError(f"{name} is not a BIDS-style run file")


def find_runs(derivatives_dir, raw_dir=None) -> pd.DataFrame:
    """Table of the runs found in a derivatives folder (and their raw inputs).

    Parameters
    ----------
    derivatives_dir : str or Path
        Folder with ``<name>_desc-preproc_bold.nii.gz``, ``<name>_desc-confounds_timeseries.tsv``,
        ``<name>_desc-preproc_bold.json`` and, for failed inputs, ``<name>_error.json``
        (searched recursively).
    raw_dir : str or Path, optional
        Folder with the inputs ``<name>_bold.nii.gz``.

    Returns
    -------
    pandas.DataFrame
        One row per run name, sorted: ``name``, ``subject``, ``preproc``, ``confounds``,
        ``sidecar``, ``error`` and ``raw`` (paths, or None when missing), ``ok`` (True when
        the preprocessed image and confounds are both present and no error was written).
    """
    derivatives_dir = Path(derivatives_dir)
    kinds = {"preproc": "*_desc-preproc_bold.nii.gz",
             "confounds": "*_desc-confounds_timeseries.tsv",
             "sidecar": "*_desc-preproc_bold.json", "error": "*_error.json"}
    rows: dict[str, dict] = {}
    for kind, pattern in kinds.items():
        for path in sorted(derivatives_dir.rglob(pattern)):
            rows.setdefault(_run_name(path), {})[kind] = path
    if raw_dir is not None:
        for path in sorted(Path(raw_dir).glob("*_bold.nii.gz")):
            rows.setdefault(_run_name(path), {})["raw"] = path
    table = pd.DataFrame([{"name": name, **paths} for name, paths in sorted(rows.items())],
                         columns=["name", *kinds, "raw"])
    table = table.astype(object).where(table.notna(), None)
    table.insert(1, "subject", table["name"].str.split("_").str[0])
    table["ok"] = table["preproc"].notna() & table["confounds"].notna() & table["error"].isna()
    return table


def read_confounds(path) -> pd.DataFrame:
    """Read an fMRIPrep-style confounds TSV (``n/a`` becomes NaN)."""
    return pd.read_csv(path, sep="\t", na_values=["n/a"])


def load_motion_confounds(preproc_path, *, fd_threshold: float = 0.5,
                          std_dvars_threshold: float = 1.5, scrub: int = 5):
    """24 motion regressors and the scrubbing mask of a run, via nilearn's fMRIPrep reader.

    Parameters
    ----------
    preproc_path : str or Path
        The ``*_desc-preproc_bold.nii.gz`` file; its confounds TSV must sit beside it.
    fd_threshold : float
        Framewise displacement (mm) above which a volume is censored.
    std_dvars_threshold : float
        Standardized DVARS above which a volume is censored.
    scrub : int
        Also censor kept segments shorter than this many volumes (nilearn's default, 5).

    Returns
    -------
    confounds : pandas.DataFrame
        The six parameters, their temporal derivatives, and the squares of both (24).
    sample_mask : ndarray of int or None
        Indices of the volumes kept (None when none is censored).

    Notes
    -----
    This calls :func:`nilearn.interfaces.fmriprep.load_confounds` with
    ``strategy=("motion", "scrub")`` and ``motion="full"``: the 24-parameter model of
    Friston et al. (1996) with motion censoring ("scrubbing", Power et al. 2014).
    """
    from nilearn.interfaces.fmriprep import load_confounds

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        confounds, sample_mask = load_confounds(
            str(preproc_path), strategy=("motion", "scrub"), motion="full", scrub=scrub,
            fd_threshold=fd_threshold, std_dvars_threshold=std_dvars_threshold)
    return confounds, sample_mask


def reference_volume(sidecar_path, n_volumes: int) -> int:
    """Index of the engine's motion reference volume, read from the run's JSON sidecar.

    Looks for a key containing "reference" with an integer (or "first"/"middle") value;
    falls back to the middle volume.
    """
    def search(obj):
        if isinstance(obj, dict):
            for key, value in obj.items():
                if "reference" in key.lower() and isinstance(value, (int, str)):
                    return value
                found = search(value)
                if found is not None:
                    return found
        return None

    value = None
    if sidecar_path is not None and Path(sidecar_path).exists():
        value = search(json.loads(Path(sidecar_path).read_text()))
    if isinstance(value, int) and not isinstance(value, bool):
        return value % n_volumes
    if value == "first":
        return 0
    return n_volumes // 2


def relative_motion(motion: np.ndarray, affine: np.ndarray, shape, reference: int) -> np.ndarray:
    """Express true motion relative to another reference volume.

    With ``M_t`` the true matrix of volume ``t`` (reference point -> moving point), the
    motion of volume ``t`` seen from volume ``r`` is ``M_t M_r^-1``; this is what a
    realignment to volume ``r`` should estimate.

    Parameters
    ----------
    motion : (T, 6) ndarray
        True parameters (mm, radians), engine convention.
    affine, shape :
        The run's affine and shape.
    reference : int
        Index of the new reference volume.

    Returns
    -------
    (T, 6) ndarray
    """
    from fmri_preproc import affine_to_params, params_to_affine

    motion = np.asarray(motion, dtype=float)
    inv_ref = np.linalg.inv(params_to_affine(motion[reference], affine, shape))
    return np.array([affine_to_params(params_to_affine(p, affine, shape) @ inv_ref, affine, shape)
                     for p in motion])


# --------------------------------------------------------------------------------------
# Time series and matrices


def _clean_kwargs(tr: float, low_pass, high_pass) -> dict:
    """Masker options shared by every extraction: detrend, band-pass, z-score."""
    return {"detrend": True, "standardize": "zscore_sample", "low_pass": low_pass,
            "high_pass": high_pass, "t_r": tr}


def region_timeseries(img, labels_img, *, tr: float, confounds=None, sample_mask=None,
                      low_pass: float | None = 0.1, high_pass: float | None = 0.01) -> np.ndarray:
    """Mean signal of each labelled region, cleaned.

    Parameters
    ----------
    img : str, Path or Nifti1Image
        4D run.
    labels_img : str, Path or Nifti1Image
        Integer labels (0 = background).
    tr : float
        Repetition time (s), needed by the band-pass filter.
    confounds : DataFrame or ndarray, optional
        Regressors removed from the signals (orthogonally to the filter).
    sample_mask : ndarray, optional
        Indices of the volumes to keep (scrubbing).
    low_pass, high_pass : float or None
        Band-pass cut-offs (Hz).

    Returns
    -------
    (T_kept, R) ndarray
        One column per label, in increasing label order, z-scored.
    """
    from nilearn.maskers import NiftiLabelsMasker

    masker = NiftiLabelsMasker(labels_img, **_clean_kwargs(tr, low_pass, high_pass),
                               keep_masked_labels=False)
    return masker.fit_transform(img, confounds=confounds, sample_mask=sample_mask)


def sphere_timeseries(img, coords, *, tr: float, radius: float = 6.0, confounds=None,
                      sample_mask=None, low_pass: float | None = 0.1,
                      high_pass: float | None = 0.01) -> np.ndarray:
    """Mean signal in a sphere around each coordinate (mm), cleaned as in :func:`region_timeseries`.
    """
    from nilearn.maskers import NiftiSpheresMasker

    # overlapping spheres are allowed: centres of neighbouring parcels can be close
    masker = NiftiSpheresMasker(np.asarray(coords, dtype=float), radius=radius, allow_overlap=True,
                                **_clean_kwargs(tr, low_pass, high_pass))
    return masker.fit_transform(img, confounds=confounds, sample_mask=sample_mask)


def connectivity_matrices(timeseries: list, kind: str = "correlation") -> np.ndarray:
    """Correlation (or partial correlation) matrices, one per subject.

    Uses :class:`nilearn.connectome.ConnectivityMeasure` with the plain sample covariance
    (:class:`sklearn.covariance.EmpiricalCovariance`) for ``"correlation"``, so values can be
    compared with the true matrix; nilearn's default Ledoit-Wolf estimator shrinks every
    correlation towards zero. Partial correlations keep Ledoit-Wolf, because inverting a
    noisy covariance is unstable.

    Parameters
    ----------
    timeseries : list of (T, R) ndarray
    kind : {"correlation", "partial correlation"}

    Returns
    -------
    (n_subjects, R, R) ndarray
    """
    from nilearn.connectome import ConnectivityMeasure
    from sklearn.covariance import EmpiricalCovariance, LedoitWolf

    if kind == "correlation":
        estimator = EmpiricalCovariance()
    else:
        estimator = LedoitWolf(store_precision=False)
    measure = ConnectivityMeasure(kind=kind, cov_estimator=estimator, standardize="zscore_sample")
    return measure.fit_transform(list(timeseries))


def fisher_z(matrix: np.ndarray) -> np.ndarray:
    """Fisher's z = arctanh(r), with the diagonal set to 0 (arctanh(1) is infinite)."""
    matrix = np.array(matrix, dtype=float)
    diag = np.eye(matrix.shape[-1], dtype=bool)
    matrix[..., diag] = 0.0
    return np.arctanh(np.clip(matrix, -0.999999, 0.999999))


def _upper(matrix: np.ndarray) -> np.ndarray:
    """Upper-triangle values (without the diagonal) of one or many matrices."""
    rows, cols = np.triu_indices(matrix.shape[-1], k=1)
    return matrix[..., rows, cols]


def matrix_error(matrix: np.ndarray, truth: np.ndarray) -> float:
    """Root-mean-square difference between two correlation matrices (off-diagonal edges).

    Parameters
    ----------
    matrix, truth : (R, R) ndarray
        Correlation coefficients (r, not z).

    Returns
    -------
    float
    """
    matrix, truth = np.asarray(matrix), np.asarray(truth)
    if matrix.shape != truth.shape:
        raise ValueError(f"matrix {matrix.shape} and truth {truth.shape} must have the same shape")
    return float(np.sqrt(np.mean((_upper(matrix) - _upper(truth)) ** 2)))


def detect_communities(matrix: np.ndarray, *, density: float | None = 0.2, seed: int = 0,
                       resolution: float = 1.0, n_runs: int = 20) -> np.ndarray:
    """Communities of a correlation matrix by Louvain modularity maximisation.

    The graph has one node per region and an edge for each of the strongest positive
    correlations (a proportional threshold keeping ``density`` of all possible edges),
    weighted by its value. Negative edges are always dropped: modularity needs
    non-negative weights. Without the threshold, the many weak positive edges between
    networks make Louvain merge networks (its resolution limit).

    Parameters
    ----------
    matrix : (R, R) ndarray
        Correlation matrix.
    density : float or None
        Share of the possible edges kept (0.2 = the strongest 20 %); None keeps every
        positive edge.
    seed : int
        Louvain is randomised; a fixed seed makes it repeatable.
    resolution : float
        Modularity resolution (> 1 favours more, smaller communities).
    n_runs : int
        Louvain runs (seeds ``seed`` ... ``seed + n_runs - 1``); the partition with the
        highest modularity is kept.

    Returns
    -------
    (R,) ndarray of int
        Community index of each region.

    References
    ----------
    .. [1] Blondel VD, Guillaume J-L, Lambiotte R, Lefebvre E (2008). Fast unfolding of
       communities in large networks. J Stat Mech P10008. :doi:`10.1088/1742-5468/2008/10/P10008`
    .. [2] Rubinov M, Sporns O (2010). Complex network measures of brain connectivity:
       uses and interpretations. NeuroImage 52:1059-1069.
       :doi:`10.1016/j.neuroimage.2009.10.003`
    """
    import networkx as nx

    weights = np.clip(np.array(matrix, dtype=float), 0, None)
    np.fill_diagonal(weights, 0)
    if density is not None:
        if not 0 < density <= 1:
            raise ValueError("density must be in (0, 1]")
        cutoff = np.quantile(_upper(weights), 1 - density)
        weights[weights < cutoff] = 0
    graph = nx.from_numpy_array(weights)
    # Louvain is greedy and randomised: keep the most modular of several runs
    runs = [nx.community.louvain_communities(graph, weight="weight", seed=seed + k,
                                             resolution=resolution) for k in range(n_runs)]
    communities = max(runs, key=lambda c: nx.community.modularity(graph, c, weight="weight",
                                                                  resolution=resolution))
    labels = np.empty(len(weights), dtype=int)
    for k, members in enumerate(sorted(communities, key=min)):
        labels[list(members)] = k
    return labels


def network_recovery(matrix: np.ndarray, true_networks, *, density: float | None = 0.2,
                     seed: int = 0) -> float:
    """Adjusted Rand index between detected communities and the true networks.

    1 = identical partitions, about 0 = no better than chance (Hubert & Arabie 1985).
    """
    from sklearn.metrics import adjusted_rand_score

    labels = detect_communities(matrix, density=density, seed=seed)
    return float(adjusted_rand_score(list(true_networks), labels))


# --------------------------------------------------------------------------------------
# Motion artefacts


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
    edges = _upper(fisher_z(matrices))
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
    return _upper(np.linalg.norm(coords[:, None] - coords[None], axis=2))


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


def group_edge_test(matrices: np.ndarray, *, alpha: float = 0.05) -> pd.DataFrame:
    """One-sample t-test of every edge's Fisher z across subjects, FDR-controlled.

    Parameters
    ----------
    matrices : (n_subjects, R, R) ndarray
        Correlation matrices.
    alpha : float
        False discovery rate (Benjamini-Hochberg).

    Returns
    -------
    pandas.DataFrame
        One row per upper-triangle edge: ``i``, ``j``, ``mean_r`` (back-transformed mean z),
        ``t``, ``p``, ``q`` (BH-adjusted p) and ``significant`` (q < alpha).
    """
    edges = _upper(fisher_z(matrices))
    t, p = stats.ttest_1samp(edges, 0.0, axis=0)
    q = stats.false_discovery_control(p, method="bh")
    rows, cols = np.triu_indices(matrices.shape[-1], k=1)
    return pd.DataFrame({"i": rows, "j": cols, "mean_r": np.tanh(edges.mean(0)), "t": t, "p": p,
                         "q": q, "significant": q < alpha})


# --------------------------------------------------------------------------------------
# Parcellations


def data_driven_labels(imgs, *, n_parcels: int = 40, mask_img=None, tr: float | None = None):
    """A parcellation learned from the data itself (nilearn's Ward clustering).

    For runs without an atlas on their grid: voxels are clustered hierarchically by the
    similarity of their time courses, with spatial contiguity enforced, giving
    ``n_parcels`` regions that are homogeneous in these data.

    Returns
    -------
    nibabel.Nifti1Image
        Labels image (1 .. n_parcels, 0 = background).
    """
    from nilearn.regions import Parcellations

    parcels = Parcellations(method="ward", n_parcels=n_parcels, mask=mask_img,
                            standardize="zscore_sample", detrend=True, t_r=tr,
                            smoothing_fwhm=None, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        parcels.fit(imgs)
    return parcels.labels_img_


def region_coordinates(labels_img) -> np.ndarray:
    """Centre (mm) of each labelled region, in label order (nilearn's cut coordinates)."""
    from nilearn.plotting import find_parcellation_cut_coords

    return find_parcellation_cut_coords(labels_img)


# --------------------------------------------------------------------------------------
# Whole analysis


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
              seed: int = 0) -> dict:
    """The summary written to ``connectivity_summary.json``.

    Parameters
    ----------
    results : dict
        Arm name ("raw", "preproc") -> :class:`AnalysisResult` (same subjects in both).
    distances : (n_edges,) array, optional
        Inter-region distances (mm) for QC-FC's distance dependence.
    true_connectivity, true_networks : optional
        Ground truth, for the group matrix's error and ARI.

    Returns
    -------
    dict
        ``{subject: {"ari": {arm: ...}, "matrix_error": {...}, "qcfc": {...}, ...},
        "group": {...}, "definitions": {...}}``. Per subject, ``qcfc`` is the within-subject
        FD coupling (:func:`fd_coupling`); under ``group`` it is the median absolute QC-FC
        across edges. Group ``ari`` and ``matrix_error`` are means over subjects.
    """
    arms = list(results)
    summary: dict = {}
    first = results[arms[0]]
    for k, subject in enumerate(first.subjects):
        entry = {}
        for key, column in (("ari", "ari"), ("matrix_error", "matrix_error"),
                            ("qcfc", "fd_coupling")):
            entry[key] = {arm: _none_if_nan(results[arm].per_subject[column].iloc[k])
                          for arm in arms}
        entry["mean_fd"] = _none_if_nan(first.mean_fd[k])
        entry["kept_volumes"] = {arm: int(results[arm].kept[k]) for arm in arms}
        summary[subject] = entry
    group: dict = {"ari": {}, "matrix_error": {}, "qcfc": {}, "qcfc_fraction_p05": {},
                   "qcfc_distance_rho": {}, "ari_group_matrix": {}, "matrix_error_group_matrix": {}}
    for arm in arms:
        res = results[arm]
        group["ari"][arm] = _none_if_nan(res.per_subject["ari"].mean())
        group["matrix_error"][arm] = _none_if_nan(res.per_subject["matrix_error"].mean())
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
    summary["definitions"] = {
        "ari": "adjusted Rand index, Louvain communities of the correlation matrix vs true "
               "networks",
        "matrix_error": "RMS difference between estimated and true correlation (off-diagonal)",
        "qcfc": "per subject: mean |corr(FD, region signal)|; group: median |QC-FC| over edges "
                "(corr across subjects of mean FD with Fisher-z edge strength)",
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
