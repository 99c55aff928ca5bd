"""IAM policy documents, least privilege, written out: the function's and the operator's.

- :func:`execution_policy`: what the Lambda's execution role may do. Read objects under the
  input prefix of the input bucket, write and delete objects under the output prefix of the
  output bucket (a newer result replaces an older one's records: one current state per
  input), write its own logs, and send failed events to its own failure queue. Nothing
  else: no listing, no deleting inputs, no other bucket.
- :func:`operator_policy`: what *you* (the IAM user or role that runs the notebooks and the
  cleanup) need, on the workbook's own resources only.
- :func:`check_role`: a pre-made execution role (accounts that forbid ``iam:CreateRole``),
  checked against the execution policy instead of creating one.

Every ARN starts with the region's partition (``Settings.partition``: ``aws``, ``aws-cn``,
``aws-us-gov``).
"""
from __future__ import annotations

import json
import re
from functools import lru_cache

import pandas as pd
from botocore.exceptions import ClientError

from helpers.cloud.clients import client
from helpers.cloud.settings import ID_PREFIX, ROLE_PATH, Settings

LAMBDA_SERVICE = "lambda.amazonaws.com"


def lambda_trust_policy() -> dict:
    """Who may assume the role: only the Lambda service."""
    return {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Principal": {"Service": LAMBDA_SERVICE},
                       "Action": "sts:AssumeRole"}],
    }


def execution_policy(cfg: Settings, account_id: str) -> dict:
    """The role's inline policy, scoped to this workbook's own resources.

    Parameters
    ----------
    cfg : Settings
        Bucket, prefix, function and queue names; region and partition.
    account_id : str
        The account the resources live in (from ``sts.get_caller_identity``).
    """
    arn = f"arn:{cfg.partition}"
    logs_arn = f"{arn}:logs:{cfg.region}:{account_id}:log-group:{cfg.log_group}"
    return {
        "Version": "2012-10-17",
        "Statement": [
            {"Sid": "ReadInputPrefixOnly", "Effect": "Allow", "Action": "s3:GetObject",
             "Resource": f"{arn}:s3:::{cfg.input_bucket}/{cfg.input_prefix}*"},
            {"Sid": "WriteOutputPrefixOnly", "Effect": "Allow",
             "Action": ["s3:PutObject", "s3:DeleteObject"],
             "Resource": f"{arn}:s3:::{cfg.output_bucket}/{cfg.output_prefix}*"},
            {"Sid": "WriteOwnLogs", "Effect": "Allow",
             "Action": ["logs:CreateLogGroup", "logs:CreateLogStream", "logs:PutLogEvents"],
             "Resource": [logs_arn, f"{logs_arn}:*"]},
            {"Sid": "ReportFailedEvents", "Effect": "Allow", "Action": "sqs:SendMessage",
             "Resource": f"{arn}:sqs:{cfg.region}:{account_id}:{cfg.failure_queue}"},
        ],
    }


