"""The simulator's ground truth: motion convention, networks, headers, determinism."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

from fmri_preproc import params_to_affine
from helpers.analysis import simulate

SMALL = dict(shape=(24, 24, 12), n_volumes=20, tr=2.0)


@pytest.fixture(scope="module")
def run():
    return simulate.simulate_run(**SMALL, seed=3)


@pytest.fixture(scope="module")
def design():
    return simulate.make_design(shape=SMALL["shape"], seed=3)


def _blob(shape, centre_vox, sigma=1.5):
    """A smooth Gaussian blob (band-limited, so spline resampling is near exact)."""
    grid = np.indices(shape).astype(float)
    d2 = sum((g - c) ** 2 for g, c in zip(grid, centre_vox))
    return np.exp(-d2 / (2 * sigma**2)).astype(np.float32)


def test_tissue_moves_to_params_to_affine_position(design):
    """Tissue at reference point p appears at M p in the moved volume (the convention)."""
    shape, affine = design.shape, design.affine
    p_vox = np.array([10.0, 13.0, 5.0])
    vol = _blob(shape, p_vox)[..., None]
    params = np.array([[3.0, -2.0, 1.5, 0.05, -0.03, 0.08]])
    moved = simulate.apply_motion(vol, affine, params)[..., 0]
    centroid_vox = np.array(ndimage.center_of_mass(np.clip(moved, 0, None)))
    centroid_mm = affine[:3, :3] @ centroid_vox + affine[:3, 3]
    p_mm = np.append(affine[:3, :3] @ p_vox + affine[:3, 3], 1)
    expected = params_to_affine(params[0], affine, shape) @ p_mm
    np.testing.assert_allclose(centroid_mm, expected[:3], atol=0.15)


def test_inverting_the_applied_motion_recovers_the_volume(design):
    """Resampling with the inverse 4x4 undoes the motion (not negated parameters)."""
    shape, affine = design.shape, design.affine
    vol = ndimage.gaussian_filter(design.baseline, 1.5)[..., None]
    params = np.array([[1.5, -1.0, 2.0, np.deg2rad(2), np.deg2rad(-1.5), np.deg2rad(1)]])
    moved = simulate.apply_motion(vol, affine, params)[..., 0]
    world = params_to_affine(params[0], affine, shape)
    back_vox = np.linalg.inv(affine) @ world @ affine  # sample moved at A^-1 M A v
    restored = ndimage.affine_transform(moved, back_vox[:3, :3], back_vox[:3, 3], order=3)
    inner = (slice(4, -4), slice(4, -4), slice(3, -3))
    scale = vol[..., 0][inner].max()
    assert np.abs(restored[inner] - vol[..., 0][inner]).max() / scale < 0.01
    # negating the parameters is a (slightly) different, wrong inverse
    wrong = simulate.apply_motion(moved[..., None], affine, -params)[..., 0]
    reference = vol[..., 0][inner]
    assert np.abs(wrong[inner] - reference).max() > np.abs(restored[inner] - reference).max()


def test_whole_voxel_translation_is_exact(design):
    """A translation of exactly one voxel shifts the array by one index, bit for bit."""
    vol = design.baseline[..., None]
    dx = design.affine[0, 0]
    moved = simulate.apply_motion(vol, design.affine, np.array([[dx, 0, 0, 0, 0, 0]]))[..., 0]
    np.testing.assert_allclose(moved[1:], design.baseline[:-1], rtol=1e-5, atol=1e-3)


def test_motion_trace_peaks_and_starts_at_zero():
    motion = simulate.make_motion(100, max_translation_mm=1.5, max_rotation_deg=1.0, seed=1)
    assert motion.shape == (100, 6)
    np.testing.assert_array_equal(motion[0], 0)
    assert np.isclose(np.abs(motion[:, :3]).max(), 1.5)
    assert np.isclose(np.abs(motion[:, 3:]).max(), np.deg2rad(1.0))
    fd = simulate.framewise_displacement(motion)
    assert fd[0] == 0 and fd.max() > 5 * np.median(fd)  # jerks stand out from the drift
    still = simulate.make_motion(100, max_translation_mm=0, max_rotation_deg=0, seed=1)
    np.testing.assert_array_equal(still, 0)


def test_true_matrix_has_network_structure(design):
    truth = design.true_connectivity
    nets = design.regions["network"].to_numpy()
    assert np.allclose(truth, truth.T) and np.allclose(np.diag(truth), 1)
    assert np.linalg.eigvalsh(truth).min() > 0
    same = nets[:, None] == nets[None]
    off = ~np.eye(len(nets), dtype=bool)
    assert truth[same & off].min() > np.abs(truth[~same]).max()
    assert set(nets) == set(simulate.NETWORKS)
    # every region is in the labels image, on the grid
    assert sorted(np.unique(design.labels))[1:] == list(design.regions["index"])


def test_region_signals_follow_the_true_matrix(design):
    signals = simulate._region_signals(design, np.random.default_rng(0), 4000, 2.0)
    empirical = np.corrcoef(signals.T)
    assert np.abs(empirical - design.true_connectivity).max() < 0.12


def test_run_image_header_and_truth(run):
    img = run.img
    assert img.shape == (*SMALL["shape"], SMALL["n_volumes"])
    assert img.get_data_dtype() == np.float32
    assert img.header.get_zooms()[3] == pytest.approx(2.0)
    assert img.header.get_xyzt_units() == ("mm", "sec")
    np.testing.assert_allclose(run.labels_img.affine, img.affine)
    assert run.motion.shape == (SMALL["n_volumes"], 6)
    assert len(run.networks) == run.true_connectivity.shape[0] == run.signals.shape[1]
    data = np.asarray(img.dataobj)
    brain = np.asarray(run.brain_mask_img.dataobj) > 0
    assert data[brain].mean() > 10 * data[~brain].mean() > 0  # brain vs faint background


def test_tsnr_of_a_still_run_is_realistic():
    still = simulate.simulate_run(shape=(32, 32, 16), n_volumes=60, max_translation_mm=0,
                                  max_rotation_deg=0, seed=0)
    data = np.asarray(still.img.dataobj)[np.asarray(still.brain_mask_img.dataobj) > 0]
    tsnr = np.median(data.mean(1) / data.std(1))
    assert 50 <= tsnr <= 100


def test_same_seed_same_run_other_seed_other_run(run):
    again = simulate.simulate_run(**SMALL, seed=3)
    other = simulate.simulate_run(**SMALL, seed=4)
    np.testing.assert_array_equal(np.asarray(again.img.dataobj), np.asarray(run.img.dataobj))
    np.testing.assert_array_equal(again.motion, run.motion)
    assert not np.array_equal(other.motion, run.motion)


def test_study_writes_inputs_and_truth(tmp_path):
    table = simulate.simulate_study(tmp_path, n_subjects=3, shape=(20, 20, 10), n_volumes=12,
                                    seed=1, n_jobs=1)
    assert list(table["subject"]) == ["sub-01", "sub-02", "sub-03"]
    assert all(p.exists() and p.name.endswith("_task-rest_bold.nii.gz") for p in table["bold"])
    truth = simulate.load_truth(tmp_path)
    assert set(truth["motion"]) == {"sub-01", "sub-02", "sub-03"}
    assert list(truth["motion"]["sub-01"].shape) == [12, 6]
    regions, matrix = truth["regions"], truth["true_connectivity"]
    assert list(matrix.index) == list(regions["name"])
    motion_cols = pd.read_csv(tmp_path / "truth" / "sub-01_task-rest_motion.tsv", sep="\t").columns
    assert list(motion_cols) == ["trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z"]
    # severities are spread: the stillest subject moves much less than the most-moving one
    assert table["max_translation_mm"].max() > 5 * table["max_translation_mm"].min()
    # a smaller second study replaces the first one's inputs
    simulate.simulate_study(tmp_path, n_subjects=2, shape=(20, 20, 10), n_volumes=12, seed=1,
                            n_jobs=1)
    assert len(list((tmp_path / "raw").glob("*_bold.nii.gz"))) == 2
