"""Atlases and their space: Dosenbach's regions, which a mask covers, and the refusal to lay
an MNI atlas on native-space data."""
import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from fmri_preproc.contract import TEMPLATE
from helpers.analysis import atlas


def test_dosenbach_has_160_regions_in_6_networks_in_mni_mm():
    regions = atlas.dosenbach_regions()
    assert len(regions) == 160 and regions["network"].nunique() == 6
    # MNI brain bounds (mm): every centre inside them
    assert regions["x"].abs().max() < 75 and regions["y"].between(-110, 75).all()
    assert regions["z"].between(-50, 85).all()


def test_regions_inside_a_mask_by_their_centre_voxel():
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = -10.0  # voxel (5, 5, 5) is (0, 0, 0) mm
    mask = np.zeros((10, 10, 10), np.uint8)
    mask[5:, :, :] = 1  # x >= 0 mm
    regions = pd.DataFrame([[4.0, 0, 0], [-4.0, 0, 0], [400.0, 0, 0]], columns=["x", "y", "z"])
    inside = atlas.regions_inside(regions, nib.Nifti1Image(mask, affine))
    assert inside.tolist() == [True, False, False]  # the last is off the grid


def test_an_mni_atlas_is_refused_on_native_space_data():
    native = "sub-01_task-rest_desc-preproc_bold.nii.gz"
    with pytest.raises(ValueError, match="native .scanner. space.*space-<template>"):
        atlas.require_space(native, "MNI")
    with pytest.raises(ValueError, match="space-T1w"):
        atlas.require_space("sub-01_task-rest_space-T1w_desc-preproc_bold.nii.gz", "MNI")
    atlas.require_space(f"sub-01_task-rest_space-{TEMPLATE}_res-2_desc-preproc_bold.nii.gz",
                        "MNI")


def test_an_atlas_file_fits_its_own_grid_or_an_mni_run(tmp_path):
    affine = np.diag([3.0, 3.0, 3.0, 1.0])
    run = tmp_path / "sub-01_task-rest_desc-preproc_bold.nii.gz"
    nib.Nifti1Image(np.zeros((8, 8, 8, 4), np.float32), affine).to_filename(run)
    own = nib.Nifti1Image(np.ones((8, 8, 8), np.int16), affine)
    atlas.require_atlas_fits(own, run)  # made on this run's grid: its space
    mni_grid = nib.Nifti1Image(np.ones((91, 109, 91), np.int16), np.diag([2.0, 2.0, 2.0, 1.0]))
    with pytest.raises(ValueError, match="wrong anatomy"):
        atlas.require_atlas_fits(mni_grid, run)
    mni_run = tmp_path / f"sub-01_task-rest_space-{TEMPLATE}_res-2_desc-preproc_bold.nii.gz"
    nib.Nifti1Image(np.zeros((8, 8, 8, 4), np.float32), affine).to_filename(mni_run)
    atlas.require_atlas_fits(mni_grid, mni_run)
