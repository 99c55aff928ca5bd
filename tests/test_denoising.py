"""Denoising strategies: censoring, nilearn's confounds from the engine, the benchmarks, and
the claims notebook 04 prints, measured on a study the engine preprocessed."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from fmri_preproc import preprocess
from helpers.analysis import denoising, motion_qc, simulate
from helpers.course import nb04


def test_censoring_takes_one_before_two_after_and_drops_short_segments():
    fd = np.zeros(30)
    fd[10] = 0.8
    kept = denoising.censor_mask(fd, 0.5)
    assert set(range(30)) - set(kept) == {9, 10, 11, 12}
    fd[16] = 0.9  # leaves 13..14 (2 volumes) between the two censored blocks: dropped too
    kept = denoising.censor_mask(fd, 0.5)
    assert set(range(30)) - set(kept) == set(range(9, 19))
    assert denoising.censor_mask(np.r_[np.nan, np.zeros(9)], 0.5) is None
    assert nb04.check_censoring(kept, fd, 0.5) and not nb04.check_censoring(None, fd, 0.5)


def test_unanswered_exercises_say_not_yet_instead_of_failing():
    """The student build leaves each answer at None: its check must run and say why."""
    fd = np.zeros(30)
    checks = [nb04.check_censoring(None, fd, 0.5), nb04.check_tdof_loss(None, None, None, 30),
              nb04.check_relative_error(None, 0.12, 0.1)]
    assert not any(checks) and all("set `" in c.message for c in checks)
    assert nb04.check_relative_error(1.2, 0.12, 0.1) and nb04.check_tdof_loss(0, None, None, 30)


def test_subjects_censored_below_half_their_run_are_left_out():
    still, restless = np.full(40, 0.1), np.tile([0.1, 0.9], 20)
    assert list(denoising.included_subjects([still, restless], 0.5)) == [True, False]


STUDY = simulate.study_config(n_subjects=12, shape=(24, 24, 14), n_volumes=100)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A fixed-seed study through the engine, as notebook 04 reads it."""
    from helpers.analysis import derivatives
    from helpers.analysis.simulate import load_truth

    root = tmp_path_factory.mktemp("study")
    simulate.simulate_study(root, STUDY, seed=1, n_jobs=1)
    for bold in sorted((root / "raw").rglob("*_bold.nii.gz")):
        preprocess(bold, root / "derivatives" / bold.parent.relative_to(root / "raw"), fwhm=0)
    runs = derivatives.find_runs(root / "derivatives", root / "raw")
    return root, runs, load_truth(root)


@pytest.mark.slow
def test_strategies_use_the_columns_they_name(study):
    _, runs, _ = study
    path = runs["preproc"].iloc[0]
    counts = {name: denoising.strategy_confounds(path, s)[0] for name, s in
              denoising.STRATEGIES.items()}
    assert counts["none"] is None
    assert counts["24P+scrub"].shape[1] == 24
    assert counts["36P"].shape[1] == 36 and "global_signal_derivative1_power2" in counts["36P"]
    acc = counts["aCompCor"]
    assert any(c.startswith("a_comp_cor_") for c in acc) and "global_signal" not in acc
    assert "global_signal" in counts["aCompCor+GSR"]


