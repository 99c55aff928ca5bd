"""The IAM policies, linted by parliament, and the operator policy checked against every
boto3 call the notebooks and helpers/cloud make (read from their source)."""
from __future__ import annotations

import ast
import json
from pathlib import Path

import botocore.session
import nbformat
import parliament
import pytest
from botocore import xform_name

from helpers.cloud.iam import _allowed_by, execution_policy, operator_policy
from helpers.cloud.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
ACCOUNT = "123456789012"
OWN_ROLE = Settings(mode="aws", workbook_id="fmriwb-1a2b3c4d", region="eu-west-1")
PRE_MADE = Settings(mode="aws", workbook_id="fmriwb-1a2b3c4d", region="eu-west-1",
                    existing_role_arn=f"arn:aws:iam::{ACCOUNT}:role/LabRole")
GOV = Settings(mode="aws", workbook_id="fmriwb-1a2b3c4d", region="us-gov-west-1")
PREFIX = {"resourcegroupstaggingapi": "tag"}  # IAM's service prefix, where not the client's
# boto3 calls whose IAM actions are not "<prefix>:<OperationName>" (Service Authorization
# Reference), or that need more than one action.
ACTIONS = {
    ("s3", "head_bucket"): ["s3:ListBucket"],
    ("s3", "list_objects_v2"): ["s3:ListBucket"],
    ("s3", "list_object_versions"): ["s3:ListBucketVersions"],
    ("s3", "list_buckets"): ["s3:ListAllMyBuckets"],
    ("s3", "head_object"): ["s3:GetObject"],
    ("s3", "delete_objects"): ["s3:DeleteObject", "s3:DeleteObjectVersion"],
    ("s3", "put_bucket_notification_configuration"): ["s3:PutBucketNotification"],
    ("s3", "get_bucket_notification_configuration"): ["s3:GetBucketNotification"],
    ("s3", "put_public_access_block"): ["s3:PutBucketPublicAccessBlock"],
    ("s3", "get_public_access_block"): ["s3:GetBucketPublicAccessBlock"],
    ("s3", "put_bucket_encryption"): ["s3:PutEncryptionConfiguration"],
    ("s3", "get_bucket_encryption"): ["s3:GetEncryptionConfiguration"],
    ("s3", "put_bucket_lifecycle_configuration"): ["s3:PutLifecycleConfiguration"],
    ("s3", "get_bucket_lifecycle_configuration"): ["s3:GetLifecycleConfiguration"],
    ("s3", "upload_file"): ["s3:PutObject", "s3:AbortMultipartUpload"],  # multipart too
    ("s3", "download_file"): ["s3:GetObject"],
    ("sqs", "create_queue"): ["sqs:CreateQueue", "sqs:TagQueue"],  # with tags
    ("lambda", "create_function"): ["lambda:CreateFunction", "lambda:TagResource",
                                    "iam:PassRole"],
    ("lambda", "invoke"): ["lambda:InvokeFunction"],
    ("logs", "create_log_group"): ["logs:CreateLogGroup", "logs:TagResource"],
    ("iam", "create_role"): ["iam:CreateRole", "iam:TagRole"],
    ("sts", "get_caller_identity"): [],  # needs no permission
}


def lint(policy: dict) -> list:
    return parliament.analyze_policy_string(json.dumps(policy)).findings


@pytest.mark.parametrize("cfg", [OWN_ROLE, PRE_MADE, GOV], ids=["own role", "pre-made", "gov"])
@pytest.mark.parametrize("make", [execution_policy, operator_policy])
def test_policies_lint_clean(make, cfg):
    """parliament 1.6.4's default auditors. Only identity policies: it reads a trust policy
    (with its Principal) as malformed."""
    findings = lint(make(cfg, ACCOUNT))
    assert findings == [], [(f.issue, f.detail) for f in findings]


