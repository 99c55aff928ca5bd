"""Motion estimation recovers known rigid motion, whatever the affine."""

import os

import nibabel as nib
import nitime
import numpy as np
import pytest
from scipy import ndimage

from fmri_preproc import (
    affine_to_params,
    estimate_motion,
    fov_centre,
    params_to_affine,
    reslice_volume,
    rms_deviation,
)

SHAPE = (32, 32, 20)
rng = np.random.default_rng(42)
# a smooth analytic "head": Gaussian blobs (world mm), so every volume is sampled exactly
BLOB_CENTRES = rng.uniform(-35, 35, size=(40, 3)) * [1, 1, 0.6]
BLOB_WIDTHS = rng.uniform(5, 10, size=40)
BLOB_HEIGHTS = rng.uniform(200, 600, size=40)


def phantom(world):
    """Intensity at world points (N, 3)."""
    values = 800.0 * np.exp(-np.sum((world / [45, 45, 30]) ** 2, axis=1) ** 2)
    for c, w, h in zip(BLOB_CENTRES, BLOB_WIDTHS, BLOB_HEIGHTS):
        values += h * np.exp(-np.sum((world - c) ** 2, axis=1) / (2 * w**2))
    return values


def centred_affine(voxel=(3.5, 3.5, 4.0), rotation=np.eye(3), flip=(1, 1, 1)):
    lin = rotation @ np.diag(np.asarray(voxel) * flip)
    aff = np.eye(4)
    aff[:3, :3] = lin
    aff[:3, 3] = -lin @ ((np.array(SHAPE) - 1) / 2)
    return aff


def make_run(affine, motion, noise=0.0, seed=0):
    """Volumes t sample the phantom at inv(M_t) x: tissue at x in the reference is at M_t x."""
    ijk = np.indices(SHAPE).reshape(3, -1)
    world = (affine[:3, :3] @ ijk + affine[:3, 3:4]).T
    data = np.empty((*SHAPE, len(motion)), dtype=np.float32)
    noise_rng = np.random.default_rng(seed)
    for t, p in enumerate(motion):
        inv = np.linalg.inv(params_to_affine(p, affine, SHAPE))
        moved = world @ inv[:3, :3].T + inv[:3, 3]
        vol = phantom(moved).reshape(SHAPE)
        data[..., t] = vol + noise_rng.normal(scale=noise, size=SHAPE)
    return data


MOTION = np.array(
    [
        [0, 0, 0, 0, 0, 0],
        [0.5, -0.3, 0.2, 0.005, -0.004, 0.006],
        [1.2, -1.0, 0.6, 0.015, -0.012, 0.02],
        [2.0, -1.5, 1.0, 0.035, -0.02, 0.03],
        [1.5, 0.5, -2.0, -0.01, 0.035, -0.035],
    ]
)


def errors(matrices, motion, affine, ref):
    """Jenkinson RMS error (80 mm sphere) of estimates vs truth relative to the reference."""
    truth_ref = params_to_affine(motion[ref], affine, SHAPE)
    centre = fov_centre(affine, SHAPE)
    return np.array([
        rms_deviation(m, params_to_affine(p, affine, SHAPE) @ np.linalg.inv(truth_ref), centre=centre)
        for m, p in zip(matrices, motion)
    ])


def test_recovers_known_motion_exactly():
    aff = centred_affine()
    data = make_run(aff, MOTION)
    matrices = estimate_motion(data, aff, reference="first")
    err = errors(matrices, MOTION, aff, 0)
    assert err.max() < 0.01  # mm
    params = np.array([affine_to_params(m, aff, SHAPE) for m in matrices])
    assert np.allclose(params, MOTION, atol=0.01)
    assert np.allclose(matrices[0], np.eye(4))


def test_recovers_motion_with_noise_and_middle_reference():
    aff = centred_affine()
    data = make_run(aff, MOTION, noise=5.0)
    matrices = estimate_motion(data, aff)  # reference = middle = volume 2
    assert errors(matrices, MOTION, aff, 2).max() < 0.05


@pytest.mark.parametrize(
    "name, affine",
    [
        ("lps", centred_affine(flip=(-1, -1, 1))),
        ("anisotropic", centred_affine(voxel=(2.5, 3.0, 4.5))),
        ("oblique", centred_affine(rotation=params_to_affine([0, 0, 0, 0.3, -0.2, 0.4], np.eye(4), (1, 1, 1))[:3, :3])),
        ("permuted", centred_affine(rotation=np.array([[0, 1.0, 0], [0, 0, 1], [1, 0, 0]]), voxel=(3.5, 4.0, 3.5))),
    ],
)
def test_world_convention_independent_of_affine(name, affine):
    data = make_run(affine, MOTION)
    matrices = estimate_motion(data, affine, reference="first")
    assert errors(matrices, MOTION, affine, 0).max() < 0.02, name
    params = np.array([affine_to_params(m, affine, SHAPE) for m in matrices])
    # the same world motion gives the same parameters on any grid
    assert np.allclose(params[:, :3], MOTION[:, :3], atol=0.02)
    assert np.allclose(params[:, 3:], MOTION[:, 3:], atol=2e-4)


