"""Checks of notebook 02's exercises (the engine, locally, then deployed)."""
from __future__ import annotations

import numpy as np

from fmri_preproc import params_to_affine, reslice_volume
from fmri_preproc.contract import INPUT_SUFFIX
from fmri_preproc.motion import head_mask
from fmri_preproc.smoothing import fwhm_to_sigma

from .feedback import Feedback, expect

__all__ = ["check_sigma_voxels", "check_undo_shift", "check_trigger_filter"]


def check_sigma_voxels(answer, fwhm_mm: float, affine: np.ndarray) -> Feedback:
    """Predict-then-check: the Gaussian sigma along x, in voxels, of ``fwhm_mm``.

    Right within 2 % of :func:`fmri_preproc.smoothing.fwhm_to_sigma`.
    """
    if answer is None:
        return Feedback(False, "set `sigma_voxels` to your prediction.")
    truth = float(fwhm_to_sigma(fwhm_mm, affine)[0])
    return expect(abs(float(answer) - truth) <= 0.02 * truth,
                  f"sigma = FWHM / sqrt(8 ln 2) / voxel size = {truth:.3f} voxels.",
                  f"{answer} is not it: FWHM = sqrt(8 ln 2) sigma ≈ 2.355 sigma, in mm; "
                  "then divide by the voxel size (mm).")


def check_undo_shift(params, shifted: np.ndarray, reference: np.ndarray, affine) -> Feedback:
    """Change-a-parameter: six parameters (mm, radians) that reslice ``shifted`` back onto
    ``reference``: the registration cost (normalised SSD in the head) below 0.02."""
    from helpers.analysis.widgets import registration_cost
    if params is None:
        return Feedback(False, "set `undo` to six parameters [tx, ty, tz, rx, ry, rz].")
    back = reslice_volume(shifted, affine, params_to_affine(params, affine, shifted.shape))
    cost = registration_cost(back, reference, head_mask(reference))
    return expect(cost < 0.02, f"aligned: cost {cost:.4f}.",
                  f"cost {cost:.3f}: not aligned yet. The matrix maps a reference point to where "
                  "the same tissue is in the moving volume: which sign moves it back?")


def check_trigger_filter(configuration, input_prefix: str) -> Feedback:
    """Find-and-fix: a notification configuration whose filter fires on new runs only."""
    try:
        rules = {r["Name"]: r["Value"] for r in configuration["LambdaFunctionConfigurations"][0]
                 ["Filter"]["Key"]["FilterRules"]}
    except (KeyError, IndexError, TypeError):
        return Feedback(False, "set `fixed_notification` to a NotificationConfiguration with "
                               "LambdaFunctionConfigurations[0]['Filter']['Key']['FilterRules'].")
    if rules.get("suffix") != INPUT_SUFFIX:
        return Feedback(False, f"suffix {rules.get('suffix')!r}: the function would run on "
                               f"sidecars or outputs; it must fire on '{INPUT_SUFFIX}' only.")
    return expect(rules.get("prefix") == input_prefix,
                  "the trigger fires on new BOLD runs under the input prefix, nothing else.",
                  f"prefix {rules.get('prefix')!r}: uploads go under {input_prefix!r}.")
