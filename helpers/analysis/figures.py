"""Figures for quality control and connectivity: the ones MRIQC and fMRIPrep reports show.

Each function returns a :class:`matplotlib.figure.Figure` (so notebooks can display it and
tests can check it) and uses nilearn's plotting where nilearn has the figure.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib import pyplot as plt

__all__ = [
    "NETWORK_COLOURS",
    "plot_motion_qc",
    "tsnr_img",
    "plot_mean_tsnr",
    "plot_carpets",
    "plot_volume_pair",
    "plot_network_matrix",
    "plot_connectome_networks",
    "plot_communities",
    "plot_edge_test",
    "plot_qcfc",
    "plot_raw_vs_preproc",
    "widget_viewer",
]

NETWORK_COLOURS = {
    "default": "#d62728", "fronto-parietal": "#ff7f0e", "cingulo-opercular": "#9467bd",
    "sensorimotor": "#1f77b4", "occipital": "#2ca02c",
}
_TRANS = ["trans_x", "trans_y", "trans_z"]
_ROTS = ["rot_x", "rot_y", "rot_z"]


def _colour(network: str, k: int = 0) -> str:
    """Colour of a network (cycling matplotlib colours for unknown names)."""
    return NETWORK_COLOURS.get(network, f"C{k % 10}")


# --------------------------------------------------------------------------------------
# Per-subject QC


def plot_motion_qc(confounds: pd.DataFrame, *, tr: float, fd_threshold: float = 0.5,
                   dvars_threshold: float = 1.5, true_motion=None, title: str = ""):
    """Estimated (and true) motion, FD and standardized DVARS against time.

    The DVARS panel is left out when the table has no ``std_dvars`` column.

    Parameters
    ----------
    confounds : pandas.DataFrame
        fMRIPrep-style confounds (``trans_*`` in mm, ``rot_*`` in radians,
        ``framewise_displacement``, ``std_dvars``).
    tr : float
        Repetition time (s), for the time axis.
    fd_threshold, dvars_threshold : float
        Censoring thresholds, drawn as dashed lines; censored volumes are shaded.
    true_motion : (T, 6) array, optional
        True motion in the same convention and reference, drawn dashed.
    title : str

    Returns
    -------
    matplotlib.figure.Figure
    """
    time = np.arange(len(confounds)) * tr
    fd = confounds["framewise_displacement"].fillna(0).to_numpy()
    dvars = confounds["std_dvars"].fillna(0).to_numpy() if "std_dvars" in confounds else None
    n_rows = 4 if dvars is not None else 3
    fig, axes = plt.subplots(n_rows, 1, figsize=(10, 2 * n_rows), sharex=True,
                             constrained_layout=True)
    for k, (cols, scale, unit) in enumerate(((_TRANS, 1.0, "mm"), (_ROTS, 180 / np.pi, "deg"))):
        for j, col in enumerate(cols):
            axes[k].plot(time, confounds[col] * scale, color=f"C{j}", label=f"{col} estimated")
            if true_motion is not None:
                axes[k].plot(time, np.asarray(true_motion)[:, 3 * k + j] * scale, color=f"C{j}",
                             ls="--", lw=1, label=f"{col} true")
        axes[k].set_ylabel(f"{'translation' if k == 0 else 'rotation'} ({unit})")
        axes[k].legend(ncol=6 if true_motion is not None else 3, fontsize=7, loc="upper left")
    censored = fd > fd_threshold
    axes[2].plot(time, fd, color="k")
    axes[2].axhline(fd_threshold, color="r", ls="--", label=f"threshold {fd_threshold} mm")
    axes[2].set_ylabel("FD (mm)")
    if dvars is not None:
        censored |= dvars > dvars_threshold
        axes[3].plot(time, dvars, color="k")
        axes[3].axhline(dvars_threshold, color="r", ls="--", label=f"threshold {dvars_threshold}")
        axes[3].set_ylabel("std DVARS")
    for ax in axes[2:]:
        for t in time[censored]:
            ax.axvspan(t - tr / 2, t + tr / 2, color="r", alpha=0.15, lw=0)
        ax.legend(fontsize=7, loc="upper left")
    axes[-1].set_xlabel("time (s)")
    fig.suptitle(title or f"Motion QC: {censored.sum()} of {len(fd)} volumes over a threshold")
    return fig


def tsnr_img(img):
    """Temporal SNR image: mean over time / standard deviation over time (float32)."""
    from nilearn.image import load_img, new_img_like

    img = load_img(img)
    data = np.asarray(img.dataobj, dtype=np.float32)
    std = data.std(axis=3)
    tsnr = np.divide(data.mean(axis=3), std, out=np.zeros_like(std), where=std > 0)
    return new_img_like(img, tsnr, copy_header=True)


def plot_mean_tsnr(img, mask_img=None, *, title: str = "", vmax_tsnr: float = 120.0):
    """Mean image and tSNR map of a run, with the median brain tSNR in the title.

    Parameters
    ----------
    img : 4D image (path or Nifti1Image)
    mask_img : 3D image, optional
        Brain mask for the median tSNR (default: nilearn's EPI mask of the mean image).
    title : str
    vmax_tsnr : float
        Upper end of the tSNR colour scale.

    Returns
    -------
    matplotlib.figure.Figure
    """
    from nilearn import masking, plotting
    from nilearn.image import mean_img

    mean = mean_img(img, copy_header=True)
    tsnr = tsnr_img(img)
    if mask_img is None:
        mask_img = masking.compute_epi_mask(mean)
    median = float(np.median(masking.apply_mask(tsnr, mask_img)))
    cuts = plotting.find_cut_slices(mean, direction="z", n_cuts=6)
    fig, axes = plt.subplots(2, 1, figsize=(10, 5), constrained_layout=True)
    plotting.plot_epi(mean, axes=axes[0], display_mode="z", cut_coords=cuts, title="mean image",
                      colorbar=True, cmap="gray")
    plotting.plot_img(tsnr, axes=axes[1], display_mode="z", cut_coords=cuts, cmap="inferno",
                      vmin=0, vmax=vmax_tsnr, colorbar=True,
                      title=f"tSNR (median in brain {median:.0f})")
    if title:
        fig.suptitle(title)
    return fig


def plot_carpets(imgs: dict, mask_img, *, tr: float, fd=None, fd_threshold: float = 0.5):
    """Carpet plots (voxels x time, Power 2017) of several versions of a run, stacked.

    Parameters
    ----------
    imgs : dict
        Title -> 4D image (e.g. {"raw": ..., "preprocessed": ...}).
    mask_img : 3D image
        Voxels to show.
    tr : float
    fd : (T,) array, optional
        Framewise displacement, drawn above the carpets.

    Returns
    -------
    matplotlib.figure.Figure
    """
    from nilearn.plotting import plot_carpet

    n = len(imgs) + (fd is not None)
    ratios = ([0.4] if fd is not None else []) + [1] * len(imgs)
    fig, axes = plt.subplots(n, 1, figsize=(10, 2.6 * n), constrained_layout=True,
                             gridspec_kw={"height_ratios": ratios})
    axes = np.atleast_1d(axes)
    if fd is not None:
        time = np.arange(len(fd)) * tr
        axes[0].plot(time, np.nan_to_num(np.asarray(fd, dtype=float)), color="k")
        axes[0].axhline(fd_threshold, color="r", ls="--")
        axes[0].set_xlim(time[0], time[-1])
        axes[0].set_ylabel("FD (mm)")
        axes[0].set_xlabel("time (s)")
        axes = axes[1:]
    for ax, (title, img) in zip(axes, imgs.items()):
        plot_carpet(img, mask_img=mask_img, t_r=tr, axes=ax, figure=fig, title=title,
                    standardize="zscore_sample", detrend=True)
    return fig


def plot_volume_pair(imgs: dict, *, volume: int, axis: str = "z", index: int | None = None):
    """One slice of one volume from several versions of a run, side by side.

    The last panel shows the difference between the first two versions, so residual
    motion shows as bright edges.

    Parameters
    ----------
    imgs : dict
        Title -> 4D image (path or Nifti1Image).
    volume : int
        Volume index.
    axis : {"x", "y", "z"}
        Slicing axis.
    index : int, optional
        Slice index (default: the middle slice).

    Returns
    -------
    matplotlib.figure.Figure
    """
    import nibabel as nib

    ax_n = "xyz".index(axis)
    slices = []
    for img in imgs.values():
        img = nib.load(img) if not hasattr(img, "dataobj") else img
        zooms = [z for k, z in enumerate(img.header.get_zooms()[:3]) if k != ax_n]
        vol = np.asarray(img.dataobj[..., volume], dtype=np.float32)
        k = vol.shape[ax_n] // 2 if index is None else int(index)
        slices.append(np.take(vol, k, axis=ax_n).T)
    n = len(slices) + (len(slices) > 1)
    fig, axes = plt.subplots(1, n, figsize=(3.3 * n, 3.4), constrained_layout=True)
    vmax = max(np.percentile(s, 99.5) for s in slices)
    for ax, title, sl in zip(axes, imgs, slices):
        ax.imshow(sl, origin="lower", cmap="gray", vmin=0, vmax=vmax, aspect=zooms[1] / zooms[0])
        ax.set_title(title)
    if len(slices) > 1:
        diff = slices[1] / (slices[1].mean() or 1) - slices[0] / (slices[0].mean() or 1)
        axes[-1].imshow(diff, origin="lower", cmap="RdBu_r", vmin=-0.5, vmax=0.5,
                        aspect=zooms[1] / zooms[0])
        axes[-1].set_title("difference (scaled)")
    for ax in axes:
        ax.axis("off")
    fig.suptitle(f"volume {volume}, {axis} = slice {index if index is not None else 'middle'}")
    return fig


# --------------------------------------------------------------------------------------
# Connectivity


def _network_order(networks) -> np.ndarray:
    """Order that groups regions by network (stable within a network)."""
    networks = pd.Series(list(networks))
    rank = {n: k for k, n in enumerate(dict.fromkeys(networks))}
    return np.argsort(networks.map(rank).to_numpy(), kind="stable")


def plot_network_matrix(matrix: np.ndarray, *, labels=None, networks=None, title: str = "",
                        vmax: float = 1.0, ax=None):
    """A connectivity matrix with regions grouped by network (nilearn's ``plot_matrix``).

    Parameters
    ----------
    matrix : (R, R) ndarray
    labels : list of str, optional
        Region names.
    networks : list of str, optional
        Network of each region: rows are grouped and network borders drawn.
    title : str
    vmax : float
        Colour scale is symmetric, -vmax to vmax.
    ax : matplotlib Axes, optional

    Returns
    -------
    matplotlib.figure.Figure
    """
    from nilearn.plotting import plot_matrix

    matrix = np.array(matrix, dtype=float)
    order = _network_order(networks) if networks is not None else np.arange(len(matrix))
    shown = matrix[np.ix_(order, order)].copy()
    np.fill_diagonal(shown, 0)
    names = [labels[i] for i in order] if labels is not None else None
    if ax is None:
        fig, ax = plt.subplots(figsize=(6.5, 5.5), constrained_layout=True)
    plot_matrix(shown, labels=names, vmin=-vmax, vmax=vmax, axes=ax, title=title,
                colorbar=True, cmap="RdBu_r")
    if networks is not None:
        nets = [list(networks)[i] for i in order]
        edges = [k for k in range(1, len(nets)) if nets[k] != nets[k - 1]]
        for e in edges:
            ax.axhline(e - 0.5, color="k", lw=0.8)
            ax.axvline(e - 0.5, color="k", lw=0.8)
    if names is not None and len(names) > 20:
        ax.tick_params(labelsize=5)
    return ax.figure


def plot_connectome_networks(matrix: np.ndarray, coords, *, networks=None,
                             edge_threshold: str | float = "95%", title: str = "", axes=None):
    """Glass-brain connectome: nodes coloured by network, strongest edges drawn.

    Parameters
    ----------
    matrix : (R, R) ndarray
    coords : (R, 3) array
        Node positions (mm).
    networks : list of str, optional
        Network of each node (node colour).
    edge_threshold : str or float
        Edges kept: a percentile ("95%") or an absolute value.
    title : str
    axes : matplotlib Axes, optional

    Returns
    -------
    matplotlib.figure.Figure
    """
    from nilearn.plotting import plot_connectome

    matrix = np.array(matrix, dtype=float)
    np.fill_diagonal(matrix, 0)
    if networks is not None:
        order = list(dict.fromkeys(networks))
        colours = [_colour(n, order.index(n)) for n in networks]
    else:
        colours = "k"
    fig = None
    if axes is None:
        fig = plt.figure(figsize=(9, 3.4))
    display = plot_connectome(matrix, np.asarray(coords), node_color=colours, node_size=25,
                              edge_threshold=edge_threshold, edge_cmap="RdBu_r", edge_vmin=-1,
                              edge_vmax=1, title=title, figure=fig, axes=axes, colorbar=True)
    return display.frame_axes.figure


def plot_communities(true_networks, detected, *, title: str = ""):
    """Contingency table of detected communities against true networks.

    A perfect recovery has exactly one non-zero cell in every row and column.

    Returns
    -------
    matplotlib.figure.Figure
    """
    table = pd.crosstab(pd.Series(list(true_networks), name="true network"),
                        pd.Series(np.asarray(detected), name="detected community"))
    fig, ax = plt.subplots(figsize=(1.2 + 0.6 * table.shape[1], 0.6 + 0.5 * table.shape[0]),
                           constrained_layout=True)
    ax.imshow(table.to_numpy(), cmap="Greens")
    for (i, j), value in np.ndenumerate(table.to_numpy()):
        ax.text(j, i, str(value), ha="center", va="center", fontsize=8)
    ax.set_xticks(range(table.shape[1]), table.columns)
    ax.set_yticks(range(table.shape[0]), table.index)
    ax.set_xlabel("detected community")
    ax.set_title(title or "networks recovered")
    return fig


def plot_edge_test(table: pd.DataFrame, n_regions: int, *, labels=None, networks=None,
                   title: str = ""):
    """Mean group correlation of the edges that survive FDR correction (others blank).

    Parameters
    ----------
    table : pandas.DataFrame
        Output of :func:`helpers.analysis.connectivity.group_edge_test`.
    n_regions : int
    labels, networks : list of str, optional

    Returns
    -------
    matplotlib.figure.Figure
    """
    matrix = np.zeros((n_regions, n_regions))
    kept = table[table["significant"]]
    matrix[kept["i"], kept["j"]] = kept["mean_r"]
    matrix = matrix + matrix.T
    n_sig = int(table["significant"].sum())
    title = title or f"{n_sig} of {len(table)} edges significant (FDR 5 %)"
    return plot_network_matrix(matrix, labels=labels, networks=networks, title=title)


# --------------------------------------------------------------------------------------
# The motion lesson


def plot_qcfc(qcfc_by_arm: dict, distances=None):
    """Distribution of QC-FC over edges and its dependence on distance, per analysis.

    Parameters
    ----------
    qcfc_by_arm : dict
        Analysis name -> (n_edges,) QC-FC correlations.
    distances : (n_edges,) array, optional
        Inter-region distance (mm) of each edge.

    Returns
    -------
    matplotlib.figure.Figure
    """
    n = 1 + (distances is not None)
    fig, axes = plt.subplots(1, n, figsize=(5.5 * n, 3.8), constrained_layout=True)
    axes = np.atleast_1d(axes)
    bins = np.linspace(-1, 1, 41)
    for k, (arm, r) in enumerate(qcfc_by_arm.items()):
        axes[0].hist(r, bins=bins, alpha=0.6, color=f"C{k}",
                     label=f"{arm}: median |r| = {np.median(np.abs(r)):.2f}")
        if distances is not None:
            axes[1].scatter(distances, r, s=4, alpha=0.4, color=f"C{k}", label=arm)
            fit = np.polyfit(distances, r, 1)
            xs = np.array([np.min(distances), np.max(distances)])
            axes[1].plot(xs, np.polyval(fit, xs), color=f"C{k}")
    axes[0].axvline(0, color="k", lw=0.8)
    axes[0].set_xlabel("QC-FC (correlation of edge strength with mean FD)")
    axes[0].set_ylabel("edges")
    axes[0].legend(fontsize=8)
    if distances is not None:
        axes[1].axhline(0, color="k", lw=0.8)
        axes[1].set_xlabel("distance between regions (mm)")
        axes[1].set_ylabel("QC-FC")
        axes[1].legend(fontsize=8)
    fig.suptitle("Motion-driven connectivity (QC-FC)")
    return fig


def plot_raw_vs_preproc(per_subject: dict):
    """Per-subject error against the truth, network recovery and FD coupling vs mean FD.

    Parameters
    ----------
    per_subject : dict
        Analysis name -> DataFrame with ``mean_fd``, ``matrix_error``, ``ari``,
        ``fd_coupling`` (from :func:`helpers.analysis.connectivity.analyze_runs`).

    Returns
    -------
    matplotlib.figure.Figure
    """
    metrics = [("matrix_error", "error vs true matrix (RMS r)"), ("ari", "ARI vs true networks"),
               ("fd_coupling", "mean |corr(FD, region signal)|")]
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8), constrained_layout=True)
    for ax, (col, label) in zip(axes, metrics):
        for k, (arm, table) in enumerate(per_subject.items()):
            ax.scatter(table["mean_fd"], table[col], color=f"C{k}", label=arm)
            ax.axhline(table[col].mean(), color=f"C{k}", ls=":", lw=1)
        ax.set_xlabel("subject's mean FD (mm)")
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    fig.suptitle("Raw vs preprocessed, one dot per subject (dotted: mean)")
    return fig


# --------------------------------------------------------------------------------------
# Interactive viewers


_METRIC_LABELS = {
    "qcfc_fraction_p05": ("QC-FC: edges with p < 0.05 (%)", 100.0),
    "qcfc_median_abs": ("QC-FC: median |r| over edges", 1.0),
    "qcfc_distance_rho": ("QC-FC distance dependence (Spearman rho)", 1.0),
    "tdof_loss": ("tDOF-loss (regressors + censored volumes)", 1.0),
    "matrix_error": ("error vs truth (RMS of r)", 1.0),
}


def plot_strategy_metric(table: pd.DataFrame, metric: str, *, reference: dict | None = None,
                         ax=None):
    """One benchmark metric across denoising strategies, as horizontal bars.

    Parameters
    ----------
    table : pandas.DataFrame
        Strategies as rows (:func:`helpers.analysis.denoising.strategy_table`).
    metric : str
        A column of ``table``.
    reference : dict, optional
        Name -> value of dashed reference lines (a chance level, a noise ceiling).
    ax : matplotlib Axes, optional

    Returns
    -------
    matplotlib.figure.Figure
    """
    label, scale = _METRIC_LABELS.get(metric, (metric, 1.0))
    if ax is None:
        height = 0.45 * len(table) + 1.2 + 0.4 * bool(reference)
        _, ax = plt.subplots(figsize=(7.5, height), constrained_layout=True)
    values = table[metric].astype(float) * scale
    best = (values.abs() if metric == "qcfc_distance_rho" else values).idxmin()
    colours = ["C2" if name == best else "0.6" for name in table.index]
    ax.barh(table.index, values, color=colours)
    for y, v in enumerate(values):
        ax.text(v, y, f" {v:.3g}", va="center", fontsize=9)
    for k, (name, value) in enumerate((reference or {}).items()):
        ax.axvline(value * scale, color=f"C{k + 3}", ls="--", lw=1.2, label=name)
    if reference:
        ax.legend(fontsize=9, loc="upper center", bbox_to_anchor=(0.5, -0.3), ncol=2)
    ax.axvline(0, color="k", lw=0.8)
    ax.margins(x=0.12)  # room for the value labels
    ax.invert_yaxis()
    ax.set_xlabel(label)
    ax.set_title(f"{label}: best in green (lower is better)", fontsize=10)
    return ax.figure


def widget_viewer(draw, controls: dict, *, note: str = "Move a control to draw the figure."):
    """A small interactive viewer: controls above, the figure drawn by ``draw`` below.

    Unlike ``ipywidgets.interact``, nothing is drawn while the cell runs; the figure is
    drawn when a control changes. Drawing into an output widget during execution can
    hang headless runs (papermill/nbclient), and the plain figures next to the viewer
    already show the default view.

    Parameters
    ----------
    draw : callable
        Called with the controls' values as keyword arguments; draws one figure.
    controls : dict
        Keyword name -> ipywidgets control (slider, dropdown, ...).
    note : str
        Text shown under the controls.

    Returns
    -------
    ipywidgets.VBox
        Display it (leave it as the cell's last expression).
    """
    import ipywidgets as widgets

    out = widgets.Output()

    def update(_change=None):
        out.clear_output(wait=True)
        with out:
            draw(**{name: control.value for name, control in controls.items()})
            plt.show()

    for control in controls.values():
        control.observe(update, names="value")
    return widgets.VBox([widgets.HBox(list(controls.values())), widgets.Label(note), out])
