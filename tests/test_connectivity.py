"""Connectivity measures and the summary figures, on small simulated data."""
from __future__ import annotations

import json

import matplotlib

matplotlib.use("Agg")

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure

from fmri_preproc import framewise_displacement, params_to_affine
from fmri_preproc.contract import MOTION_PARAMS, Sidecar
from helpers.analysis import connectome, derivatives, evaluation, motion_qc, timeseries
from helpers.analysis import figures, simulate

SHAPE = (24, 24, 12)


@pytest.fixture(scope="module")
def run():
    return simulate.simulate_run(shape=SHAPE, n_volumes=40, seed=5)


def _confounds(motion: np.ndarray) -> pd.DataFrame:
    """fMRIPrep-style confounds built from a motion trace."""
    cols = list(MOTION_PARAMS)
    table = pd.DataFrame(motion, columns=cols)
    for col in cols:
        table[f"{col}_derivative1"] = table[col].diff()
        table[f"{col}_power2"] = table[col] ** 2
        table[f"{col}_derivative1_power2"] = table[f"{col}_derivative1"] ** 2
    table.insert(0, "framewise_displacement", framewise_displacement(motion))
    table.loc[0, "framewise_displacement"] = np.nan
    table.insert(1, "std_dvars", 1.0)
    return table


@pytest.fixture(scope="module")
def derivatives_dir(tmp_path_factory, run):
    """A study in the engine's layout (the run itself stands in for its output): sub-01 done,
    sub-02 failed, and sub-03 with two sessions x two runs named as fMRIPrep names them."""
    root = tmp_path_factory.mktemp("study")
    func = root / "derivatives" / "sub-01" / "func"
    func.mkdir(parents=True)
    (root / "raw").mkdir()
    nib.save(run.img, root / "raw" / "sub-01_task-rest_bold.nii.gz")
    nib.save(run.img, func / "sub-01_task-rest_desc-preproc_bold.nii.gz")
    _confounds(run.motion).to_csv(func / "sub-01_task-rest_desc-confounds_timeseries.tsv",
                                  sep="\t", index=False, na_rep="n/a")
    (func / "sub-01_task-rest_desc-preproc_bold.json").write_text(
        json.dumps({Sidecar.REFERENCE_VOLUME: 7}))
    nib.save(run.img, root / "raw" / "sub-02_task-rest_bold.nii.gz")
    (root / "derivatives" / "sub-02" / "func").mkdir(parents=True)
    (root / "derivatives" / "sub-02" / "func" / "sub-02_task-rest_error.json").write_text("{}")
    for ses in (1, 2):
        folder = root / "derivatives" / "sub-03" / f"ses-{ses}" / "func"
        folder.mkdir(parents=True)
        for r in (1, 2):
            stem = f"sub-03_ses-{ses}_task-rest_run-{r}"
            (folder / f"{stem}_desc-preproc_bold.nii.gz").write_bytes(b"")
            (folder / f"{stem}_space-MNI152NLin2009aSym_res-2_desc-preproc_bold.nii.gz"
             ).write_bytes(b"")
            (folder / f"{stem}_desc-confounds_timeseries.tsv").write_text("")
    return root


def test_find_runs_pairs_files_and_flags_errors(derivatives_dir):
    runs = derivatives.find_runs(derivatives_dir / "derivatives", derivatives_dir / "raw")
    sessions = [f"sub-03/ses-{s}/func/sub-03_ses-{s}_task-rest_run-{r}"
                for s in (1, 2) for r in (1, 2)]
    assert list(runs["name"]) == ["sub-01/func/sub-01_task-rest", "sub-02/func/sub-02_task-rest",
                                  *sessions]
    assert list(runs["ok"]) == [True, False, True, True, True, True]
    assert list(runs["subject"]) == ["01", "02", "03", "03", "03", "03"]
    assert runs.loc[1, "error"] is not None and runs.loc[1, "preproc"] is None
    assert runs.loc[0, "raw"].name == "sub-01_task-rest_bold.nii.gz"  # matched to its input
    assert all("space-" not in p.name for p in runs["preproc"].dropna())  # native space only
    assert derivatives.reference_volume(runs.loc[0, "sidecar"], 40) == 7


def test_motion_confounds_are_24_parameters_with_scrubbing(derivatives_dir, run):
    preproc = derivatives_dir / "derivatives" / "sub-01" / "func" / \
        "sub-01_task-rest_desc-preproc_bold.nii.gz"
    confounds, sample_mask = derivatives.load_motion_confounds(preproc, fd_threshold=0.5, scrub=0)
    assert confounds.shape == (40, 24)
    fd = framewise_displacement(run.motion)
    expected = np.flatnonzero(~(fd > 0.5))  # the first volume has no FD (NaN): kept
    kept = sample_mask if sample_mask is not None else np.arange(40)
    np.testing.assert_array_equal(kept, expected)


