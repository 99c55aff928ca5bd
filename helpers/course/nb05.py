"""Checks of notebook 05's exercises (costs and cleanup)."""
from __future__ import annotations

from .feedback import Feedback, expect

__all__ = ["DELETION_STEPS", "check_deletion_order", "check_scaled_cost", "check_memory_ratio"]

# Each pair: the first must come before the second (why: notebook 05, "Delete everything").
_BEFORE = [("stop new runs", "delete function"), ("stop new runs", "delete objects"),
           ("delete function", "delete log group"),  # a running function recreates its group
           ("delete objects", "delete bucket"),      # S3 refuses to delete a bucket with objects
           ("delete role policy", "delete role")]    # IAM refuses a role with inline policies
DELETION_STEPS = sorted({step for pair in _BEFORE for step in pair})


def check_deletion_order(steps) -> Feedback:
    """Find-and-fix: an order of :data:`DELETION_STEPS` that AWS accepts and no run undoes."""
    if not isinstance(steps, (list, tuple)) or sorted(steps) != DELETION_STEPS:
        return Feedback(False, f"`order` must list each of {DELETION_STEPS} once.")
    for first, second in _BEFORE:
        if steps.index(first) > steps.index(second):
            return Feedback(False, f"'{second}' comes before '{first}': see why in the "
                                   "notebook's cleanup section.")
    return Feedback(True, "every deletion follows what it depends on.")


def check_scaled_cost(answer_usd, total_usd: float, n_runs: int, runs: int = 1000) -> Feedback:
    """Predict: list price (USD) of ``runs`` runs from this run's total, within 5 %."""
    if answer_usd is None:
        return Feedback(False, "set `cost_1000_usd`.")
    truth = total_usd / n_runs * runs
    return expect(abs(float(answer_usd) - truth) <= 0.05 * truth + 1e-12,
                  f"${truth:.4f}: every line item grows with the number of runs.",
                  f"${answer_usd}: scale this run's total by {runs} / {n_runs} runs.")


def check_memory_ratio(answer) -> Feedback:
    """Predict: cost at 885 MB / cost at 1,769 MB for a single-threaded CPU-bound run."""
    if answer is None:
        return Feedback(False, "set `ratio`.")
    return expect(0.85 <= float(answer) <= 1.15,
                  "about 1: half the memory gives half the CPU, so twice the duration; "
                  "GB-seconds stay the same.",
                  f"{answer}: below 1,769 MB, CPU is proportional to memory. What happens to "
                  "duration x memory?")
