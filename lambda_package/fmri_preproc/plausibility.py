"""Plausibility checks on a run's reference volume and its motion estimates.

A motion estimate can be numerically converged and still be nonsense: a registration that
diverged on a tiny grid, a reference volume that holds only noise, a volume with a
receiver-gain jump or a dropped (constant) volume. These checks turn such results into a
clear failure (:class:`~fmri_preproc.inputs.InputError`: the run becomes "failed") or into
warnings (a list of sentences the pipeline puts in ``summary["warnings"]``).

Thresholds, and why
-------------------
* ``MAX_TRANSLATION_MM = 30``, ``MAX_ROTATION_DEG = 30``: a head in a head coil has about
  1-2 cm of room on each side, and the worst-moving resting-state subjects (children,
  patients) stay within a few mm and a few degrees of their reference (Power et al. 2014;
  Satterthwaite et al. 2012). A position beyond 30 mm or 30 degrees is a diverged
  estimate, not a head.
* ``MAX_FD_MM = 30``: volume-to-volume framewise displacement (Power et al. 2012) of real
  heads is about 0.1-0.2 mm typically and rarely above 5 mm; 30 mm in one TR is not motion.
* ``WARN_FD_MM = 5``: ten times the 0.5 mm censoring threshold of Power et al. (2012): real
  but extreme, or a local failure; worth looking at.
* ``GAIN_RATIO = 2``: scanner drift changes the mean intensity by a few percent over a run
  (Smith et al. 1999); a volume whose mean in the head is more than 2x (or under 1/2) the
  reference's has a gain jump or a scaling error.
* ``MIN_AUTOCORRELATION = 0.5``: white noise has a neighbouring-voxel correlation of about
  0 (+- 1 / sqrt(N)); any imaged head, with its edge against the background and an EPI
  point-spread function of 1-2 voxels FWHM, has 0.8-0.99. Below 0.5 the reference volume is
  not an image of a head and no registration to it can mean anything.

References
----------
.. [1] Power JD, Barnes KA, Snyder AZ, Schlaggar BL, Petersen SE (2012). Spurious but
   systematic correlations in functional connectivity MRI networks arise from subject
   motion. NeuroImage 59:2142-2154. :doi:`10.1016/j.neuroimage.2011.10.018`
.. [2] Power JD, Mitra A, Laumann TO, Snyder AZ, Schlaggar BL, Petersen SE (2014). Methods
   to detect, characterize, and remove motion artifact in resting state fMRI. NeuroImage
   84:320-341. :doi:`10.1016/j.neuroimage.2013.08.048`
.. [3] Satterthwaite TD, Wolf DH, Loughead J, et al. (2012). Impact of in-scanner head
   motion on multiple measures of functional connectivity: relevance for studies of
   neurodevelopment in youth. NeuroImage 60:623-632.
   :doi:`10.1016/j.neuroimage.2011.12.063`
.. [4] Smith AM, Lewis BK, Ruttimann UE, et al. (1999). Investigation of low frequency
   drift in fMRI signal. NeuroImage 9:526-533. :doi:`10.1006/nimg.1999.0435`
"""

from __future__ import annotations

import numpy as np

from .confounds import framewise_displacement
from .inputs import InputError
from .transforms import affine_to_params, fov_centre

__all__ = [
    "MAX_TRANSLATION_MM", "MAX_ROTATION_DEG", "MAX_FD_MM", "WARN_FD_MM", "GAIN_RATIO",
    "MIN_AUTOCORRELATION", "is_plausible", "spatial_autocorrelation", "check_reference",
    "check_motion",
]

MAX_TRANSLATION_MM = 30.0
MAX_ROTATION_DEG = 30.0
MAX_FD_MM = 30.0
WARN_FD_MM = 5.0
GAIN_RATIO = 2.0
MIN_AUTOCORRELATION = 0.5


def is_plausible(matrix: np.ndarray, centre: np.ndarray) -> bool:
    """Whether one world matrix is a position a head can have (finite, within the limits).

    Parameters
    ----------
    matrix : (4, 4) array
        Reference point -> moving point (the engine's convention).
    centre : (3,) array
        Rotation centre (mm), the field-of-view centre.
    """
    matrix = np.asarray(matrix, dtype=np.float64)
    if not np.all(np.isfinite(matrix)):
        return False
    rot = matrix[:3, :3]
    if not np.allclose(rot @ rot.T, np.eye(3), atol=1e-4):
        return False
    # rotation angle from the trace; translation of the centre
    angle = np.degrees(np.arccos(np.clip((np.trace(rot) - 1.0) / 2.0, -1.0, 1.0)))
    shift = matrix[:3, :3] @ centre + matrix[:3, 3] - centre
    return bool(np.abs(shift).max() <= MAX_TRANSLATION_MM and angle <= MAX_ROTATION_DEG)


