"""Normalisation to MNI: known affine maps recovered, bad inputs refused, the asset rebuilt."""

from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from fmri_preproc import InputError, rms_deviation
from fmri_preproc.contract import TEMPLATE
from fmri_preproc.normalize import estimate_normalization, load_template, template_coverage
from fmri_preproc.transforms import _rotation

BRAIN_CENTRE = np.array([0.0, -18.0, 10.0])  # MNI mm: the sphere for the RMS error
EPI_CONTRAST = {"gm": 1.0, "wm": 0.75, "csf": 1.5}  # T2*: CSF > GM > WM (T1 is the reverse)


@pytest.fixture(scope="module")
def mni_epi():
    """An EPI-contrast head in MNI space (2 mm), from nilearn's own MNI152 maps, with a
    smooth coil-sensitivity field: (volume, affine)."""
    from nilearn import datasets

    mask_img = datasets.load_mni152_brain_mask(resolution=2)
    gm = datasets.load_mni152_gm_template(resolution=2).get_fdata(dtype=np.float32)
    wm = datasets.load_mni152_wm_template(resolution=2).get_fdata(dtype=np.float32)
    brain = mask_img.get_fdata(dtype=np.float32)
    csf = np.clip(brain - gm - wm, 0, 1)
    c = EPI_CONTRAST
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in brain.shape], indexing="ij")
    bias = 1.0 - 0.1 * y + 0.05 * z - 0.05 * x**2
    epi = 1000.0 * bias * (c["gm"] * gm + c["wm"] * wm + c["csf"] * csf)
    return ndimage.gaussian_filter(epi, 0.8).astype(np.float32), mask_img.affine


def affine_map(scale=(1, 1, 1), degrees=(0, 0, 0), shift=(0, 0, 0), shear=(0, 0, 0)):
    """A 12-parameter map (MNI mm -> native mm): shift + rotation @ scale @ shear."""
    lin = _rotation(*np.deg2rad(degrees)) @ np.diag(scale)
    lin = lin @ np.array([[1, shear[0], shear[1]], [0, 1, shear[2]], [0, 0, 1]])
    matrix = np.eye(4)
    matrix[:3, :3] = lin
    matrix[:3, 3] = shift
    return matrix


def grid_affine(shape, voxel, *, centre, degrees=(0, 0, 0), flip=(-1, 1, 1)):
    """An oblique native grid (LAS by default) whose field of view is centred at ``centre``."""
    lin = _rotation(*np.deg2rad(degrees)) @ np.diag(np.asarray(voxel, float) * flip)
    affine = np.eye(4)
    affine[:3, :3] = lin
    affine[:3, 3] = np.asarray(centre) - lin @ ((np.asarray(shape) - 1) / 2)
    return affine


def native_volume(mni_epi, truth, shape, affine, *, noise=20.0, seed=0):
    """The MNI-space head moved into native space by ``truth`` (MNI -> native), with scipy:
    native voxel v shows the MNI head at truth^-1 A v; Rician noise of SD ``noise``."""
    epi, mni_affine = mni_epi
    ijk = np.indices(shape).reshape(3, -1).astype(float)
    vox = np.linalg.inv(mni_affine) @ np.linalg.inv(truth) @ affine
    coords = vox[:3, :3] @ ijk + vox[:3, 3:4]
    vol = ndimage.map_coordinates(epi, coords, order=3, cval=0.0).reshape(shape)
    rng = np.random.default_rng(seed)
    vol = np.hypot(vol + noise * rng.standard_normal(shape), noise * rng.standard_normal(shape))
    return vol.astype(np.float32)


def test_template_asset_is_the_contracts_template():
    tpl = load_template()
    assert tpl.name == TEMPLATE == "MNI152NLin2009aSym"
    assert tpl.grid_shape == (99, 117, 95)  # nilearn's 2 mm grid
    assert np.allclose(tpl.grid_affine, [[2, 0, 0, -98], [0, 2, 0, -134], [0, 0, 2, -72],
                                         [0, 0, 0, 1]])
    # the cropped grid sits on the full grid's lattice, inside it
    start = np.array(tpl.crop_start)
    assert np.allclose(tpl.affine[:3, :3], tpl.grid_affine[:3, :3])
    assert np.allclose(tpl.affine[:3, 3], tpl.grid_affine[:3, :3] @ start + tpl.grid_affine[:3, 3])
    assert np.all(start >= 0) and np.all(start + tpl.gm.shape <= np.array(tpl.grid_shape))
    assert 1100 < tpl.brain.sum() * 8 / 1000 < 2200  # brain volume in ml
    assert 0 <= tpl.gm.min() and tpl.gm.max() <= 1 and tpl.wm.max() <= 1
    assert not tpl.gm.flags.writeable  # the cached maps cannot be changed by accident


CASES = {
    "identity": (affine_map(), (64, 64, 32), (3.5, 3.5, 4.0), (0, 0, 0)),
    "scaled-rotated": (affine_map((1.12, 0.9, 1.05), (12, -8, 10), (15, -12, 18),
                                  (0.04, -0.03, 0.05)), (64, 64, 32), (3.5, 3.5, 4.0),
                       (10, -5, 15)),
    # the head 60 mm from the MNI origin, an LPS oblique grid, a 96 mm slab (partial FOV)
    "far-partial": (affine_map((0.88, 1.1, 0.95), (-14, 6, -12), (-25, 40, 45)),
                    (80, 80, 32), (3.0, 3.0, 3.0), (-20, 0, 5)),
}


