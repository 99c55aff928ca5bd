"""Atlases and the space they belong to: regions from coordinates that ship with nilearn,
which of them a run covers, and a refusal to lay an MNI atlas on native-space data."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from nilearn import datasets
from nilearn.image import load_img

from fmri_preproc.contract import parse_bids_name

__all__ = ["dosenbach_regions", "regions_inside", "require_space", "require_atlas_fits"]


def dosenbach_regions() -> pd.DataFrame:
    """The 160 regions of Dosenbach et al. (2010), MNI coordinates (mm), in 6 networks.

    Returns
    -------
    pandas.DataFrame
        Columns ``x, y, z`` (mm, MNI), ``label`` and ``network``; shipped with nilearn, so
        no download.

    References
    ----------
    .. [1] Dosenbach NUF et al. (2010). Prediction of individual brain maturity using
       fMRI. Science 329:1358-1361. :doi:`10.1126/science.1194144`
    """
    atlas = datasets.fetch_coords_dosenbach_2010()
    regions = pd.DataFrame(atlas.rois)[["x", "y", "z"]].astype(float).reset_index(drop=True)
    regions["label"] = list(atlas.labels)
    regions["network"] = list(atlas.networks)
    return regions


def regions_inside(regions: pd.DataFrame, mask_img) -> np.ndarray:
    """Which regions have their centre inside a brain mask (in the regions' space).

    A run covers only part of the brain (a real EPI, a few dozen slices); a sphere centred
    outside its mask would average no signal, or only the skull's.

    Parameters
    ----------
    regions : pandas.DataFrame
        Columns ``x, y, z`` in mm, in the mask's space.
    mask_img : str, Path or nibabel image
        A 3D brain mask.

    Returns
    -------
    numpy.ndarray
        Boolean, one per region.
    """
    img = load_img(mask_img)
    ijk = np.rint(nib.affines.apply_affine(np.linalg.inv(img.affine),
                                           regions[["x", "y", "z"]].to_numpy())).astype(int)
    inside = np.all((ijk >= 0) & (ijk < img.shape[:3]), axis=1)
    inside[inside] = np.asarray(img.dataobj)[tuple(ijk[inside].T)] > 0
    return inside


def require_space(image, space: str) -> None:
    """Refuse an image that is not in ``space`` (its BIDS ``space-`` entity), with what to do.

    nilearn places an atlas on any image by its affine alone; on a native-space run an MNI
    atlas then lands on the wrong anatomy without a word, because scanner coordinates are
    not template coordinates.

    Parameters
    ----------
    image : str or Path
        A BIDS-named image; no ``space-`` entity means the scanner's own (native) space.
    space : str
        The atlas's space, e.g. ``"MNI"`` (any ``MNI152…`` template matches) or a full
        template name.

    Raises
    ------
    ValueError
        When the image's space does not match, saying which file to use instead.
    """
    name = parse_bids_name(Path(image).name)
    found = name.get("space")
    if found is None or not found.startswith(space):
        where = f"space-{found}" if found else "native (scanner) space: no space- entity"
        raise ValueError(
            f"{Path(image).name} is in {where}, but the atlas is in {space} space: its "
            "regions would land on the wrong anatomy. Use the run normalised to the atlas's "
            "space (the function writes *_space-<template>_res-2_desc-preproc_bold.nii.gz), "
            "or an atlas made for this run's own space.")


def require_atlas_fits(labels_img, run) -> None:
    """Refuse a labels image that nilearn would resample onto a run of another space.

    An atlas on the run's own grid (same shape and affine) was made for it, in its space.
    Any other atlas is a template's (MNI): it fits only a run in MNI space.

    Parameters
    ----------
    labels_img : str, Path or nibabel image
        The atlas (a 3D labels image).
    run : str or Path
        A BIDS-named preprocessed run.

    Raises
    ------
    ValueError
        From :func:`require_space`, when the atlas is off the run's grid and the run is not
        in MNI space.
    """
    labels = load_img(labels_img)
    run_img = nib.load(run)  # the header only
    if labels.shape[:3] == run_img.shape[:3] and np.allclose(labels.affine, run_img.affine,
                                                             atol=1e-3):
        return
    require_space(run, "MNI")
