"""The motion-parameter convention: params_to_affine, its inverse, and the RMS deviation."""

import numpy as np
import pytest

from fmri_preproc import affine_to_params, fov_centre, params_to_affine, rms_deviation

SHAPE = (64, 64, 32)


def _affine():
    aff = np.diag([3.5, 3.5, 4.0, 1.0])
    aff[:3, 3] = [-110.0, -100.0, -60.0]
    return aff


def test_zero_params_is_identity():
    assert np.allclose(params_to_affine(np.zeros(6), _affine(), SHAPE), np.eye(4))


def test_round_trip():
    rng = np.random.default_rng(0)
    for _ in range(20):
        params = np.r_[rng.uniform(-5, 5, 3), rng.uniform(-0.3, 0.3, 3)]
        matrix = params_to_affine(params, _affine(), SHAPE)
        assert np.allclose(affine_to_params(matrix, _affine(), SHAPE), params, atol=1e-12)


def test_convention_rotation_about_fov_centre_in_x_y_z_order():
    aff = _affine()
    centre = fov_centre(aff, SHAPE)
    assert np.allclose(centre, aff[:3, :3] @ ((np.array(SHAPE) - 1) / 2) + aff[:3, 3])
    # pure rotation leaves the centre fixed
    m = params_to_affine([0, 0, 0, 0.1, -0.2, 0.3], aff, SHAPE)
    assert np.allclose(m @ np.r_[centre, 1], np.r_[centre, 1])
    # rot_z alone: a point 10 mm along +x from the centre turns towards +y (right-handed)
    m = params_to_affine([0, 0, 0, 0, 0, np.pi / 2], aff, SHAPE)
    assert np.allclose(m @ np.r_[centre + [10, 0, 0], 1], np.r_[centre + [0, 10, 0], 1])
    # order: R = Rx Ry Rz (z applied first)
    rx = params_to_affine([0, 0, 0, 0.3, 0, 0], aff, SHAPE)[:3, :3]
    ry = params_to_affine([0, 0, 0, 0, 0.2, 0], aff, SHAPE)[:3, :3]
    rz = params_to_affine([0, 0, 0, 0, 0, 0.1], aff, SHAPE)[:3, :3]
    full = params_to_affine([1, 2, 3, 0.3, 0.2, 0.1], aff, SHAPE)
    assert np.allclose(full[:3, :3], rx @ ry @ rz)
    # translation moves the centre by t
    assert np.allclose(full @ np.r_[centre, 1], np.r_[centre + [1, 2, 3], 1])


def test_negated_params_are_not_the_inverse():
    aff = _affine()
    p = np.array([2, 2, 2, *np.deg2rad([2, 2, 2])])
    m = params_to_affine(p, aff, SHAPE)
    negated = params_to_affine(-p, aff, SHAPE)
    centre = fov_centre(aff, SHAPE)
    assert rms_deviation(np.linalg.inv(m), negated, centre=centre) > 0.01
    assert rms_deviation(m @ np.linalg.inv(m), np.eye(4)) < 1e-12


def test_rms_deviation_matches_monte_carlo():
    rng = np.random.default_rng(1)
    aff = _affine()
    centre = fov_centre(aff, SHAPE)
    a = params_to_affine([1, -0.5, 0.3, 0.02, 0.01, -0.03], aff, SHAPE)
    b = params_to_affine([0.8, -0.4, 0.5, 0.01, 0.02, -0.02], aff, SHAPE)
    # uniform points in an 80 mm sphere around the centre
    pts = rng.normal(size=(200000, 3))
    pts *= 80 * rng.uniform(size=(200000, 1)) ** (1 / 3) / np.linalg.norm(pts, axis=1, keepdims=True)
    pts = np.c_[pts + centre, np.ones(len(pts))]
    mc = np.sqrt(np.mean(np.sum(((a - b) @ pts.T)[:3] ** 2, axis=0)))
    assert rms_deviation(a, b, centre=centre) == pytest.approx(mc, rel=5e-3)


@pytest.mark.parametrize("bad", [np.zeros(5), np.array([0, 0, 0, 0, 0, np.nan])])
def test_bad_params(bad):
    with pytest.raises(ValueError):
        params_to_affine(bad, _affine(), SHAPE)


def test_non_rigid_matrix_rejected():
    with pytest.raises(ValueError, match="rigid"):
        affine_to_params(np.diag([2.0, 1, 1, 1]), _affine(), SHAPE)