@pytest.mark.slow
def test_notebook_claims_hold_at_fixed_seeds(study):
    """What notebook 04 prints (:func:`denoising.lesson`) is what the numbers are; and the
    facts that do not depend on the ranking hold."""
    _, runs, truth = study
    labels = truth["labels_img"]
    tm = truth["true_connectivity"].to_numpy()
    dist = motion_qc.region_distances(truth["regions"][["x", "y", "z"]].to_numpy())
    fd = [pd.read_csv(c, sep="\t", na_values="n/a")["framewise_displacement"].to_numpy()
          for c in runs["confounds"]]
    means = [denoising.region_means(p, labels) for p in runs["preproc"]]
    results = denoising.compare_strategies(means, list(runs["preproc"]), fd, tr=2.0,
                                           distances=dist, true_matrix=tm)
    table = denoising.strategy_table(results)
    raw = denoising.compare_strategies(
        [denoising.region_means(p, labels) for p in runs["raw"]], list(runs["preproc"]), fd,
        tr=2.0, distances=dist, true_matrix=tm,
        strategies=[denoising.STRATEGIES["none"]])["none"].scores
    keys = [f"sub-{s}" for s in np.array(runs["subject"])[results["none"].included]]
    ceiling = denoising.noise_ceiling(
        [truth["signals"][k].to_numpy() for k in keys],
        [denoising.region_means(truth["nomotion"][k], labels) for k in keys], tm, tr=2.0)
    text, claims = denoising.lesson(table, raw=raw, ceiling=ceiling)
    # the printed ranking is the measured one
    for metric, name in claims["winners"].items():
        values = table[metric].abs() if metric == "qcfc_distance_rho" else table[metric]
        assert values[name] == values.min() and f"**{name}**" in text
    assert claims["preproc_beats_raw_error"] == (table["matrix_error"].min() < raw["matrix_error"])
    best_error = table["matrix_error"].min()
    verdict = "lower" if claims["preproc_beats_raw_error"] else "not lower"
    assert f"best preprocessed error ({best_error:.3f}) is {verdict}," in text
    # facts: no strategy beats sampling error, noise costs accuracy, regressors cost tDOF
    assert (table["matrix_error"] > ceiling["signals"]).all()
    assert ceiling["nomotion"] > ceiling["signals"]
    assert table.loc["36P", "tdof_loss"] == 36 and table.loc["none", "tdof_loss"] == 0
    assert table.loc["24P+scrub", "tdof_loss"] >= 24


@pytest.mark.slow
def test_truth_sits_where_the_engine_realigns_to(study):
    """The fair truth: the engine's reference volume is the one the labels were drawn at, so
    the engine's motion there is zero and the true motion there is zero too."""
    import json

    import nibabel as nib

    from fmri_preproc.contract import MOTION_PARAMS, Sidecar
    from fmri_preproc.motion import reference_index

    _, runs, truth = study
    for _, row in runs.iterrows():
        sidecar = json.loads(open(row["sidecar"]).read())
        ref = sidecar[Sidecar.REFERENCE_VOLUME]
        assert ref == reference_index("middle", STUDY.n_volumes)
        true = truth["motion"][f"sub-{row['subject']}"]
        assert np.allclose(true[ref], 0, atol=1e-9)
        est = pd.read_csv(row["confounds"], sep="\t")[list(MOTION_PARAMS)].to_numpy()
        assert np.allclose(est[ref], 0, atol=1e-6)
        # and the truth's brain mask agrees with the engine's mask of its reference volume
        engine_mask = np.asarray(nib.load(str(row["preproc"]).replace(
            "desc-preproc_bold", "desc-brain_mask")).dataobj) > 0
        true_mask = np.asarray(nib.load(truth["labels_img"].with_name("brain_mask.nii.gz"))
                               .dataobj) > 0
        dice = 2 * (engine_mask & true_mask).sum() / (engine_mask.sum() + true_mask.sum())
        assert dice > 0.8, (row["subject"], dice)


def test_strategy_figure_marks_the_best_and_the_references():
    import matplotlib

    matplotlib.use("Agg")
    from helpers.analysis import figures

    table = pd.DataFrame({"qcfc_distance_rho": [-0.3, 0.1, 0.2]}, index=["a", "b", "c"])
    fig = figures.plot_strategy_metric(table, "qcfc_distance_rho", reference={"zero": 0.0})
    colours = [bar.get_facecolor() for bar in fig.axes[0].patches]
    # |rho| = 0.1 is best: only "b" is highlighted
    assert len(colours) == 3 and colours[0] == colours[2] != colours[1]
    assert fig.axes[0].get_legend() is not None
