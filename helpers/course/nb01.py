"""Checks of notebook 01's exercises (buckets and the execution role)."""
from __future__ import annotations

from fnmatch import fnmatchcase

from .feedback import Feedback, expect

__all__ = ["allows", "check_policy_fix", "check_denied_transport", "check_expiry_days"]


def _as_list(value) -> list:
    return value if isinstance(value, list) else [value]


def allows(policy: dict, action: str, resource: str) -> bool:
    """Whether an identity policy allows ``action`` on ``resource`` (a small evaluator).

    Only what the exercises need: ``Allow``/``Deny`` statements with ``Action`` and
    ``Resource`` (wildcards ``*`` and ``?``, actions case-insensitive as in IAM); an explicit
    Deny wins; no Conditions, NotAction or NotResource (statements with them are skipped).
    """
    allowed = False
    for st in _as_list(policy.get("Statement", [])):
        if {"Condition", "NotAction", "NotResource"} & set(st):
            continue
        hit = (any(fnmatchcase(action.lower(), a.lower()) for a in _as_list(st.get("Action", [])))
               and any(fnmatchcase(resource, r) for r in _as_list(st.get("Resource", []))))
        if hit and st.get("Effect") == "Deny":
            return False
        allowed |= hit and st.get("Effect") == "Allow"
    return allowed


def check_policy_fix(policy, *, object_arn: str, other_arn: str, action: str = "s3:GetObject") -> Feedback:
    """Find-and-fix: ``policy`` allows ``action`` on ``object_arn``, and not on ``other_arn``
    (least privilege: a fix by ``"Resource": "*"`` or ``"s3:*"`` on everything is not right)."""
    if not isinstance(policy, dict):
        return Feedback(False, "set `fixed_policy` to the corrected policy (a dict).")
    if not allows(policy, action, object_arn):
        return Feedback(False, f"the policy still does not allow {action} on {object_arn}: an "
                               "object's ARN is the bucket's ARN, '/', then the key: does the "
                               "Resource end in '/*' under the right prefix?")
    return expect(not allows(policy, action, other_arn),
                  f"{action} is allowed on the run, and nowhere else.",
                  f"it works, but also allows {action} on {other_arn}: limit the Resource "
                  "to this bucket's input prefix.")


def check_denied_transport(answer) -> Feedback:
    """Predict: which requests the bucket policy denies (``"http"`` or ``"https"``)."""
    if answer is None:
        return Feedback(False, 'set `denied_transport` to "http" or "https".')
    return expect(str(answer).lower() == "http",
                  "plain HTTP: `aws:SecureTransport` is false for requests without TLS.",
                  f"{answer!r}: read the Condition: it denies when aws:SecureTransport is 'false'.")


def check_expiry_days(answer, s3, bucket: str) -> Feedback:
    """Read back: the days after which the bucket's lifecycle rule deletes an object."""
    if answer is None:
        return Feedback(False, "set `expiry_days` from `get_bucket_lifecycle_configuration`.")
    truth = s3.get_bucket_lifecycle_configuration(Bucket=bucket)["Rules"][0]["Expiration"]["Days"]
    return expect(int(answer) == truth, f"objects in {bucket} expire after {truth} days.",
                  f"{answer} days is not what S3 says: read Rules[0]['Expiration']['Days'].")