def test_relative_motion_is_zero_at_the_reference(run):
    rel = derivatives.relative_motion(run.motion, run.img.affine, SHAPE, reference=10)
    np.testing.assert_allclose(rel[10], 0, atol=1e-12)
    # composing back: M_t = R_t M_ref
    m_ref = params_to_affine(run.motion[10], run.img.affine, SHAPE)
    m_t = params_to_affine(run.motion[25], run.img.affine, SHAPE)
    m_rel = params_to_affine(rel[25], run.img.affine, SHAPE)
    np.testing.assert_allclose(m_rel @ m_ref, m_t, atol=1e-10)


def test_truth_matrix_gives_perfect_scores(run):
    truth = run.true_connectivity
    nets = run.regions["network"]
    assert connectome.matrix_error(truth, truth) == 0
    assert connectome.network_recovery(truth, nets) == pytest.approx(1.0)
    z = connectome.fisher_z(truth)
    assert np.all(np.diag(z) == 0) and np.all(np.isfinite(z))


def test_timeseries_matrices_and_scores(run):
    series = timeseries.region_timeseries(run.img, run.labels_img, tr=2.0)
    assert series.shape == (40, len(run.regions))
    spheres = timeseries.sphere_timeseries(run.img, run.regions[["x", "y", "z"]], tr=2.0, radius=8)
    assert spheres.shape == series.shape
    matrices = connectome.connectivity_matrices([series, spheres])
    assert matrices.shape == (2, len(run.regions), len(run.regions))
    np.testing.assert_allclose(np.diag(matrices[0]), 1, atol=1e-6)
    partial = connectome.connectivity_matrices([series], kind="partial correlation")
    assert np.all(np.abs(partial) <= 1 + 1e-9)
    result = evaluation.analyze_runs([run.img], [run.fd], run.labels_img, tr=2.0, arm="raw",
                               subjects=["sub-01"], true_connectivity=run.true_connectivity,
                               true_networks=run.regions["network"])
    row = result.per_subject.iloc[0]
    assert 0 < row["matrix_error"] < 1 and -1 <= row["ari"] <= 1 and row["fd_coupling"] >= 0


def test_qcfc_finds_motion_driven_edges():
    rng = np.random.default_rng(0)
    mean_fd = rng.uniform(0.02, 0.4, 30)
    n = 6
    matrices = np.tile(np.eye(n), (30, 1, 1))
    noise = rng.normal(0, 0.05, (30, n, n))
    matrices = matrices + (noise + noise.transpose(0, 2, 1)) / 2
    matrices[:, 0, 1] = matrices[:, 1, 0] = 0.2 + 1.5 * mean_fd  # one motion-driven edge
    np.fill_diagonal(matrices[0], 1)
    r, p = motion_qc.qcfc(matrices, mean_fd)
    assert r[0] > 0.9 and p[0] < 1e-6
    assert np.median(np.abs(r[1:])) < 0.3
    summary = motion_qc.qcfc_summary(r, p, distances=np.arange(len(r), dtype=float))
    assert 0 <= summary["fraction_p05"] <= 1


def test_group_edge_test_controls_fdr():
    rng = np.random.default_rng(1)
    matrices = np.tile(np.eye(5), (12, 1, 1)) + 0.0
    values = rng.normal(0, 0.1, (12, 5, 5))
    matrices = matrices + (values + values.transpose(0, 2, 1)) / 2
    matrices[:, 0, 1] = matrices[:, 1, 0] = 0.6 + rng.normal(0, 0.05, 12)
    for m in matrices:
        np.fill_diagonal(m, 1)
    table = connectome.group_edge_test(matrices)
    assert len(table) == 10
    assert table.loc[0, "significant"] and table["significant"].sum() <= 2
    assert np.all(table["q"] >= table["p"] - 1e-12)


def test_fd_coupling_detects_fd_in_signals():
    rng = np.random.default_rng(2)
    fd = rng.exponential(0.1, 100)
    clean = rng.standard_normal((100, 4))
    assert motion_qc.fd_coupling(clean, fd) < 0.2
    assert motion_qc.fd_coupling(clean + 50 * fd[:, None], fd) > 0.8
    kept = np.arange(10, 100)
    assert motion_qc.fd_coupling(clean[kept], fd, sample_mask=kept) < 0.25