def test_community_auditors_find_only_what_the_job_needs():
    """parliament's community auditors flag any policy that can create a role and pass it
    to a function: that *is* deploying a Lambda. Accepted, for these reasons (also in
    docs/setup_guide.md): the roles are limited to the workbook's IAM path, PassRole only
    towards Lambda, functions only named fmriwb-*. What they cannot limit: an operator who
    writes the role's policy can grant that role more; a permissions boundary would."""
    findings = parliament.analyze_policy_string(json.dumps(operator_policy(OWN_ROLE, ACCOUNT)),
                                                include_community_auditors=True).findings
    assert {f.issue for f in findings} == {"PERMISSIONS_MANAGEMENT_ACTIONS",
                                           "PRIVILEGE_ESCALATION"}
    escalations = {f.location["type"] for f in findings if f.issue == "PRIVILEGE_ESCALATION"}
    assert escalations == {"PassExistingRoleToNewLambdaThenInvoke",
                           "EditExistingLambdaFunctionWithRole"}


@pytest.mark.parametrize("cfg", [OWN_ROLE, GOV], ids=["aws", "aws-us-gov"])
def test_every_arn_has_the_regions_partition(cfg):
    for make in (execution_policy, operator_policy):
        resources = [r for s in make(cfg, ACCOUNT)["Statement"]
                     for r in ([s["Resource"]] if isinstance(s["Resource"], str) else s["Resource"])]
        assert all(r == "*" or r.startswith(f"arn:{cfg.partition}:") for r in resources)


def test_operator_policy_is_scoped_to_the_workbook():
    policy = operator_policy(OWN_ROLE, ACCOUNT)
    for statement in policy["Statement"]:
        assert statement["Effect"] == "Allow"
        assert not any("*" in action for action in statement["Action"]), statement["Sid"]
        resources = statement["Resource"] if isinstance(statement["Resource"], list) else [
            statement["Resource"]]
        if statement["Sid"] != "FindLeftovers":  # list calls IAM cannot scope
            assert all("fmriwb-*" in r or "/fmri-cloud-workbook/" in r for r in resources)
    (passing,) = [s for s in policy["Statement"] if "iam:PassRole" in s["Action"]]
    assert passing["Condition"] == {"StringEquals": {"iam:PassedToService": "lambda.amazonaws.com"}}
    assert passing["Resource"] == f"arn:aws:iam::{ACCOUNT}:role/fmri-cloud-workbook/*"
    pre_made = operator_policy(PRE_MADE, ACCOUNT)
    actions = {a for s in pre_made["Statement"] for a in s["Action"]}
    assert "iam:CreateRole" not in actions and "iam:DeleteRole" not in actions
    (passing,) = [s for s in pre_made["Statement"] if "iam:PassRole" in s["Action"]]
    assert passing["Resource"] == PRE_MADE.existing_role_arn


# --- every call the workbook makes is in the operator policy -------------------------------


def sources() -> dict[str, str]:
    """Python source of the notebooks' code cells and of helpers/cloud, by file."""
    found = {}
    for path in sorted((ROOT / "notebooks").glob("[0-9][0-9]*_*.ipynb")):
        cells = nbformat.read(path, as_version=4).cells
        found[path.name] = "\n".join(c.source for c in cells if c.cell_type == "code")
    for path in sorted((ROOT / "helpers" / "cloud").glob("*.py")):
        found[path.name] = path.read_text()
    return found


def _client_names(tree: ast.AST) -> dict[str, str]:
    """Variables bound to ``client("<service>")``, also in tuple assignments and
    ``(client(s) for s in ("s3", ...))``."""
    names = {}
    for node in ast.walk(tree):
        if not isinstance(node, ast.Assign):
            continue
        targets = node.targets[0].elts if isinstance(node.targets[0], ast.Tuple) else node.targets
        values = node.value.elts if isinstance(node.value, ast.Tuple) else [node.value]
        if isinstance(node.value, ast.GeneratorExp) and _is_client(node.value.elt):
            values = [ast.Constant(e.value) for e in node.value.generators[0].iter.elts]
        for target, value in zip(targets, values):
            service = value.value if isinstance(value, ast.Constant) else _is_client(value)
            if isinstance(target, ast.Name) and isinstance(service, str):
                names[target.id] = service
    return names


def _is_client(node: ast.AST) -> str | bool:
    if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "client":
        arg = node.args[0]
        return arg.value if isinstance(arg, ast.Constant) else True
    return False


