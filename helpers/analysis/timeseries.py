"""Regions and their time series: atlases, spheres, and a parcellation learned from data.

Built on nilearn's maskers, which extract each region's mean signal and clean it (confound
regression, scrubbing, band-pass filtering and standardisation) in one step.
"""
from __future__ import annotations

import warnings

import numpy as np

__all__ = ["region_timeseries", "sphere_timeseries", "data_driven_labels", "split_halves",
           "region_coordinates"]


def _clean_kwargs(tr: float, low_pass, high_pass) -> dict:
    """Masker options shared by every extraction: detrend, band-pass, z-score."""
    return {"detrend": True, "standardize": "zscore_sample", "low_pass": low_pass,
            "high_pass": high_pass, "t_r": tr}


def region_timeseries(img, labels_img, *, tr: float, confounds=None, sample_mask=None,
                      low_pass: float | None = 0.1, high_pass: float | None = 0.01) -> np.ndarray:
    """Mean signal of each labelled region, cleaned.

    Parameters
    ----------
    img : str, Path or Nifti1Image
        4D run.
    labels_img : str, Path or Nifti1Image
        Integer labels (0 = background).
    tr : float
        Repetition time (s), needed by the band-pass filter.
    confounds : DataFrame or ndarray, optional
        Regressors removed from the signals (orthogonally to the filter).
    sample_mask : ndarray, optional
        Indices of the volumes to keep (scrubbing).
    low_pass, high_pass : float or None
        Band-pass cut-offs (Hz).

    Returns
    -------
    (T_kept, R) ndarray
        One column per label, in increasing label order, z-scored.
    """
    from nilearn.maskers import NiftiLabelsMasker

    masker = NiftiLabelsMasker(labels_img, **_clean_kwargs(tr, low_pass, high_pass),
                               keep_masked_labels=False)
    return masker.fit_transform(img, confounds=confounds, sample_mask=sample_mask)


def sphere_timeseries(img, coords, *, tr: float, radius: float = 6.0, confounds=None,
                      sample_mask=None, low_pass: float | None = 0.1,
                      high_pass: float | None = 0.01) -> np.ndarray:
    """Mean signal in a sphere around each coordinate (mm), cleaned as in :func:`region_timeseries`.
    """
    from nilearn.maskers import NiftiSpheresMasker

    # overlapping spheres are allowed: centres of neighbouring parcels can be close
    masker = NiftiSpheresMasker(np.asarray(coords, dtype=float), radius=radius, allow_overlap=True,
                                **_clean_kwargs(tr, low_pass, high_pass))
    return masker.fit_transform(img, confounds=confounds, sample_mask=sample_mask)


def data_driven_labels(imgs, *, n_parcels: int = 40, mask_img=None, tr: float | None = None):
    """A parcellation learned from the data itself (nilearn's Ward clustering).

    For runs without an atlas on their grid: voxels are clustered hierarchically by the
    similarity of their time courses, with spatial contiguity enforced, giving
    ``n_parcels`` regions that are homogeneous in these data. Learn it on other runs than
    those it is applied to (:func:`split_halves`): parcels learned from the runs they then
    summarise are fitted to those runs' own noise and motion, so their connectivity is
    partly circular.

    Returns
    -------
    nibabel.Nifti1Image
        Labels image (1 .. n_parcels, 0 = background).
    """
    from nilearn.regions import Parcellations

    parcels = Parcellations(method="ward", n_parcels=n_parcels, mask=mask_img,
                            standardize="zscore_sample", detrend=True, t_r=tr,
                            smoothing_fwhm=None, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        parcels.fit(imgs)
    return parcels.labels_img_


def split_halves(subjects) -> tuple[list, list]:
    """Every other subject (sorted, each once) to learn a parcellation on, the rest to analyse.

    With one subject there is nothing else to learn on: it is used for both, with a warning
    that its connectivity is then partly circular.

    Returns
    -------
    learn, analyse : list
        Disjoint for 2 or more subjects (``len(subjects) // 2`` to learn on); together all
        of ``subjects``.
    """
    ordered = sorted(set(subjects))
    if len(ordered) == 1:
        warnings.warn(f"only one subject ({ordered[0]}): the parcellation is learned on the "
                      "runs it then summarises, so its connectivity is partly circular",
                      stacklevel=2)
        return ordered, ordered
    return ordered[1::2], ordered[0::2]


def region_coordinates(labels_img) -> np.ndarray:
    """Centre (mm) of each labelled region, in label order (nilearn's cut coordinates)."""
    from nilearn.plotting import find_parcellation_cut_coords

    return find_parcellation_cut_coords(labels_img)