def spatial_autocorrelation(volume: np.ndarray) -> float:
    """Mean neighbouring-voxel correlation of a volume along its three axes (-1..1)."""
    vol = np.asarray(volume, dtype=np.float64)
    vol = vol - vol.mean()
    energy = float(np.sum(vol * vol))
    if energy == 0.0:
        return 0.0
    lags = []
    for axis in range(3):
        a = np.take(vol, np.arange(vol.shape[axis] - 1), axis=axis)
        b = np.take(vol, np.arange(1, vol.shape[axis]), axis=axis)
        lags.append(float(np.sum(a * b)) / energy)
    return float(np.mean(lags))


def check_reference(volume: np.ndarray) -> None:
    """Raise ValueError when the reference volume is constant or holds only noise.

    Raises
    ------
    ValueError
        With the measured neighbouring-voxel correlation (see ``MIN_AUTOCORRELATION``).
    """
    if not np.ptp(volume) > 0:
        raise ValueError("the reference volume is constant")
    rho = spatial_autocorrelation(volume)
    if rho < MIN_AUTOCORRELATION:
        raise ValueError(f"the reference volume looks like noise, not a head (neighbouring "
                         f"voxels correlate {rho:.2f}, an image of a head > 0.8)")


def check_motion(data, affine, matrices, reference: int, *, name: str = "run") -> list[str]:
    """Judge a run's motion estimates: raise for nonsense, return warnings for oddities.

    Parameters
    ----------
    data : (X, Y, Z, T) array or memmap
        The run (read one volume at a time).
    affine : (4, 4) array
        Voxel-to-world affine (mm).
    matrices : (T, 4, 4) array
        :func:`fmri_preproc.estimate_motion`'s result.
    reference : int
        Index of the reference volume.
    name : str
        The input's name, for the messages.

    Returns
    -------
    warnings : list of str
        One sentence per odd finding (gain jumps, constant volumes, extreme FD).

    Raises
    ------
    InputError
        When an estimate is not a possible head position (beyond 30 mm or 30 degrees, not
        finite) or FD exceeds 30 mm: the estimates diverged and the run must not be called
        processed.
    """
    affine = np.asarray(affine, dtype=np.float64)
    shape = data.shape[:3]
    centre = fov_centre(affine, shape)
    bad = [t for t, m in enumerate(matrices) if not is_plausible(m, centre)]
    if bad:
        raise InputError(
            f"{name}: motion estimation diverged for {len(bad)} volume(s) (first: volume "
            f"{bad[0]}): beyond {MAX_TRANSLATION_MM:g} mm or {MAX_ROTATION_DEG:g} degrees, "
            "which no head in a coil can reach.",
            cause="The images have too little structure to register (a very small grid, "
                  "noise, or not a BOLD run).",
            action="Check the run in a viewer; upload the original BOLD run.")
    params = np.array([affine_to_params(m, affine, shape) for m in matrices])
    fd = np.nan_to_num(framewise_displacement(params))  # the engine's one FD; first NaN -> 0
    if fd.max() > MAX_FD_MM:
        raise InputError(
            f"{name}: framewise displacement reaches {fd.max():.1f} mm at volume "
            f"{int(fd.argmax())}, beyond {MAX_FD_MM:g} mm in one TR (not a head movement).",
            cause="Motion estimation failed on some volumes (corrupt or empty volumes?).",
            action="Check those volumes in a viewer; upload the original BOLD run.")
    warnings = _volume_warnings(data, reference, name)
    if fd.max() > WARN_FD_MM:
        warnings.append(f"{name}: framewise displacement reaches {fd.max():.1f} mm at "
                        f"volume {int(fd.argmax())} (over {WARN_FD_MM:g} mm): extreme motion "
                        "or a failed estimate; check that volume.")
    return warnings


def _volume_warnings(data, reference: int, name: str) -> list[str]:
    """Warnings for constant volumes and gain jumps (mean in the head vs the reference)."""
    ref = np.asarray(data[..., reference], dtype=np.float32)
    head = ref > 0.2 * np.percentile(ref, 98)
    ref_mean = float(ref[head].mean())
    constant, jumps = [], []
    for t in range(data.shape[3]):
        vol = np.asarray(data[..., t], dtype=np.float32)
        if not np.ptp(vol) > 0:
            constant.append(t)
            continue
        ratio = float(vol[head].mean()) / ref_mean if ref_mean > 0 else 1.0
        if not 1.0 / GAIN_RATIO <= ratio <= GAIN_RATIO:
            jumps.append((t, ratio))
    warnings = []
    if constant:
        warnings.append(f"{name}: {len(constant)} constant volume(s) (e.g. volume "
                        f"{constant[0]}): dropped or zero-filled; left unmoved, censor them.")
    if jumps:
        t, ratio = jumps[0]
        warnings.append(f"{name}: {len(jumps)} volume(s) with a gain jump (e.g. volume {t}: "
                        f"{ratio:.2f}x the reference's mean intensity); check the scanner "
                        "scaling.")
    return warnings