def boto3_calls() -> dict[tuple[str, str], set[str]]:
    """``{(service, operation): {files}}`` of every boto3 operation the sources call or hand
    on, paginators and waiters included (their operation), checked against botocore's models."""
    session = botocore.session.get_session()
    calls: dict[tuple[str, str], set[str]] = {}
    for name, source in sources().items():
        tree = ast.parse(source)
        names = _client_names(tree)
        for node in ast.walk(tree):
            # A call (s3.create_bucket(...)), or a method handed on to be called
            # (while_role_propagates(lam.create_function, ...), sweep.step(..., lam.delete_function)).
            attribute = node.func if isinstance(node, ast.Call) else node
            if not isinstance(attribute, ast.Attribute):
                continue
            owner = attribute.value
            service = names.get(owner.id) if isinstance(owner, ast.Name) else _is_client(owner)
            if not isinstance(service, str):
                continue
            operation = attribute.attr
            if operation in ("get_paginator", "get_waiter"):
                if not isinstance(node, ast.Call):
                    continue
                argument = node.args[0].value
                operation = argument if operation == "get_paginator" else _waiter_operation(
                    session, service, argument)
            model = session.get_service_model(service)
            known = {xform_name(op) for op in model.operation_names} | {"upload_file",
                                                                         "download_file"}
            if operation in known:
                calls.setdefault((service, operation), set()).add(name)
    return calls


def _waiter_operation(session, service: str, waiter: str) -> str:
    """The operation a waiter (``client.get_waiter("function_active_v2")``) polls."""
    model = session.get_waiter_model(service)
    (name,) = [n for n in model.waiter_names if xform_name(n) == waiter]
    return xform_name(model.get_waiter(name).operation)


def iam_actions(service: str, operation: str) -> list[str]:
    if (service, operation) in ACTIONS:
        return ACTIONS[service, operation]
    model = botocore.session.get_session().get_service_model(service)
    api = {xform_name(op): op for op in model.operation_names}[operation]
    return [f"{PREFIX.get(service, service)}:{api}"]


def test_the_source_scan_sees_the_calls_it_should():
    calls = boto3_calls()
    for expected in [("s3", "create_bucket"), ("lambda", "delete_function"),
                     ("lambda", "get_function"),  # the function_updated_v2 waiter
                     ("s3", "list_object_versions"), ("iam", "list_roles"),
                     ("resourcegroupstaggingapi", "get_resources"), ("s3", "upload_file")]:
        assert expected in calls, expected
    assert len(calls) > 60


@pytest.mark.parametrize("call", sorted(boto3_calls()), ids=lambda c: f"{c[0]}.{c[1]}")
def test_operator_may_make_every_call(call):
    """Each action is allowed by the operator policy (for the pre-made role's variant,
    where the call is only made with a pre-made role)."""
    granted = [("operator", s) for cfg in (OWN_ROLE, PRE_MADE)
               for s in operator_policy(cfg, ACCOUNT)["Statement"]]
    for action in iam_actions(*call):
        assert any(_allowed_by([g], action, r) for g in granted
                   for r in ([g[1]["Resource"]] if isinstance(g[1]["Resource"], str)
                             else g[1]["Resource"])), f"{action} ({', '.join(boto3_calls()[call])})"


@pytest.mark.parametrize("cfg", [OWN_ROLE, PRE_MADE], ids=["own role", "pre-made"])
def test_operator_policy_grants_nothing_unused(cfg):
    """Least privilege the other way round: every action granted is one a call needs."""
    used = {a.lower() for call in boto3_calls() for a in iam_actions(*call)}
    granted = {a.lower() for s in operator_policy(cfg, ACCOUNT)["Statement"] for a in s["Action"]}
    assert granted - used == set()


def test_the_setup_guide_shows_this_policy():
    """docs/setup_guide.md prints the operator policy with placeholders: the same policy."""
    guide = (ROOT / "docs" / "setup_guide.md").read_text()
    section = guide[guide.index("## 0. Your own permissions"):]
    shown = section[section.index("```json") + len("```json"):section.index("```\n", section.index("```json") + 7)]
    cfg = Settings(mode="aws", workbook_id="fmriwb-x", region="us-east-1")
    expected = json.dumps(operator_policy(cfg, "111122223333"), indent=2)
    assert json.loads(shown) == json.loads(
        expected.replace("us-east-1", "<region>").replace("111122223333", "<account>"))
