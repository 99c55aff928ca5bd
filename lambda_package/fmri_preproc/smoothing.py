"""Gaussian smoothing with an FWHM in millimetres (numpy only).

A numpy re-implementation of exactly what ``nilearn.image.smooth_img(img, fwhm)`` does
(nilearn 0.14): non-finite values set to 0, then ``scipy.ndimage.gaussian_filter1d`` along
each spatial axis in turn with ``mode='reflect'`` and ``truncate=4.0``, where the sigma of
axis ``k`` in voxels is ``fwhm / sqrt(8 ln 2) / voxel_size[k]`` and the voxel sizes are the
column norms of the affine's 3x3 part (so oblique affines get the right sizes).
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["smooth", "smoothed_volumes", "fwhm_to_sigma", "gaussian_kernel"]

# FWHM = sqrt(8 ln 2) * sigma for a Gaussian
_FWHM_PER_SIGMA = math.sqrt(8.0 * math.log(2.0))


def fwhm_to_sigma(fwhm: float, affine: np.ndarray) -> np.ndarray:
    """Gaussian sigma per array axis, in voxels, of an FWHM in mm.

    Parameters
    ----------
    fwhm : float
        Full width at half maximum in mm (>= 0).
    affine : (4, 4) array
        NIfTI voxel-to-world affine; voxel sizes are the column norms of its 3x3 part.

    Returns
    -------
    sigma : (3,) ndarray
        ``fwhm / sqrt(8 ln 2) / voxel_size`` for the three spatial axes (voxels).
    """
    if not np.isfinite(fwhm) or fwhm < 0:
        raise ValueError("fwhm must be a finite number >= 0 (mm)")
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4):
        raise ValueError("affine must be 4x4")
    voxel_size = np.sqrt(np.sum(affine[:3, :3] ** 2, axis=0))
    if np.any(voxel_size <= 0):
        raise ValueError("affine has a zero voxel size")
    return fwhm / _FWHM_PER_SIGMA / voxel_size


def gaussian_kernel(sigma: float, truncate: float = 4.0) -> np.ndarray:
    """Normalised 1D Gaussian kernel of ``2 * int(truncate * sigma + 0.5) + 1`` taps.

    The same taps as ``scipy.ndimage.gaussian_filter1d`` (float64).
    """
    if sigma < 0:
        raise ValueError("sigma must be >= 0")
    radius = int(truncate * float(sigma) + 0.5)
    if radius == 0:
        return np.ones(1)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    weights = np.exp(-0.5 / sigma**2 * x**2)
    return weights / weights.sum()


def _correlate_axis(arr: np.ndarray, weights: np.ndarray, axis: int) -> np.ndarray:
    """Correlate ``arr`` with symmetric ``weights`` along ``axis``, scipy's 'reflect' edges.

    scipy's 'reflect' (d c b a | a b c d | d c b a) is numpy's 'symmetric' padding.
    out[i] = sum_k w[k] * padded[i + k]
    """
    radius = (len(weights) - 1) // 2
    if radius == 0:
        return arr
    pad = [(0, 0)] * arr.ndim
    pad[axis] = (radius, radius)
    padded = np.pad(arr, pad, mode="symmetric")
    n = arr.shape[axis]
    out = np.zeros_like(arr)
    index = [slice(None)] * arr.ndim
    for k, w in enumerate(weights):
        index[axis] = slice(k, k + n)
        out += arr.dtype.type(w) * padded[tuple(index)]
    return out


def smooth_volume(volume: np.ndarray, sigma) -> np.ndarray:
    """Smooth a 3D array with a separable Gaussian of ``sigma`` voxels per axis.

    Non-finite values are set to 0 first (as nilearn does). Returns a new array of the
    input's floating dtype.
    """
    out = np.array(volume, dtype=np.result_type(volume.dtype, np.float32))
    out[~np.isfinite(out)] = 0
    for axis, s in enumerate(sigma):
        if s > 0:
            out = _correlate_axis(out, gaussian_kernel(s), axis)
    return out


def smooth(data: np.ndarray, affine: np.ndarray, fwhm: float = 6.0, *, out=None) -> np.ndarray:
    """Gaussian-smooth a 3D or 4D image, FWHM in mm, volume by volume.

    Parameters
    ----------
    data : (X, Y, Z) or (X, Y, Z, T) array
        Image data; floating point (float32 recommended: half the memory of float64).
    affine : (4, 4) array
        NIfTI voxel-to-world affine (voxel sizes in mm).
    fwhm : float, optional
        Full width at half maximum in mm (6 mm by default); 0 means no smoothing (but
        non-finite values are still set to 0).
    out : ndarray, optional
        Where to write the result; pass ``data`` itself to smooth in place (one copy of
        the run in memory, as the Lambda does).

    Returns
    -------
    smoothed : ndarray
        Same shape and dtype as ``data``.

    Notes
    -----
    Matches ``nilearn.image.smooth_img(img, fwhm)`` to float32 rounding: sigma per axis
    ``fwhm / sqrt(8 ln 2) / voxel_size``, Gaussian taps to 4 sigma, edges mirrored
    ('reflect'), non-finite values set to 0 first.

    References
    ----------
    .. [1] Abraham A et al. (2014). Machine learning for neuroimaging with scikit-learn.
       Front Neuroinform 8:14. :doi:`10.3389/fninf.2014.00014` (nilearn)
    """
    if data.ndim not in (3, 4):
        raise ValueError("data must be 3D or 4D")
    if not np.issubdtype(data.dtype, np.floating):
        raise ValueError("data must be floating point")
    sigma = fwhm_to_sigma(fwhm, affine)
    if out is None:
        out = np.empty_like(data)
    elif out.shape != data.shape:
        raise ValueError("out must have the shape of data")
    if data.ndim == 3:
        out[...] = smooth_volume(data, sigma)
        return out
    for t, volume in enumerate(smoothed_volumes(data, affine, fwhm)):
        out[..., t] = volume
    return out


def smoothed_volumes(data, affine: np.ndarray, fwhm: float = 6.0):
    """Yield each volume of a 4D run smoothed, one at a time (for writing in a stream).

    Parameters
    ----------
    data : (X, Y, Z, T) array, or anything read as ``data[..., t]``
        E.g. a :class:`fmri_preproc.inputs.VolumeFile`: memory then holds one volume and
        its scratch, whatever the run's length.
    affine, fwhm
        As for :func:`smooth`.

    Yields
    ------
    volume : (X, Y, Z) ndarray
        ``smooth(data, affine, fwhm)[..., t]`` for ``t = 0, 1, ...``.
    """
    if data.ndim != 4:
        raise ValueError("data must be 4D")
    sigma = fwhm_to_sigma(fwhm, affine)
    for t in range(data.shape[3]):
        yield smooth_volume(data[..., t], sigma)
