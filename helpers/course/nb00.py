"""Checks of notebook 00's exercises (simulated data)."""
from __future__ import annotations

import numpy as np

from fmri_preproc.contract import INPUT_SUFFIX

from .feedback import Feedback, expect

__all__ = ["check_censored_percent", "check_sequential_slice_time", "check_bold_name"]


def check_censored_percent(answer_percent, fd_mm: np.ndarray, threshold_mm: float = 0.5) -> Feedback:
    """Predict-then-check: the percentage of volumes with FD above ``threshold_mm`` (mm).

    Right within 1 percentage point of ``100 * mean(fd_mm > threshold_mm)``.
    """
    if answer_percent is None:
        return Feedback(False, "set `answer_percent` to your prediction (a percentage, 0-100).")
    truth = 100 * float(np.mean(np.asarray(fd_mm) > threshold_mm))
    return expect(abs(float(answer_percent) - truth) <= 1.0,
                  f"{truth:.1f} % of volumes have FD > {threshold_mm} mm.",
                  f"{answer_percent} % is more than 1 point away; compute "
                  f"`100 * (fd_all > {threshold_mm}).mean()` and compare with the histogram.")


def check_sequential_slice_time(answer_s, n_slices: int, tr: float) -> Feedback:
    """Change-a-parameter: the acquisition time (s) of slice 1 in *sequential* order.

    Right within 1 ms of :func:`helpers.analysis.simulate.slice_timing` (sequential).
    """
    from helpers.analysis.simulate import slice_timing
    if answer_s is None:
        return Feedback(False, "set `answer_s` to slice 1's time within the volume (s).")
    truth = float(slice_timing(n_slices, tr, "sequential")[1])
    return expect(abs(float(answer_s) - truth) < 1e-3,
                  f"slice 1 is read {truth:.3f} s after slice 0 (TR / number of slices).",
                  f"{answer_s} s is not it: in sequential order slices follow each other, "
                  f"one every TR / n_slices = {tr} / {n_slices} s.")


def check_bold_name(name, subject: str = "01", task: str = "rest") -> Feedback:
    """Find-and-fix: a BIDS BOLD file name for ``subject`` and ``task`` the trigger accepts."""
    expected = f"sub-{subject}_task-{task}{INPUT_SUFFIX}"
    if not isinstance(name, str):
        return Feedback(False, "set `name` to the fixed file name (a string).")
    return expect(name == expected, f"{name} is a valid BIDS BOLD name.",
                  f"{name!r} is not yet: entities are `key-value` pairs joined by `_` "
                  f"(`sub-<label>`, then `task-<label>`), then the suffix `{INPUT_SUFFIX}`.")
