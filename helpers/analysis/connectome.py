"""Connectivity matrices, networks found in them, and how close they are to the truth.

:class:`nilearn.connectome.ConnectivityMeasure` computes the matrices, networkx finds
communities (Louvain), and a few small functions score them: :func:`matrix_error` against
the true matrix, :func:`network_recovery` against the true networks, and
:func:`group_edge_test` across subjects with FDR control.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats

__all__ = ["connectivity_matrices", "fisher_z", "upper_triangle", "matrix_error",
           "detect_communities", "network_recovery", "group_edge_test"]


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


def upper_triangle(matrix: np.ndarray) -> np.ndarray:
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
    return float(np.sqrt(np.mean((upper_triangle(matrix) - upper_triangle(truth)) ** 2)))


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
        cutoff = np.quantile(upper_triangle(weights), 1 - density)
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
    edges = upper_triangle(fisher_z(matrices))
    t, p = stats.ttest_1samp(edges, 0.0, axis=0)
    q = stats.false_discovery_control(p, method="bh")
    rows, cols = np.triu_indices(matrices.shape[-1], k=1)
    return pd.DataFrame({"i": rows, "j": cols, "mean_r": np.tanh(edges.mean(0)), "t": t, "p": p,
                         "q": q, "significant": q < alpha})