def operator_policy(cfg: Settings, account_id: str) -> dict:
    """What the person running the notebooks and the cleanup needs, and nothing more.

    Scoped to names that start with the workbook prefix (any workbook id, so one policy
    serves every run), in the workbook's region, and to roles under :data:`ROLE_PATH`.
    ``iam:PassRole`` is allowed only towards Lambda. The few listing actions that IAM
    cannot scope to a resource (``tag:GetResources``, ``s3:ListAllMyBuckets``,
    ``lambda:ListFunctions``, ``sqs:ListQueues``, ``iam:ListRoles``,
    ``logs:DescribeLogGroups``) serve cleanup's search
    for leftovers.

    Parameters
    ----------
    cfg : Settings
        Region and partition; with ``existing_role_arn``, the pre-made role is read and
        passed instead of a role being created.
    account_id : str
        The account (from ``sts.get_caller_identity``).
    """
    arn, region = f"arn:{cfg.partition}", cfg.region
    names = f"{ID_PREFIX}*"
    buckets = f"{arn}:s3:::{names}"
    log_groups = f"{arn}:logs:{region}:{account_id}:log-group:/aws/lambda/{names}"
    own_roles = f"{arn}:iam::{account_id}:role{ROLE_PATH}*"
    roles = own_roles if cfg.owns_role else cfg.existing_role_arn
    statements = [
        _allow("Buckets", buckets, [
            "s3:CreateBucket", "s3:DeleteBucket", "s3:ListBucket", "s3:ListBucketVersions",
            "s3:GetBucketLocation", "s3:PutBucketPublicAccessBlock",
            "s3:GetBucketPublicAccessBlock", "s3:PutEncryptionConfiguration",
            "s3:GetEncryptionConfiguration", "s3:PutBucketPolicy",
            "s3:PutLifecycleConfiguration", "s3:GetLifecycleConfiguration",
            "s3:PutBucketTagging", "s3:GetBucketVersioning",
            "s3:PutBucketNotification", "s3:GetBucketNotification"]),
        _allow("Objects", f"{buckets}/*", [
            "s3:PutObject", "s3:GetObject", "s3:DeleteObject", "s3:DeleteObjectVersion",
            "s3:AbortMultipartUpload"]),
        _allow("Function", f"{arn}:lambda:{region}:{account_id}:function:{names}", [
            "lambda:CreateFunction", "lambda:TagResource",
            "lambda:GetFunction", "lambda:GetFunctionConfiguration",
            "lambda:UpdateFunctionCode", "lambda:UpdateFunctionConfiguration",
            "lambda:DeleteFunction", "lambda:PutFunctionConcurrency",
            "lambda:GetFunctionConcurrency", "lambda:PutFunctionEventInvokeConfig",
            "lambda:GetFunctionEventInvokeConfig", "lambda:AddPermission",
            "lambda:RemovePermission", "lambda:GetPolicy", "lambda:InvokeFunction"]),
        _allow("Logs", [log_groups, f"{log_groups}:*"], [
            "logs:CreateLogGroup", "logs:TagResource",
            "logs:PutRetentionPolicy", "logs:DeleteLogGroup", "logs:FilterLogEvents",
            "logs:GetLogEvents"]),
        _allow("FailureQueue", f"{arn}:sqs:{region}:{account_id}:{names}", [
            "sqs:CreateQueue", "sqs:TagQueue", "sqs:GetQueueUrl",
            "sqs:GetQueueAttributes", "sqs:ReceiveMessage", "sqs:DeleteQueue"]),
        _allow("ReadExecutionRole", roles, [
            "iam:GetRole", "iam:ListRolePolicies", "iam:GetRolePolicy",
            "iam:ListAttachedRolePolicies", "iam:ListRoleTags"]),
        {**_allow("PassExecutionRoleToLambdaOnly", roles, ["iam:PassRole"]),
         "Condition": {"StringEquals": {"iam:PassedToService": LAMBDA_SERVICE}}},
        _allow("FindLeftovers", "*", [
            "tag:GetResources", "s3:ListAllMyBuckets", "lambda:ListFunctions",
            "sqs:ListQueues", "iam:ListRoles", "logs:DescribeLogGroups"]),
    ]
    if cfg.owns_role:
        statements.insert(-2, _allow("OwnExecutionRole", own_roles, [
            "iam:CreateRole", "iam:TagRole", "iam:PutRolePolicy", "iam:DeleteRolePolicy",
            "iam:DetachRolePolicy", "iam:DeleteRole"]))
    else:  # check_role reads the managed policies attached to the pre-made role
        # AWS managed policies live in the account "aws", which parliament does not accept
        # in an ARN: any account's policies ("*"), which only yours and AWS's can match.
        statements.insert(-2, _allow("ReadPoliciesOfPreMadeRole", f"{arn}:iam::*:policy/*",
                                     ["iam:GetPolicy", "iam:GetPolicyVersion"]))
    return {"Version": "2012-10-17", "Statement": statements}


def _allow(sid: str, resource: str | list[str], actions: list[str]) -> dict:
    return {"Sid": sid, "Effect": "Allow", "Action": sorted(actions), "Resource": resource}


# ------------------------------------------------------------------------------------------
# A pre-made role, checked instead of created


class RoleLacksPermissions(RuntimeError):
    """A pre-made execution role does not allow what the function needs."""


