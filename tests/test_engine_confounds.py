"""Confounds: FD on a known trajectory, the 24 motion regressors, DVARS, the TSV."""

import numpy as np
import pytest

from fmri_preproc import dvars, framewise_displacement, motion_expansion
from fmri_preproc.confounds import brain_mask, confounds_table, non_steady_state, tsnr, write_tsv


def test_fd_known_trajectory():
    params = np.zeros((4, 6))
    params[1, 0] = 1.0  # 1 mm along x
    params[2, 0] = 1.0
    params[2, 5] = 0.01  # + 0.01 rad about z -> 0.5 mm at 50 mm
    params[3, 1] = -0.5  # back in x (1 mm), -0.5 mm in y, back in rot z (0.5 mm)
    fd = framewise_displacement(params)
    assert np.isnan(fd[0])
    assert np.allclose(fd[1:], [1.0, 0.5, 1.0 + 0.5 + 0.5])
    assert np.allclose(framewise_displacement(params, radius=80)[2], 0.8)


def test_fd_bad_shape():
    with pytest.raises(ValueError, match="shape"):
        framewise_displacement(np.zeros((5, 3)))


def test_24_parameter_names_and_values():
    params = np.arange(18, dtype=float).reshape(3, 6) ** 1.5
    cols = motion_expansion(params)
    assert len(cols) == 24
    assert list(cols)[:4] == ["trans_x", "trans_x_derivative1", "trans_x_power2",
                              "trans_x_derivative1_power2"]
    assert np.allclose(cols["rot_z"], params[:, 5])
    assert np.isnan(cols["rot_z_derivative1"][0])
    assert np.allclose(cols["rot_z_derivative1"][1:], np.diff(params[:, 5]))
    assert np.allclose(cols["trans_y_derivative1_power2"][1:], np.diff(params[:, 1]) ** 2)


def test_dvars_of_known_series():
    rng = np.random.default_rng(0)
    data = np.full((6, 6, 6, 50), 500.0, dtype=np.float32)
    data += rng.normal(scale=5.0, size=data.shape).astype(np.float32)
    data[..., 30] += 50.0  # a spike
    mask = np.ones((6, 6, 6), dtype=bool)
    raw, std = dvars(data, mask)
    assert np.isnan(raw[0]) and np.isnan(std[0])
    assert np.argmax(raw[1:]) + 1 in (30, 31)
    # white noise: DVARS ~ sqrt(2) sd, scaled to median 1000 (x2); std_dvars ~ 1
    assert np.median(raw[1:]) == pytest.approx(np.sqrt(2) * 5.0 * 2.0, rel=0.1)
    assert np.median(std[1:]) == pytest.approx(1.0, rel=0.15)
    assert tsnr(data[..., :30], mask) == pytest.approx(500 / 5.0, rel=0.1)


def test_non_steady_state_detects_leading_bright_volumes():
    rng = np.random.default_rng(1)
    signal = 1000 + rng.normal(scale=2, size=60)
    signal[:3] += [300, 150, 60]
    assert non_steady_state(signal) == 3
    assert non_steady_state(np.full(20, 5.0)) == 0


def test_table_outliers_and_tsv(tmp_path):
    params = np.zeros((5, 6))
    params[3, 0] = 2.0  # FD 2 mm at t=3 and t=4
    nan5 = np.r_[np.nan, np.ones(4)]
    cols = confounds_table(params, nan5, nan5, n_non_steady=1)
    assert [c for c in cols if "outlier" in c] == [
        "non_steady_state_outlier00", "motion_outlier00", "motion_outlier01"]
    assert np.array_equal(cols["motion_outlier00"], [0, 0, 0, 1, 0])
    path = tmp_path / "c.tsv"
    write_tsv(path, cols)
    lines = path.read_text().splitlines()
    assert lines[0].split("\t") == list(cols)
    assert len(lines) == 6
    first = dict(zip(lines[0].split("\t"), lines[1].split("\t")))
    assert first["framewise_displacement"] == "n/a"
    assert first["trans_x"] == "0"