def test_summary_has_the_documented_keys(run, tmp_path):
    fds = [run.fd, run.fd * 2, run.fd * 3]
    results = {arm: evaluation.analyze_runs([run.img] * 3, fds, run.labels_img, tr=2.0, arm=arm,
                                      subjects=["sub-01", "sub-02", "sub-03"],
                                      true_connectivity=run.true_connectivity,
                                      true_networks=run.regions["network"])
               for arm in ("raw", "preproc")}
    summary = evaluation.summarize(results, true_connectivity=run.true_connectivity,
                             true_networks=run.regions["network"])
    for key in ("sub-01", "group"):
        for metric in ("ari", "matrix_error", "fd_coupling"):
            assert set(summary[key][metric]) == {"raw", "preproc"}
    assert set(summary["group"]["qcfc"]) == {"raw", "preproc"}
    path = evaluation.write_summary(summary, tmp_path / "results" / "connectivity_summary.json")
    assert json.loads(path.read_text())["group"]["n_subjects"] == 3


def test_data_driven_parcellation(run):
    labels = timeseries.data_driven_labels(run.img, n_parcels=10, mask_img=run.brain_mask_img, tr=2.0)
    values = np.unique(np.asarray(labels.dataobj))
    assert len(values[values > 0]) == 10
    assert timeseries.region_coordinates(labels).shape == (10, 3)


def test_parcels_are_learned_on_other_subjects_than_they_summarise():
    runs = ["sub-03", "sub-01", "sub-02", "sub-01", "sub-04", "sub-05", "sub-02"]  # 2 runs each
    learn, analyse = timeseries.split_halves(runs)
    assert learn == ["sub-02", "sub-04"] and analyse == ["sub-01", "sub-03", "sub-05"]
    with pytest.warns(UserWarning, match="circular"):
        assert timeseries.split_halves(["sub-01", "sub-01"]) == (["sub-01"], ["sub-01"])


# --------------------------------------------------------------------------------------
# Figures


def test_qc_figures_render(run, derivatives_dir):
    confounds = derivatives.read_confounds(derivatives_dir / "derivatives" / "sub-01" / "func" /
                                           "sub-01_task-rest_desc-confounds_timeseries.tsv")
    drawn = [
        figures.plot_motion_qc(confounds, tr=2.0, true_motion=run.motion),
        figures.plot_mean_tsnr(run.img, run.brain_mask_img),
        figures.plot_carpets({"raw": run.img, "again": run.img}, run.brain_mask_img, tr=2.0,
                              fd=run.fd),
        figures.plot_volume_pair({"raw": run.img, "corrected": run.img}, volume=3, axis="y"),
    ]
    assert all(isinstance(fig, Figure) and fig.axes for fig in drawn)
    tsnr = np.asarray(figures.tsnr_img(run.img).dataobj)
    assert tsnr.shape == SHAPE and tsnr.max() > 10
    matplotlib.pyplot.close("all")


def test_connectivity_figures_render(run):
    nets = list(run.regions["network"])
    names = list(run.regions["name"])
    truth = run.true_connectivity
    coords = run.regions[["x", "y", "z"]].to_numpy()
    rng = np.random.default_rng(0)
    r = {"raw": rng.uniform(-1, 1, 20), "preproc": rng.uniform(-0.3, 0.3, 20)}
    per_subject = {arm: pd.DataFrame({"mean_fd": [0.1, 0.2], "matrix_error": [0.2, 0.3],
                                      "ari": [1.0, 0.8], "fd_coupling": [0.1, 0.2]})
                   for arm in ("raw", "preproc")}
    table = connectome.group_edge_test(np.stack([truth] * 4) + rng.normal(0, 0.01, (4, *truth.shape)))
    drawn = [
        figures.plot_network_matrix(truth, labels=names, networks=nets, title="truth"),
        figures.plot_connectome_networks(truth, coords, networks=nets),
        figures.plot_communities(nets, connectome.detect_communities(truth)),
        figures.plot_edge_test(table, len(names), labels=names, networks=nets),
        figures.plot_qcfc(r, distances=rng.uniform(10, 100, 20)),
        figures.plot_raw_vs_preproc(per_subject),
    ]
    assert all(isinstance(fig, Figure) and fig.axes for fig in drawn)
    matplotlib.pyplot.close("all")


def test_widget_viewer_draws_only_when_a_control_changes():
    import ipywidgets as widgets

    calls = []
    slider = widgets.IntSlider(1, 0, 5)
    viewer = figures.widget_viewer(lambda value: calls.append(value), {"value": slider})
    assert isinstance(viewer, widgets.VBox) and calls == []
    slider.value = 3
    assert calls == [3]
