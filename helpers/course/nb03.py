"""Checks of notebook 03's exercises (upload, process, read the logs)."""
from __future__ import annotations

import re

from .feedback import Feedback, expect
from .nb01 import check_policy_fix

__all__ = ["check_invocations", "check_gb_seconds", "check_denied_action", "check_policy_fix"]


def check_invocations(answer, n_runs_uploaded: int, records) -> Feedback:
    """Predict-then-check: invocations that processed a run = runs uploaded (sidecars do not
    trigger the function; the test call of notebook 02 had no key)."""
    if answer is None:
        return Feedback(False, "set `predicted_invocations`.")
    with_key = sum(1 for key in records["key"] if isinstance(key, str) and key)
    if int(answer) != n_runs_uploaded:
        return Feedback(False, f"{answer}: count what triggers the function: only keys ending "
                               "in _bold.nii.gz, one event each.")
    return expect(with_key >= n_runs_uploaded, f"{n_runs_uploaded} runs, {with_key} invocations "
                  "with a key (a retry would add one).",
                  f"the logs show {with_key} invocations with a key: some have not run yet.")


def check_gb_seconds(answer, billed_ms: float, memory_mb: int) -> Feedback:
    """Change-a-parameter: GB-seconds billed for one invocation (billed ms x memory)."""
    if answer is None:
        return Feedback(False, "set `gb_seconds`.")
    truth = billed_ms / 1000 * memory_mb / 1024
    return expect(abs(float(answer) - truth) <= 0.01 * truth + 1e-9,
                  f"{truth:.3f} GB-s: billed seconds x configured GB (not the memory used).",
                  f"{answer} is not it: billed duration (s) x MemorySize (GB, 1024 MB).")


DENIED_RE = re.compile(r"\(AccessDenied\) when calling the (\w+) operation")


def check_denied_action(answer, log_line: str) -> Feedback:
    """Find: the IAM action an AccessDenied log line names (``s3:<Operation>``)."""
    match = DENIED_RE.search(log_line)
    truth = f"s3:{match.group(1)}" if match else None
    if answer is None:
        return Feedback(False, 'set `denied_action`, e.g. "s3:ListBucket".')
    return expect(str(answer) == truth, f"{truth}: the operation the error names, as an action.",
                  f"{answer!r}: read 'when calling the ... operation' and prefix it with 's3:'.")