# ---------------------------------------------------------------------------------------
# Tissue signals, aCompCor, cosine drift, rmsd: fMRIPrep's columns, read by nilearn

import json
import warnings

import nibabel as nib

from fmri_preproc import params_to_affine, preprocess
from fmri_preproc.confounds import (acompcor, compute_confounds, cosine_drift, rmsd,
                                    tissue_masks)
from fmri_preproc.contract import A_COMP_COR, COSINE, CSF, GLOBAL_SIGNAL, WHITE_MATTER
from fmri_preproc.transforms import fov_centre, rms_deviation

SIM = dict(shape=(24, 24, 14), n_volumes=80, tr=2.0)


@pytest.fixture(scope="module")
def simulated():
    from helpers.analysis import simulate
    return simulate.simulate_run(**SIM, seed=4, motion_level=1.0)


@pytest.fixture(scope="module")
def derivatives(simulated, tmp_path_factory):
    """The engine's outputs for a simulated run (as the function writes them)."""
    folder = tmp_path_factory.mktemp("deriv")
    src = folder / "sub-01_task-rest_bold.nii.gz"
    simulated.img.to_filename(src)
    return preprocess(src, folder / "out", fwhm=0)


def test_cosine_drift_is_nilearns_high_pass_basis():
    from nilearn.signal import create_cosine_drift

    ours = cosine_drift(150, 2.0)
    # nilearn >= 0.10 keeps one more cosine (k = 1 .. order) than Nipype / fMRIPrep
    # (k = 1 .. order - 1): the same basis, less its last column
    theirs = create_cosine_drift(1 / 128, np.arange(150) * 2.0)
    assert ours.shape == (150, 3)  # floor(2 * 150 * 2 / 128) - 1
    assert np.allclose(ours, theirs[:, :3])
    with pytest.raises(ValueError, match="tr"):
        cosine_drift(10, 0.0)


def test_acompcor_recovers_a_shared_noise_source_and_keeps_half_the_variance():
    rng = np.random.default_rng(5)
    n_t = 120
    source = rng.standard_normal(n_t)
    drift = cosine_drift(n_t, 2.0)
    series = (100 + 200 * drift[:, :1] + np.outer(source, rng.uniform(1, 2, 300))
              + rng.normal(scale=0.5, size=(n_t, 300))).T  # (V, T)
    components, meta = acompcor(series, drift)
    assert abs(np.corrcoef(components[:, 0], source)[0, 1]) > 0.95
    assert abs(components[:, 0] @ drift[:, 0]) < 1e-8  # high-passed before the SVD
    kept = [m for m in meta if m["Retained"]]
    assert len(kept) == components.shape[1] >= 1
    assert kept[-1]["CumulativeVarianceExplained"] >= 0.5
    assert len(kept) == 1 or kept[-2]["CumulativeVarianceExplained"] < 0.5


def test_tissue_masks_find_csf_and_white_matter(simulated):
    from helpers.analysis import simulate
    design = simulate.make_design(shape=SIM["shape"], seed=4)
    reference = np.asarray(simulated.img.dataobj[..., simulated.reference], dtype=np.float32)
    masks = tissue_masks(reference, brain_mask(reference))
    assert masks[CSF].sum() >= 10 and masks[WHITE_MATTER].sum() >= 10
    assert not (masks[CSF] & masks[WHITE_MATTER]).any()
    brain = design.gm + design.wm + design.csf > 0.5
    # WM: almost pure; CSF at 3.5 mm voxels shares them with GM, but is enriched well
    # above its share of the brain, and the two masks do not mix
    assert design.wm[masks[WHITE_MATTER]].mean() > 0.9
    assert design.csf[masks[CSF]].mean() > 3 * design.csf[brain].mean()
    assert design.csf[masks[WHITE_MATTER]].mean() < 0.05 and design.wm[masks[CSF]].mean() < 0.2


