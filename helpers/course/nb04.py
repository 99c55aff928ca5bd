"""Exercise checks of notebook 04 (connectivity and denoising strategies)."""
from __future__ import annotations

import numpy as np

from helpers.course.feedback import Feedback, expect

__all__ = ["check_censoring", "check_tdof_loss", "check_relative_error"]


def check_censoring(kept, fd, threshold: float) -> Feedback:
    """Exercise 1: the volumes kept when censoring FD > ``threshold`` with 1 volume before
    and 2 after (and segments shorter than 5 dropped)."""
    from helpers.analysis.denoising import censor_mask

    if kept is None:
        return Feedback(False, "set `kept_02` to the indices of the volumes you keep.")
    expected = censor_mask(fd, threshold)
    expected = np.arange(len(fd)) if expected is None else expected
    kept = np.asarray(kept)
    return expect(np.array_equal(np.sort(kept), expected),
                  f"{len(expected)} of {len(fd)} volumes kept at FD {threshold} mm.",
                  f"expected {len(expected)} kept volumes, got {len(kept)}: censor each volume "
                  "with FD above the threshold, the one before it and the two after it, then "
                  "drop kept runs shorter than 5 volumes.")


def check_tdof_loss(answer: float, confounds, sample_mask, n_volumes: int) -> Feedback:
    """Exercise 2: tDOF-loss of one run = regressors + censored volumes."""
    if answer is None:
        return Feedback(False, "set `tdof` to the run's regressors plus censored volumes.")
    n_reg = 0 if confounds is None else confounds.shape[1]
    n_cens = 0 if sample_mask is None else n_volumes - len(sample_mask)
    return expect(answer == n_reg + n_cens,
                  f"{n_reg} regressors + {n_cens} censored volumes = {n_reg + n_cens}.",
                  "count one degree of freedom per confound column and one per censored "
                  f"volume ({n_reg} columns, {n_cens} censored).")


def check_relative_error(answer: float, matrix_error: float, ceiling: float) -> Feedback:
    """Exercise 3: a strategy's error as a multiple of the noise ceiling."""
    expected = matrix_error / ceiling
    if answer is None:
        return Feedback(False, "set `times_36p` to the 36P error divided by the ceiling.")
    return expect(bool(np.isclose(float(answer), expected, rtol=1e-3)),
                  f"{expected:.2f} times the best achievable error.",
                  "divide the strategy's matrix_error by the noise ceiling's 'signals' "
                  f"value (expected {expected:.2f}).")
