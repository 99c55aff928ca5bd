"""A pre-made execution role (AWS Academy's LabRole; accounts that forbid iam:CreateRole):
notebook 01 checks its policies instead of creating a role, and cleanup keeps it."""
from __future__ import annotations

import json
import subprocess
import sys

import nbformat
import pytest

from helpers.cloud.cleanup import delete_all, find_leftovers
from helpers.cloud.clients import client
from helpers.cloud.iam import RoleLacksPermissions, check_role, execution_policy, require_role
from helpers.cloud.settings import Settings
from private_cloud import ROOT, private_cloud, sandbox_env

pytestmark = pytest.mark.slow  # the local cloud (see pyproject's markers)

TRUST = json.dumps({"Version": "2012-10-17", "Statement": [{
    "Effect": "Allow", "Principal": {"Service": "lambda.amazonaws.com"},
    "Action": "sts:AssumeRole"}]})
BROAD = {"Version": "2012-10-17", "Statement": [
    {"Effect": "Allow", "Action": ["s3:*", "logs:*"], "Resource": "*"},
    {"Effect": "Allow", "Action": "sqs:Send*", "Resource": "arn:aws:sqs:*:*:*"}]}
MANAGED_SQS = {"Version": "2012-10-17", "Statement": [
    {"Effect": "Allow", "Action": "sqs:*", "Resource": "*"}]}


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    sandbox = tmp_path_factory.mktemp("existing-role")
    with private_cloud(sandbox):
        iam = client("iam")
        iam.create_role(RoleName="LabRole", Path="/", AssumeRolePolicyDocument=TRUST)
        iam.put_role_policy(RoleName="LabRole", PolicyName="lab", PolicyDocument=json.dumps(BROAD))
        iam.create_role(RoleName="NoQueueRole", AssumeRolePolicyDocument=TRUST)
        iam.put_role_policy(RoleName="NoQueueRole", PolicyName="s3-and-logs",
                            PolicyDocument=json.dumps({**BROAD, "Statement": BROAD["Statement"][:1]}))
        yield sandbox


def run_notebook_01(sandbox, role_arn):
    out = sandbox / "01.ipynb"
    done = subprocess.run(
        [sys.executable, "-m", "papermill", "notebooks/01_create_buckets_and_role.ipynb",
         str(out), "-p", "existing_role_arn", role_arn, "--cwd", "notebooks",
         "--log-level", "ERROR"],
        cwd=ROOT, env=sandbox_env(sandbox), capture_output=True, text=True, timeout=300)
    return done, out


def saved_settings(sandbox) -> Settings:
    return Settings(**json.loads((sandbox / "build" / "workbook-local.json").read_text()))


def test_notebook_01_uses_a_pre_made_role_and_creates_none(sandbox):
    account = client("sts").get_caller_identity()["Account"]
    arn = f"arn:aws:iam::{account}:role/LabRole"
    done, out = run_notebook_01(sandbox, arn)
    assert done.returncode == 0, done.stderr[-3000:]
    cfg = saved_settings(sandbox)
    assert (cfg.existing_role_arn, cfg.role_name, cfg.owns_role) == (arn, "LabRole", False)
    roles = {r["RoleName"] for r in client("iam").list_roles()["Roles"]}
    assert roles == {"LabRole", "NoQueueRole"}  # no "<id>-lambda-role" was made
    assert client("iam").list_role_policies(RoleName="LabRole")["PolicyNames"] == ["lab"]
    text = json.dumps([o for c in nbformat.read(out, as_version=4).cells
                       for o in c.get("outputs", [])])
    assert "pre-made role" in text and "lab" in text  # the check table, policy by policy

    for bucket in (cfg.input_bucket, cfg.output_bucket):  # made as usual
        client("s3").head_bucket(Bucket=bucket)
    lines = delete_all(cfg)
    assert "role LabRole: pre-made (existing_role_arn), kept" in lines
    assert find_leftovers(cfg) == []
    assert client("iam").get_role(RoleName="LabRole")["Role"]["RoleName"] == "LabRole"


def test_notebook_01_stops_on_a_role_that_lacks_a_permission(sandbox):
    account = client("sts").get_caller_identity()["Account"]
    done, _ = run_notebook_01(sandbox, f"arn:aws:iam::{account}:role/NoQueueRole")
    assert done.returncode != 0
    assert "RoleLacksPermissions" in done.stderr and "sqs:SendMessage" in done.stderr


def test_check_role_reads_inline_and_attached_policies(sandbox):
    iam = client("iam")
    account = client("sts").get_caller_identity()["Account"]
    cfg = Settings(mode="local", workbook_id="fmriwb-check")
    needed = execution_policy(cfg, account)
    table = check_role("NoQueueRole", needed)
    assert set(table.loc[table["allowed_by"].isna(), "action"]) == {"sqs:SendMessage"}
    assert (table.loc[table["action"] == "s3:GetObject", "allowed_by"] == "s3-and-logs").all()
    policy = iam.create_policy(PolicyName="queue-access", PolicyDocument=json.dumps(MANAGED_SQS))
    iam.attach_role_policy(RoleName="NoQueueRole", PolicyArn=policy["Policy"]["Arn"])
    table = require_role("NoQueueRole", needed)  # now complete: no error
    assert set(table.loc[table["action"] == "sqs:SendMessage", "allowed_by"]) == {"queue-access"}


def test_an_explicit_deny_wins_and_a_role_lambda_cannot_assume_is_refused(sandbox):
    iam = client("iam")
    account = client("sts").get_caller_identity()["Account"]
    needed = execution_policy(Settings(mode="local", workbook_id="fmriwb-check"), account)
    iam.put_role_policy(RoleName="LabRole", PolicyName="no-deletes", PolicyDocument=json.dumps({
        "Version": "2012-10-17", "Statement": [
            {"Effect": "Deny", "Action": "s3:Delete*", "Resource": "*"}]}))
    table = check_role("LabRole", needed)
    assert set(table.loc[table["allowed_by"].isna(), "action"]) == {"s3:DeleteObject"}
    iam.delete_role_policy(RoleName="LabRole", PolicyName="no-deletes")
    iam.create_role(RoleName="EC2Role", AssumeRolePolicyDocument=TRUST.replace(
        "lambda.amazonaws.com", "ec2.amazonaws.com"))
    iam.put_role_policy(RoleName="EC2Role", PolicyName="lab", PolicyDocument=json.dumps(BROAD))
    with pytest.raises(RoleLacksPermissions, match="trust policy"):
        require_role("EC2Role", needed)