@pytest.mark.parametrize("name", CASES)
def test_recovers_known_affine(mni_epi, name):
    truth, shape, voxel, grid_rot = CASES[name]
    centre = truth[:3, :3] @ BRAIN_CENTRE + truth[:3, 3] + [4, -6, 8]  # head off-centre
    flip = (1, -1, 1) if name == "far-partial" else (-1, 1, 1)
    affine = grid_affine(shape, voxel, centre=centre, degrees=grid_rot, flip=flip)
    boldref = native_volume(mni_epi, truth, shape, affine)
    before = boldref.copy()
    fit = estimate_normalization(boldref, affine)
    assert np.array_equal(boldref, before)  # input not modified
    error = rms_deviation(fit.matrix, truth, centre=BRAIN_CENTRE)
    assert error < 0.75, f"{name}: {error:.2f} mm"
    assert fit.correlation > 0.95
    assert abs(fit.coverage - template_coverage(truth, affine, shape)) < 0.02
    if name == "far-partial":
        assert fit.coverage < 0.97  # the slab really misses part of the brain
        assert rms_deviation(fit.initial_matrix, truth, centre=BRAIN_CENTRE) > 2


def test_constant_volume_is_refused():
    with pytest.raises(InputError, match="constant"):
        estimate_normalization(np.full((64, 64, 32), 7.0, dtype=np.float32),
                               np.diag([3.5, 3.5, 4.0, 1.0]))


def test_tiny_field_of_view_is_refused():
    rng = np.random.default_rng(0)
    with pytest.raises(InputError, match="field of view is 14 ml") as info:
        estimate_normalization(rng.random((8, 8, 8)).astype(np.float32),
                               np.diag([3.0, 3.0, 3.0, 1.0]))
    assert "whole-brain" in info.value.action


def test_thin_slab_is_refused(mni_epi):
    """Six 3.5 mm slices: over a litre of space, but under a third of the brain."""
    shape, voxel = (64, 64, 6), (3.5, 3.5, 3.5)
    affine = grid_affine(shape, voxel, centre=BRAIN_CENTRE)
    boldref = native_volume(mni_epi, np.eye(4), shape, affine)
    with pytest.raises(InputError, match="can hold only 26% of the MNI brain"):
        estimate_normalization(boldref, affine)


def test_noise_is_refused():
    rng = np.random.default_rng(1)
    with pytest.raises(InputError, match="does not look like a brain EPI"):
        estimate_normalization(rng.random((64, 64, 32)).astype(np.float32),
                               grid_affine((64, 64, 32), (3.5, 3.5, 4.0), centre=BRAIN_CENTRE))


@pytest.mark.parametrize("bad, match", [
    (np.zeros((64, 64)), "3D"),
    (np.zeros((64, 64, 32, 2)), "3D"),
])
def test_wrong_dimensions_are_refused(bad, match):
    with pytest.raises(InputError, match=match):
        estimate_normalization(bad, np.eye(4))


def test_unusable_affine_is_refused():
    with pytest.raises(InputError, match="affine"):
        estimate_normalization(np.ones((64, 64, 32)), np.zeros((4, 4)))


@pytest.mark.slow
def test_rebuilding_the_asset_reproduces_it(tmp_path):
    """The committed asset is exactly what the builder makes from nilearn's files."""
    import runpy

    from fmri_preproc import normalize

    builder = runpy.run_path(str(normalize._DATA / "build_mni152_template.py"))
    assert builder["TEMPLATE"] == TEMPLATE
    for path in builder["build"](tmp_path):
        committed = normalize._DATA / path.name
        assert committed.read_bytes() == path.read_bytes(), path.name
    assert (normalize._DATA / f"{normalize.TEMPLATE_STEM}.nii.gz").stat().st_size < 600_000


REAL_RUN = Path(__file__).resolve().parents[2] / "shared/data/realdata/" \
    "studyforrest_oneback_full_bold.nii.gz"


@pytest.mark.slow
@pytest.mark.skipif(not REAL_RUN.exists(), reason="the shared real scans are not here")
def test_real_oblique_run_lands_on_the_template_brain():
    """A real Philips run (oblique LAS, partial coverage, the head far from the MNI origin):
    its EPI brain mask (nilearn's compute_epi_mask, made independently) carried to MNI
    overlaps the template's brain mask with Dice >= 0.9 inside the EPI's field of view."""
    import nibabel as nib
    from nilearn.masking import compute_epi_mask

    img = nib.load(REAL_RUN)
    boldref = np.asarray(img.dataobj[..., img.shape[3] // 2], dtype=np.float32)
    fit = estimate_normalization(boldref, img.affine)
    tpl = load_template()
    vox = np.linalg.inv(img.affine) @ fit.matrix @ tpl.affine
    coords = vox[:3, :3] @ np.indices(tpl.brain.shape).reshape(3, -1) + vox[:3, 3:4]
    epi_mask = compute_epi_mask(nib.Nifti1Image(boldref, img.affine)).get_fdata() > 0
    carried = ndimage.map_coordinates(epi_mask.astype(float), coords, order=1) > 0.5
    fov = ndimage.map_coordinates(np.ones(boldref.shape), coords, order=0) > 0
    carried, brain, fov = (a.reshape(tpl.brain.shape) for a in (carried, tpl.brain, fov))
    dice = 2 * np.sum(carried & brain & fov) / (np.sum(carried & fov) + np.sum(brain & fov))
    assert dice >= 0.9, dice
    assert 0.8 < fit.coverage < 1.0 and fit.correlation > 0.85
