"""Nonsense motion is never "processed": diverged, noise-only, gain jumps, dropped volumes."""

import numpy as np
import pytest
from phantom import moving_blobs

from fmri_preproc import (
    affine_to_params,
    estimate_motion,
    fov_centre,
    framewise_displacement,
    params_to_affine,
    rms_deviation,
)
from fmri_preproc.inputs import InputError
from fmri_preproc.plausibility import check_motion, is_plausible, spatial_autocorrelation

SHAPE = (24, 24, 16)
N_VOLUMES = 16
REF = N_VOLUMES // 2


def affine_for(shape, voxel=(3.5, 3.5, 4.0)):
    aff = np.diag([*voxel, 1.0])
    aff[:3, 3] = -np.asarray(voxel) * (np.asarray(shape) - 1) / 2
    return aff


def blob_run(shape=SHAPE, motion=None, noise=1.0, seed=0):
    """A noisy blob head, still unless ``motion`` (T, 6) is given."""
    rng = np.random.default_rng(seed)
    motion = np.zeros((N_VOLUMES, 6)) if motion is None else motion
    affine = affine_for(shape)
    extent = np.asarray(shape) * [3.5, 3.5, 4.0] / 2
    centres = rng.uniform(-0.5, 0.5, size=(12, 3)) * extent
    data = moving_blobs(shape, affine, motion, centres, head_mm=0.8 * extent, head_amp=800,
                        blob_sigma_mm=6.0, baseline=50.0)
    data += rng.normal(scale=noise, size=data.shape).astype(np.float32)
    return data, affine


def fd_of(matrices, affine, shape):
    params = np.array([affine_to_params(m, affine, shape) for m in matrices])
    return framewise_displacement(params)[1:]


def test_constant_volume_does_not_move_its_unmoved_neighbours():
    data, affine = blob_run()
    clean = estimate_motion(data, affine, reference=REF)
    bad = REF + 3
    data[..., bad] = 0.0  # a dropped, zero-filled volume
    matrices = estimate_motion(data, affine, reference=REF)
    assert np.array_equal(matrices[bad], np.eye(4))  # left unmoved
    others = np.delete(np.arange(N_VOLUMES), bad)
    fd = fd_of(matrices[others], affine, SHAPE)
    assert fd.max() < 0.1  # the head never moved; neither do the others' estimates
    centre = fov_centre(affine, SHAPE)
    assert max(rms_deviation(matrices[t], clean[t], centre=centre) for t in others) < 0.02
    warnings = check_motion(data, affine, matrices, REF, name="run")
    assert any("constant volume" in w and f"volume {bad}" in w for w in warnings)


def test_noise_only_reference_fails_with_a_reason():
    data, affine = blob_run()
    data[..., REF] = np.random.default_rng(3).normal(500, 100, SHAPE)
    with pytest.raises(ValueError, match="noise"):
        estimate_motion(data, affine, reference=REF)


def test_gain_jump_keeps_estimates_and_warns():
    t = np.arange(N_VOLUMES)[:, None]
    motion = np.hstack([0.8 * np.sin(t / 3.0) * [1, -0.5, 0.3],
                        0.01 * np.cos(t / 4.0) * [1, 0.5, -0.7]])
    motion -= motion[REF]
    data, affine = blob_run(motion=motion)
    jump = REF + 4
    data[..., jump] *= 10.0
    matrices = estimate_motion(data, affine, reference=REF)
    centre = fov_centre(affine, SHAPE)
    errors = [rms_deviation(m, params_to_affine(p, affine, SHAPE), centre=centre)
              for m, p in zip(matrices, motion)]
    assert max(errors) < 0.1
    warnings = check_motion(data, affine, matrices, REF, name="run")
    assert any("gain jump" in w and f"volume {jump}" in w for w in warnings)


def test_tiny_grid_never_reports_a_diverged_estimate():
    """On a 6x6x4 grid an estimate may fail, but never as a huge plausible-looking FD."""
    shape = (6, 6, 4)
    t = np.arange(N_VOLUMES)[:, None]
    motion = np.hstack([1.5 * np.sin(t / 2.0) * [1, -1, 0.5], 0.03 * np.cos(t / 2.0) * [1, 1, 1]])
    data, affine = blob_run(shape=shape, motion=motion - motion[REF], noise=20.0)
    try:
        matrices = estimate_motion(data, affine, reference=REF)
        check_motion(data, affine, matrices, REF, name="run")
    except (ValueError, InputError):
        return  # a clear failure is the right answer too
    assert fd_of(matrices, affine, shape).max() < 30.0
    centre = fov_centre(affine, shape)
    assert all(is_plausible(m, centre) for m in matrices)


def test_check_motion_fails_a_diverged_estimate():
    data, affine = blob_run()
    matrices = np.tile(np.eye(4), (N_VOLUMES, 1, 1))
    matrices[3, 0, 3] = 120.0  # 12 cm: beyond the field of view
    with pytest.raises(InputError, match="diverged"):
        check_motion(data, affine, matrices, REF, name="run")
    matrices[3, 0, 3] = np.nan
    with pytest.raises(InputError, match="diverged"):
        check_motion(data, affine, matrices, REF, name="run")


def test_check_motion_fails_an_impossible_jump_and_warns_an_extreme_one():
    data, affine = blob_run()
    matrices = np.tile(np.eye(4), (N_VOLUMES, 1, 1))
    matrices[4:, 0, 3] = 8.0  # an 8 mm step: possible, extreme
    warnings = check_motion(data, affine, matrices, REF, name="run")
    assert any("framewise displacement reaches 8.0 mm" in w for w in warnings)
    matrices[4:, 0, 3], matrices[4:, 1, 3] = 20.0, -20.0  # 40 mm in one TR
    with pytest.raises(InputError, match="framewise displacement"):
        check_motion(data, affine, matrices, REF, name="run")


def test_autocorrelation_separates_a_head_from_noise():
    data, _ = blob_run()
    noise = np.random.default_rng(1).normal(size=SHAPE)
    assert spatial_autocorrelation(data[..., 0]) > 0.8
    assert abs(spatial_autocorrelation(noise)) < 0.1