def check_role(role_name: str, needed: dict) -> pd.DataFrame:
    """What a role's own policies allow of ``needed``, one row per action and resource.

    The role's inline and attached managed policies are read and evaluated here, as IAM
    evaluates identity policies: an explicit Deny wins, else an Allow whose Action and
    Resource patterns match. Conditions are not evaluated: a statement with one is shown
    as such. Permission boundaries, SCPs and session policies are not seen.

    Parameters
    ----------
    role_name : str
        The role.
    needed : dict
        A policy document: what the role must allow (:func:`execution_policy`).

    Returns
    -------
    pandas.DataFrame
        ``permission, action, resource, allowed_by``: the policy (and statement) that
        allows it, ``None`` when nothing does, or why it could not be checked.
    """
    rows = [{"permission": s.get("Sid", ""), "action": a, "resource": r}
            for s in needed["Statement"] for a in _as_list(s["Action"])
            for r in _as_list(s["Resource"])]
    try:
        granted = role_statements(role_name)
    except ClientError as exc:
        why = f"not checked: {exc.response['Error'].get('Code')} reading the role's policies"
        return pd.DataFrame([{**row, "allowed_by": why} for row in rows])
    for row in rows:
        row["allowed_by"] = _allowed_by(granted, row["action"], row["resource"])
    return pd.DataFrame(rows, columns=["permission", "action", "resource", "allowed_by"])


def require_role(role_name: str, needed: dict) -> pd.DataFrame:
    """:func:`check_role`, and its trust policy; raise if anything needed is missing.

    Raises
    ------
    RoleLacksPermissions
        What is missing, and what to do.
    """
    role = client("iam").get_role(RoleName=role_name)["Role"]
    trust = _as_document(role["AssumeRolePolicyDocument"])
    if not any(s.get("Effect") == "Allow" and LAMBDA_SERVICE in _as_list(
            (s.get("Principal") or {}).get("Service", [])) for s in trust["Statement"]):
        raise RoleLacksPermissions(
            f"The role {role_name} cannot be used by Lambda: its trust policy does not let "
            f"{LAMBDA_SERVICE} assume it. Choose a role made for Lambda (in AWS Academy: "
            "LabRole), or leave existing_role_arn = None to create one.")
    table = check_role(role_name, needed)
    missing = table[table["allowed_by"].isna()]
    if len(missing):
        raise RoleLacksPermissions(
            f"The role {role_name} does not allow what the function needs:\n"
            + missing[["action", "resource"]].to_string(index=False)
            + "\nAdd these to the role's policy (notebook 01 prints the execution policy), "
            "or choose another role.")
    return table


def role_statements(role_name: str) -> list[tuple[str, dict]]:
    """``(policy name, statement)`` of every inline and attached policy of a role."""
    iam = client("iam")
    statements = []
    for name in iam.list_role_policies(RoleName=role_name)["PolicyNames"]:
        document = iam.get_role_policy(RoleName=role_name, PolicyName=name)["PolicyDocument"]
        statements += [(name, s) for s in _as_list(_as_document(document)["Statement"])]
    for attached in iam.list_attached_role_policies(RoleName=role_name)["AttachedPolicies"]:
        version = iam.get_policy(PolicyArn=attached["PolicyArn"])["Policy"]["DefaultVersionId"]
        document = iam.get_policy_version(PolicyArn=attached["PolicyArn"],
                                          VersionId=version)["PolicyVersion"]["Document"]
        statements += [(attached["PolicyName"], s)
                       for s in _as_list(_as_document(document)["Statement"])]
    return statements


def _allowed_by(granted: list[tuple[str, dict]], action: str, resource: str) -> str | None:
    """The first policy statement that allows ``action`` on ``resource``, unless denied."""
    matching = [(name, s) for name, s in granted
                if _matches(s, "Action", action) and _matches(s, "Resource", resource)]
    if any(s.get("Effect") == "Deny" for _, s in matching):
        return None
    for name, statement in matching:
        if statement.get("Effect") == "Allow":
            where = f"{name} ({statement['Sid']})" if statement.get("Sid") else name
            return where + (" [with a condition, not evaluated]"
                            if statement.get("Condition") else "")
    return None


def _matches(statement: dict, element: str, value: str) -> bool:
    """Does ``Action``/``Resource`` (or its ``Not...`` form) of a statement cover ``value``?"""
    if element in statement:
        return any(_glob(p).match(value) for p in _as_list(statement[element]))
    if f"Not{element}" in statement:
        return not any(_glob(p).match(value) for p in _as_list(statement[f"Not{element}"]))
    return False


@lru_cache(maxsize=None)
def _glob(pattern: str) -> re.Pattern:
    """IAM's wildcards (``*`` any run, ``?`` one character); actions are case-insensitive."""
    body = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.compile(f"^{body}$", re.IGNORECASE if ":" in pattern and "arn:" not in
                      pattern else 0)


def _as_list(value) -> list:
    return value if isinstance(value, list) else [value]


def _as_document(document) -> dict:
    return json.loads(document) if isinstance(document, str) else document