def test_rmsd_is_jenkinson_relative_to_the_previous_volume():
    affine, shape = np.diag([3.0, 3.0, 4.0, 1.0]), (16, 16, 10)
    params = np.zeros((3, 6))
    params[1, 0] = 1.0          # 1 mm shift: RMS 1 mm
    params[2, 0], params[2, 5] = 1.0, 0.02
    matrices = np.array([params_to_affine(p, affine, shape) for p in params])
    values = rmsd(matrices, affine, shape)
    assert np.isnan(values[0]) and values[1] == pytest.approx(1.0)
    assert values[2] == pytest.approx(rms_deviation(matrices[2], matrices[1],
                                                    centre=fov_centre(affine, shape)))


def test_confounds_stream_from_a_memmap(simulated, tmp_path):
    data = np.asarray(simulated.img.dataobj, dtype=np.float32)
    mapped = np.lib.format.open_memmap(tmp_path / "run.npy", mode="w+", dtype=np.float32,
                                       shape=data.shape)
    mapped[:] = data
    params = np.zeros((data.shape[-1], 6))
    matrices = np.repeat(np.eye(4)[None], data.shape[-1], axis=0)
    affine = simulated.img.affine
    in_memory = compute_confounds(data, data[..., 40], params, matrices, affine, tr=2.0)
    streamed = compute_confounds(mapped, mapped[..., 40], params, matrices, affine, tr=2.0)
    assert in_memory.columns.keys() == streamed.columns.keys()
    for name, values in in_memory.columns.items():
        assert np.allclose(values, streamed.columns[name], equal_nan=True), name


def test_engine_confounds_have_fmriprep_names_and_metadata(derivatives):
    table = pd_read(derivatives.outputs["confounds"])
    meta = json.loads(derivatives.outputs["confounds_json"].read_text())
    for base in (GLOBAL_SIGNAL, CSF, WHITE_MATTER):
        for name in (base, f"{base}_derivative1", f"{base}_power2",
                     f"{base}_derivative1_power2"):
            assert name in table.columns
    assert "rmsd" in table.columns and np.isnan(table["rmsd"].iloc[0])
    cosines = [c for c in table.columns if c.startswith(COSINE)]
    assert cosines == [f"cosine{k:02d}" for k in range(len(cosines))] and len(cosines) == 1
    comps = [c for c in table.columns if c.startswith(A_COMP_COR)]
    assert comps and comps[0] == "a_comp_cor_00"
    for name in comps:
        entry = meta[name]
        assert entry["Method"] == "aCompCor" and entry["Mask"] == "combined"
        assert entry["Retained"] is True
        assert {"SingularValue", "VarianceExplained", "CumulativeVarianceExplained"} <= set(entry)
    assert meta[comps[-1]]["CumulativeVarianceExplained"] >= 0.5
    assert all(not meta[k]["Retained"] for k in meta if k.startswith("dropped_"))
    # the global signal follows the run's mean over the engine's brain mask
    assert table[GLOBAL_SIGNAL].std() > 0


def pd_read(path):
    import pandas as pd
    return pd.read_csv(path, sep="\t", na_values=["n/a"])


@pytest.mark.parametrize("strategy, expected", [
    ("simple", {"trans_x", "cosine00", "csf", "white_matter"}),
    ("scrubbing", {"trans_x_derivative1_power2", "csf_power2", "white_matter"}),
    ("compcor", {"a_comp_cor_00", "cosine00", "trans_x"}),
])
def test_nilearn_reads_the_engine_confounds(derivatives, strategy, expected):
    from nilearn.interfaces.fmriprep import load_confounds_strategy

    img = derivatives.outputs["preproc_bold"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning (a missing column, ...) fails the test
        confounds, sample_mask = load_confounds_strategy(str(img), denoise_strategy=strategy)
    assert expected <= set(confounds.columns)
    assert len(confounds) == nib.load(img).shape[3]
    assert confounds.notna().all().all()


def test_nilearn_reads_the_global_signal(derivatives):
    from nilearn.interfaces.fmriprep import load_confounds

    confounds, _ = load_confounds(str(derivatives.outputs["preproc_bold"]),
                                  strategy=("motion", "wm_csf", "global_signal"),
                                  motion="basic", wm_csf="basic", global_signal="full")
    assert {"global_signal", "global_signal_derivative1_power2", "csf"} <= set(confounds.columns)
