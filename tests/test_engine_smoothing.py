"""Smoothing matches nilearn.image.smooth_img (numpy only, FWHM in mm)."""

import nibabel as nib
import numpy as np
import pytest
from nilearn.image import smooth_img
from scipy import ndimage

from fmri_preproc import params_to_affine, smooth
from fmri_preproc.smoothing import fwhm_to_sigma, gaussian_kernel


def _relative_error(ours, theirs):
    return np.abs(ours - theirs).max() / np.abs(theirs).max()


AFFINES = {
    "anisotropic": np.diag([3.5, 3.5, 4.0, 1.0]),
    "lps": np.diag([-2.0, -2.5, 3.0, 1.0]),
    "oblique": params_to_affine([5, -3, 2, 0.2, -0.3, 0.25], np.eye(4), (1, 1, 1)) @ np.diag([3.0, 3.5, 4.0, 1.0]),
}


@pytest.mark.parametrize("name", sorted(AFFINES))
@pytest.mark.parametrize("fwhm", [6.0, 4.0, 15.0])
def test_matches_nilearn(name, fwhm):
    rng = np.random.default_rng(0)
    data = (rng.normal(size=(20, 18, 12, 3)) * 100 + 1000).astype(np.float32)
    affine = AFFINES[name]
    expected = smooth_img(nib.Nifti1Image(data, affine), fwhm).get_fdata()
    ours = smooth(data, affine, fwhm)
    assert ours.dtype == np.float32
    assert _relative_error(ours, expected) < 1e-4


def test_nonfinite_values_become_zero_like_nilearn():
    rng = np.random.default_rng(1)
    data = rng.normal(size=(10, 10, 10, 2)).astype(np.float32)
    data[2, 3, 4, 0] = np.nan
    data[5, 5, 5, 1] = np.inf
    affine = np.diag([3.0, 3.0, 3.0, 1.0])
    expected = smooth_img(nib.Nifti1Image(data, affine), 6.0).get_fdata()
    ours = smooth(data, affine, 6.0)
    assert np.all(np.isfinite(ours))
    assert _relative_error(ours, expected) < 1e-4


def test_fwhm_zero_is_identity_and_in_place_works():
    rng = np.random.default_rng(2)
    data = rng.normal(size=(8, 8, 8, 2)).astype(np.float32)
    assert np.array_equal(smooth(data, np.eye(4), 0.0), data)
    copy = data.copy()
    out = smooth(data, np.eye(4), 5.0, out=data)
    assert out is data
    assert np.allclose(data, smooth(copy, np.eye(4), 5.0))


def test_kernel_and_sigma_match_scipy():
    sigma = fwhm_to_sigma(6.0, np.diag([3.5, 3.5, 4.0, 1.0]))
    assert np.allclose(sigma, 6.0 / np.sqrt(8 * np.log(2)) / np.array([3.5, 3.5, 4.0]))
    x = np.zeros(41)
    x[20] = 1
    assert np.allclose(gaussian_kernel(1.7), ndimage.gaussian_filter1d(x, 1.7)[20 - 7 : 20 + 8])


@pytest.mark.parametrize("fwhm", [-1.0, np.nan])
def test_bad_fwhm(fwhm):
    with pytest.raises(ValueError, match="fwhm"):
        smooth(np.zeros((4, 4, 4), dtype=np.float32), np.eye(4), fwhm)


def test_bad_data():
    with pytest.raises(ValueError, match="3D or 4D"):
        smooth(np.zeros((4, 4), dtype=np.float32), np.eye(4))
    with pytest.raises(ValueError, match="floating"):
        smooth(np.zeros((4, 4, 4), dtype=np.int16), np.eye(4))