def test_reslice_undoes_motion():
    aff = centred_affine()
    data = make_run(aff, MOTION[[0, 3]])
    matrix = params_to_affine(MOTION[3], aff, SHAPE)
    resliced = reslice_volume(data[..., 1], aff, matrix)
    interior = (slice(4, -4), slice(4, -4), slice(3, -3))
    ref = data[..., 0][interior]
    assert np.abs(resliced[interior] - ref).max() < 0.05 * np.abs(ref).max()
    # identity reslice returns the volume itself
    assert np.allclose(reslice_volume(data[..., 0], aff, np.eye(4)), data[..., 0], atol=1e-3)


def test_recovers_motion_on_real_oblique_scan():
    """nitime's real fMRI volume (oblique affine, 2.08 x 2.08 x 2.3 mm), moved by a spline."""
    path = os.path.join(os.path.dirname(nitime.__file__), "data", "fmri1.nii.gz")
    img = nib.load(path)
    aff = img.affine
    vol = np.asanyarray(img.dataobj[..., 0], dtype=np.float32)
    # upsample 2x in-plane so registration has a field of view to work with
    vol = ndimage.zoom(vol, (3, 3, 1), order=3)
    aff = aff @ np.diag([1 / 3, 1 / 3, 1, 1])
    shape = vol.shape
    motion = np.array([[0, 0, 0, 0, 0, 0], [0.6, -0.4, 0.3, 0.01, -0.008, 0.012]])
    coeffs = ndimage.spline_filter(vol.astype(np.float64), 3)
    data = np.empty((*shape, 2), dtype=np.float32)
    for t, p in enumerate(motion):
        vox = np.linalg.inv(aff) @ np.linalg.inv(params_to_affine(p, aff, shape)) @ aff
        ijk = np.indices(shape).reshape(3, -1)
        coords = vox[:3, :3] @ ijk + vox[:3, 3:4]
        data[..., t] = ndimage.map_coordinates(coeffs, coords, order=3, prefilter=False,
                                               mode="nearest").reshape(shape)
    matrices = estimate_motion(data, aff, reference="first", smooth_fwhm=4.0)
    truth = params_to_affine(motion[1], aff, shape)
    assert rms_deviation(matrices[1], truth, centre=fov_centre(aff, shape)) < 0.05


@pytest.mark.parametrize("kwargs, match", [
    ({"reference": "last"}, "reference"),
    ({"reference": 9}, "outside"),
    ({"n_points": (10, 10)}, "n_points"),
])
def test_bad_arguments(kwargs, match):
    data = np.zeros((8, 8, 8, 3), dtype=np.float32)
    with pytest.raises(ValueError, match=match):
        estimate_motion(data, np.eye(4), **kwargs)


def test_bad_shapes():
    with pytest.raises(ValueError, match="4D"):
        estimate_motion(np.zeros((8, 8, 8)), np.eye(4))
    with pytest.raises(ValueError, match="4 voxels"):
        estimate_motion(np.zeros((8, 8, 2, 3)), np.eye(4))


def _smooth_field(shape):
    """A band-limited analytic volume and its formula, for exact reslicing checks."""
    def field(x, y, z):
        return 200 + 100 * np.sin(x / 5.0) * np.cos(y / 4.0) * np.sin(z / 3.0 + 1.0)
    return field(*np.indices(shape, dtype=float)).astype(np.float32), field


def test_reslice_is_cubic_accurate_on_an_oblique_anisotropic_grid():
    """Three 1D passes must equal sampling the analytic field at the mapped points."""
    shape = (40, 36, 24)
    vol, field = _smooth_field(shape)
    aff = centred_affine(rotation=params_to_affine([0, 0, 0, 0.2, -0.1, 0.3], np.eye(4),
                                                   (1, 1, 1))[:3, :3], flip=(-1, 1, 1))
    matrix = params_to_affine([1.3, -0.7, 0.9, 0.03, -0.025, 0.02], aff, shape)
    resliced = reslice_volume(vol, aff, matrix)
    vox = np.linalg.inv(aff) @ matrix @ aff
    ijk = np.indices(shape).reshape(3, -1)
    mapped = vox[:3, :3] @ ijk + vox[:3, 3:4]
    truth = field(*mapped).reshape(shape)
    core = (slice(6, -6), slice(6, -6), slice(5, -5))
    # trilinear interpolation errs by ~1 here (curvature x 1/8 voxel^2); cubic by < 0.05
    assert np.abs(resliced - truth)[core].max() < 0.05


def test_reslice_keeps_the_variance_of_a_half_voxel_shift():
    """Trilinear interpolation halves white noise's variance at a half-voxel shift."""
    shape = (32, 32, 20)
    aff = centred_affine()
    noise = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    matrix = params_to_affine([0.5 * 3.5, 0, 0, 0, 0, 0], aff, shape)
    resliced = reslice_volume(noise, aff, matrix)
    core = (slice(4, -4), slice(4, -4), slice(4, -4))
    assert resliced[core].var() / noise[core].var() > 0.6
