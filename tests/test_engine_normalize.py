"""Normalisation to MNI: known affine maps recovered, bad inputs refused, the asset rebuilt."""

import json
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from fmri_preproc import InputError, rms_deviation
from fmri_preproc.contract import TEMPLATE
from fmri_preproc.normalize import (
    TemplateResampler,
    estimate_normalization,
    format_itk_affine,
    load_template,
    normalization_figure,
    parse_itk_affine,
    read_itk_affine,
    template_coverage,
    write_itk_affine,
)
from fmri_preproc.png import encode_png, write_png
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
    record = json.loads(json.dumps(fit.to_dict()))  # sidecar-ready
    assert record["Template"] == TEMPLATE and np.allclose(record["MatrixTemplateToBoldref"],
                                                         fit.matrix, atol=1e-7)
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


@pytest.mark.slow
def test_real_oblique_run_lands_on_the_template_brain(real_run):
    """A real Philips run (oblique LAS, partial coverage, the head far from the MNI origin):
    its EPI brain mask (nilearn's compute_epi_mask, made independently) carried to MNI
    overlaps the template's brain mask with Dice >= 0.9 inside the EPI's field of view."""
    import nibabel as nib
    from nilearn.masking import compute_epi_mask

    img = nib.load(real_run)
    boldref = np.asarray(img.dataobj[..., img.shape[3] // 2], dtype=np.float32)
    fit = estimate_normalization(boldref, img.affine)
    resampler = TemplateResampler(img.affine, fit.matrix)
    epi_mask = compute_epi_mask(nib.Nifti1Image(boldref, img.affine)).get_fdata() > 0
    carried = resampler.mask(epi_mask) > 0
    fov = resampler.mask(np.ones(boldref.shape, dtype=bool)) > 0
    brain = resampler.brain
    dice = 2 * np.sum(carried & brain & fov) / (np.sum(carried & fov) + np.sum(brain & fov))
    assert dice >= 0.9, dice
    assert 0.8 < fit.coverage < 1.0 and fit.correlation > 0.85


# ------------------------------------------------------------------------------------------
# Resampling into the template grid

RUN_SHAPE = (40, 44, 30)
RUN_AFFINE = grid_affine(RUN_SHAPE, (3.5, 3.5, 4.0), centre=(5, -10, 20), degrees=(8, -5, 12))
NORMALIZATION = affine_map((1.05, 0.95, 1.1), (6, -4, 3), (4, -6, 8), (0.02, 0.0, -0.03))


def smooth_run_volume(seed=0):
    """Smooth random texture (about 7 mm blobs): 1000 +- 200."""
    rng = np.random.default_rng(seed)
    texture = ndimage.gaussian_filter(rng.standard_normal(RUN_SHAPE), 2.0)
    return (1000 + 200 * texture / texture.std()).astype(np.float32)


def test_resampling_matches_nibabel_on_a_known_affine():
    """Our grid, voxel order and convention: nibabel resamples the same volume, given an
    affine that places it in template space (template x at run voxel A^-1 N x)."""
    import nibabel as nib
    from nibabel.processing import resample_from_to

    volume = smooth_run_volume()
    resampler = TemplateResampler(RUN_AFFINE, NORMALIZATION)
    ours = resampler.volume(volume)
    in_template = nib.Nifti1Image(volume, np.linalg.inv(NORMALIZATION) @ RUN_AFFINE)
    theirs = resample_from_to(in_template, (resampler.shape, resampler.affine), order=1,
                              cval=0).get_fdata()
    computed = ours != 0
    assert computed.sum() > 100_000
    interior = ndimage.binary_erosion(theirs != 0, iterations=2)  # away from the FOV edge
    both = computed & interior
    assert both.sum() > 50_000
    assert np.allclose(ours[both], theirs[both], rtol=1e-4, atol=1e-2)
    # the dilated template brain is covered; far from it nothing is computed
    assert not ours[:3].any() and resampler.shape == (99, 117, 95)


def moved_volume(volume, motion):
    """Volume after head motion ``motion`` (reference point -> moving point), with scipy."""
    vox = np.linalg.inv(RUN_AFFINE) @ np.linalg.inv(motion) @ RUN_AFFINE
    return ndimage.affine_transform(volume, vox[:3, :3], vox[:3, 3], order=3,
                                    mode="nearest").astype(np.float32)


def test_series_composes_motion_and_normalisation():
    """Each volume, moved by its own motion, lands on the boldref's template image."""
    from fmri_preproc import params_to_affine

    volume = smooth_run_volume(1)
    params = [[0, 0, 0, 0, 0, 0], [1.5, -1.0, 0.8, 0.02, -0.015, 0.01],
              [-2.0, 0.5, 1.2, -0.01, 0.03, -0.02]]
    motion = np.array([params_to_affine(p, RUN_AFFINE, RUN_SHAPE) for p in params])
    data = np.stack([moved_volume(volume, m) for m in motion], axis=-1)
    resampler = TemplateResampler(RUN_AFFINE, NORMALIZATION)
    reference = resampler.volume(volume)
    series = list(resampler.series(data, motion))
    assert len(series) == 3 and all(v.dtype == np.float32 for v in series)
    core = ndimage.binary_erosion(reference != 0, iterations=4)
    spread = reference[core].std()
    for t, out in enumerate(series):
        assert np.abs(out[core] - reference[core]).mean() < 0.04 * spread, t  # 0.017 seen
    # without the motion matrix the moved volume does not line up
    unmoved = resampler.volume(data[..., 2])
    assert np.abs(unmoved[core] - reference[core]).mean() > 0.15 * spread  # 0.23 seen


def test_mask_resampling_agrees_with_nearest_neighbour():
    import nibabel as nib
    from nibabel.processing import resample_from_to

    # an ellipsoidal "brain" in the run's grid (world mm), off-centre
    ijk = np.indices(RUN_SHAPE).reshape(3, -1)
    world = RUN_AFFINE[:3, :3] @ ijk + RUN_AFFINE[:3, 3:4]
    radii = np.array([[55.0], [65.0], [45.0]])
    native = (np.sum(((world - [[8.0], [-15.0], [15.0]]) / radii) ** 2, axis=0) < 1)
    native = native.reshape(RUN_SHAPE)
    resampler = TemplateResampler(RUN_AFFINE, NORMALIZATION)
    ours = resampler.mask(native)
    assert ours.dtype == np.uint8 and set(np.unique(ours)) <= {0, 1}
    in_template = nib.Nifti1Image(native.astype(np.uint8), np.linalg.inv(NORMALIZATION) @ RUN_AFFINE)
    nearest = resample_from_to(in_template, (resampler.shape, resampler.affine), order=0,
                               cval=0).get_fdata() > 0
    region = ndimage.binary_dilation(resampler.brain, iterations=4)
    a, b = ours.astype(bool) & region, nearest & region
    assert 2 * np.sum(a & b) / (a.sum() + b.sum()) > 0.98


def test_resampler_refuses_bad_shapes():
    resampler = TemplateResampler(RUN_AFFINE, NORMALIZATION)
    with pytest.raises(ValueError, match="3D"):
        resampler.volume(np.zeros((4, 4)))
    with pytest.raises(ValueError, match="one motion matrix per volume"):
        list(resampler.series(np.zeros((*RUN_SHAPE, 3)), np.tile(np.eye(4), (2, 1, 1))))


# ------------------------------------------------------------------------------------------
# ITK transform files


def test_itk_round_trip_is_exact(tmp_path):
    path = write_itk_affine(tmp_path / "xfm.txt", NORMALIZATION)
    text = path.read_text()
    assert text.splitlines()[:3] == ["#Insight Transform File V1.0", "#Transform 0",
                                     "Transform: AffineTransform_double_3_3"]
    assert np.array_equal(read_itk_affine(path), NORMALIZATION)


def test_itk_file_is_lps_template_to_boldref(tmp_path):
    """The stored numbers are the LPS form of the map, and nitransforms (the NiPreps reader
    fMRIPrep uses) reads the same RAS map back."""
    from nitransforms import linear

    path = write_itk_affine(tmp_path / "xfm.txt", NORMALIZATION)
    numbers = np.array(path.read_text().splitlines()[3].split()[1:], dtype=float)
    flip = np.diag([-1, -1, 1, 1.0])
    lps = flip @ NORMALIZATION @ flip
    assert np.allclose(numbers[:9], lps[:3, :3].ravel()) and np.allclose(numbers[9:], lps[:3, 3])
    assert np.allclose(linear.load(path, fmt="itk").matrix, NORMALIZATION, atol=1e-5)


def test_itk_centre_is_honoured():
    """ITK's y = A (x - c) + c + T: a file with a centre gives the same map as one without."""
    lin = np.array([[1.1, 0.1, 0.0], [0.0, 0.9, 0.2], [0.05, 0.0, 1.0]])
    centre, trans = np.array([10.0, -20.0, 30.0]), np.array([1.0, 2.0, 3.0])
    text = ("#Insight Transform File V1.0\n#Transform 0\n"
            "Transform: MatrixOffsetTransformBase_float_3_3\n"
            f"Parameters: {' '.join(map(str, [*lin.ravel(), *trans]))}\n"
            f"FixedParameters: {' '.join(map(str, centre))}\n")
    matrix = parse_itk_affine(text)
    flip = np.diag([-1, -1, 1, 1.0])
    x = np.array([12.0, -7.0, 44.0])  # a point in LPS
    expected = lin @ (x - centre) + centre + trans
    assert np.allclose((flip @ matrix @ flip)[:3] @ [*x, 1], expected)
    assert np.allclose(parse_itk_affine(format_itk_affine(matrix)), matrix)


@pytest.mark.parametrize("text, match", [
    ("hello\n", "not an ITK"),
    ("#Insight Transform File V1.0\nTransform: BSplineTransform_double_3_3\n", "not a 3-D affine"),
    ("#Insight Transform File V1.0\nTransform: AffineTransform_double_3_3\nParameters: 1 0 0\n"
     "FixedParameters: 0 0 0\n", "12 Parameters"),
    ("#Insight Transform File V1.0\n#Transform 0\nTransform: AffineTransform_double_3_3\n"
     "Parameters: 1 0 0 0 1 0 0 0 1 0 0 0\nFixedParameters: 0 0 0\n#Transform 1\n"
     "Transform: AffineTransform_double_3_3\n", "more than one"),
])
def test_bad_itk_files_are_refused(text, match):
    with pytest.raises(ValueError, match=match):
        parse_itk_affine(text)


# ------------------------------------------------------------------------------------------
# PNG and the QC figure


def test_png_decodes_to_the_same_pixels(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 256, size=(37, 53, 3), dtype=np.uint8)
    grey = rng.integers(0, 256, size=(20, 11), dtype=np.uint8)
    for image in (rgb, grey):
        path = write_png(tmp_path / "x.png", image)
        with Image.open(path) as decoded:
            assert decoded.mode == ("RGB" if image.ndim == 3 else "L")
            assert np.array_equal(np.asarray(decoded), image)
    with pytest.raises(ValueError, match="uint8"):
        encode_png(rgb.astype(np.float32))


def test_normalization_figure_is_a_legible_png(tmp_path):
    from PIL import Image

    tpl = load_template()
    image = np.zeros(tpl.grid_shape, dtype=np.float32)
    image[tpl.crop] = 1000 * tpl.gm + 700 * tpl.wm  # a "normalised EPI" that fits
    picture = normalization_figure(image, n_slices=5, zoom=3)
    nx, ny, nz = tpl.gm.shape
    gap = 6
    # rows: sagittal (z by y), coronal (z by x), axial (y by x), 5 slices each
    assert picture.shape == (3 * (nz + nz + ny) + 2 * gap, 5 * 3 * ny + 4 * gap, 3)
    path = write_png(tmp_path / "figure.png", picture)
    with Image.open(path) as decoded:
        assert decoded.size == (picture.shape[1], picture.shape[0])
        pixels = np.asarray(decoded)
    red = np.all(pixels == [255, 70, 50], axis=2)
    blue = np.all(pixels == [60, 170, 255], axis=2)
    assert red.sum() > 2000 and blue.sum() > 2000  # both outlines drawn
    grey = pixels[..., 0] == pixels[..., 1]
    assert np.mean(pixels[grey & (pixels[..., 0] > 0)]) > 60  # the image shows through
    with pytest.raises(ValueError, match="template grid"):
        normalization_figure(np.zeros((10, 10, 10)))
