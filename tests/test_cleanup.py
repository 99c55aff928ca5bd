"""Safety rails on what notebooks 01 and 02 really create, then verified cleanup.

The two notebooks run with papermill (CI parameters) in a sandbox with a local cloud of its
own; the tests then read back what exists, run one real invocation, and clean up. Tests
run in file order: inspect, then delete.
"""
import json
import subprocess
import sys

import pytest

from fmri_preproc.contract import INPUT_SUFFIX
from helpers.cloud.cleanup import delete_all, find_leftovers
from helpers.cloud.clients import client
from helpers.cloud.logs import invocations, log_events
from helpers.cloud.settings import ROLE_PATH, Settings
from pipeline_fixtures import wait_until
from private_cloud import ROOT, private_cloud, run_module, sandbox_env

sys.path.insert(0, str(ROOT / "ci"))
from run_workbook import ACCOUNT_ID_RE  # noqa: E402  (the redactor's own pattern)

pytestmark = pytest.mark.slow  # the local cloud (see pyproject's markers)


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    """A sandbox where notebooks 00-02 have just run (02 runs the engine on a run of 00); boto3 points at its local cloud."""
    sandbox = tmp_path_factory.mktemp("cleanup")
    done = subprocess.run(
        [sys.executable, "ci/run_workbook.py", "--ci", "--only", "00", "01", "02", "--build-dir",
         str(sandbox / "build")], cwd=ROOT, env=sandbox_env(sandbox), capture_output=True,
        text=True, timeout=600)
    if done.returncode:
        run_module(sandbox, "helpers.local_cloud", "stop")
        pytest.fail(f"notebooks 00-02 failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    with private_cloud(sandbox, start=False):
        yield sandbox


@pytest.fixture(scope="module")
def cfg(sandbox):
    """The notebooks' settings (workbook id and names)."""
    return Settings(**json.loads((sandbox / "build" / "workbook-local.json").read_text()))


@pytest.fixture(scope="module")
def invoked(cfg):
    """One real invocation of the deployed function (a bad input: it writes an error record),
    finished and logged (notebook 02's test call has a REPORT line of its own)."""
    key = f"{cfg.input_prefix}sub-x_bold.nii.gz"
    client("s3").put_object(Bucket=cfg.input_bucket, Key=key, Body=b"not a NIfTI file")
    reported = lambda: any(r.get("key") == key for r in invocations(log_events(cfg.log_group)))  # noqa: E731
    assert wait_until(reported, timeout=60), "the function did not run"
    return cfg


def tags_of(cfg, kind, name):
    """The tags of one resource as a dict, read from its own service."""
    if kind == "bucket":
        tag_set = client("s3").get_bucket_tagging(Bucket=name)["TagSet"]
    elif kind == "role":
        tag_set = client("iam").list_role_tags(RoleName=name)["Tags"]
    elif kind == "function":
        arn = client("lambda").get_function_configuration(FunctionName=name)["FunctionArn"]
        return client("lambda").list_tags(Resource=arn)["Tags"]
    elif kind == "queue":
        sqs = client("sqs")
        return sqs.list_queue_tags(QueueUrl=sqs.get_queue_url(QueueName=name)["QueueUrl"]
                                   ).get("Tags", {})
    else:
        return client("logs").list_tags_log_group(logGroupName=name)["tags"]
    return {t["Key"]: t["Value"] for t in tag_set}


def tagged_arns(cfg):
    pages = client("resourcegroupstaggingapi").get_paginator("get_resources").paginate(
        TagFilters=[{"Key": "workbook-id", "Values": [cfg.workbook_id]}])
    return {r["ResourceARN"] for page in pages for r in page["ResourceTagMappingList"]}


def test_names_come_from_the_workbook_id(cfg):
    names = [cfg.input_bucket, cfg.output_bucket, cfg.role_name, cfg.policy_name,
             cfg.function_name, cfg.failure_queue, cfg.log_group.removeprefix("/aws/lambda/")]
    assert all(name.startswith(cfg.workbook_id) for name in names)
    assert client("iam").list_role_policies(RoleName=cfg.role_name)["PolicyNames"] == [
        cfg.policy_name]
    assert client("iam").list_attached_role_policies(RoleName=cfg.role_name)[
        "AttachedPolicies"] == []  # no managed policy such as AmazonS3FullAccess
    # Under the workbook's path: cleanup lists that path, not every role of the account.
    assert client("iam").get_role(RoleName=cfg.role_name)["Role"]["Path"] == ROLE_PATH


def test_log_retention_is_a_value_cloudwatch_accepts(cfg):
    (group,) = [g for g in client("logs").describe_log_groups(
        logGroupNamePrefix=cfg.log_group)["logGroups"] if g["logGroupName"] == cfg.log_group]
    assert group["retentionInDays"] == cfg.log_retention_days


def test_executed_notebooks_do_not_show_the_account_id(sandbox):
    """ci/run_workbook.py redacts 12-digit account ids (ARNs, get_caller_identity) in the
    executed copies and their HTML; the local cloud's account is 123456789012."""
    account = client("sts").get_caller_identity()["Account"]
    for name in ("01_create_buckets_and_role", "02_package_and_deploy_lambda"):
        executed = (sandbox / "build" / "notebooks" / f"{name}.ipynb").read_text()
        html = (sandbox / "build" / "html" / f"{name}.html").read_text()
        assert account not in executed and account not in html, name
        assert not ACCOUNT_ID_RE.search(html), name
        assert "<account-id>" in executed, name  # the ARNs were there, redacted


def test_an_account_id_is_found_alone_not_inside_a_hex_id_or_a_timestamp():
    text = "arn:aws:iam::123456789012:role/x, widget a8edb516578242359ea4, at 1733300000000 ms"
    assert ACCOUNT_ID_RE.findall(text) == ["123456789012"]


@pytest.mark.parametrize("which", ["input_bucket", "output_bucket"])
def test_buckets_are_locked_down(cfg, which):
    s3, bucket = client("s3"), getattr(cfg, which)
    block = s3.get_public_access_block(Bucket=bucket)["PublicAccessBlockConfiguration"]
    assert block == {"BlockPublicAcls": True, "IgnorePublicAcls": True,
                     "BlockPublicPolicy": True, "RestrictPublicBuckets": True}
    (rule,) = s3.get_bucket_encryption(Bucket=bucket)["ServerSideEncryptionConfiguration"]["Rules"]
    assert rule["ApplyServerSideEncryptionByDefault"]["SSEAlgorithm"] == "AES256"
    (expiry,) = s3.get_bucket_lifecycle_configuration(Bucket=bucket)["Rules"]
    assert expiry["Status"] == "Enabled" and expiry["Filter"] == {"Prefix": ""}
    assert expiry["Expiration"]["Days"] == cfg.object_expiry_days
    assert "Status" not in s3.get_bucket_versioning(Bucket=bucket)  # never turned on


def test_trigger_cannot_be_reached_by_outputs(cfg):
    (config,) = client("s3").get_bucket_notification_configuration(
        Bucket=cfg.input_bucket)["LambdaFunctionConfigurations"]
    rules = {r["Name"].lower(): r["Value"] for r in config["Filter"]["Key"]["FilterRules"]}
    assert rules == {"prefix": cfg.input_prefix, "suffix": INPUT_SUFFIX}
    assert "LambdaFunctionConfigurations" not in client("s3").get_bucket_notification_configuration(
        Bucket=cfg.output_bucket)


@pytest.mark.parametrize("kind,attr", [("bucket", "input_bucket"), ("bucket", "output_bucket"),
                                       ("role", "role_name"), ("function", "function_name"),
                                       ("queue", "failure_queue")])
def test_every_resource_is_tagged(cfg, kind, attr):
    assert tags_of(cfg, kind, getattr(cfg, attr)) == cfg.tags


def test_log_group_is_tagged(invoked):
    assert tags_of(invoked, "log group", invoked.log_group) == invoked.tags


def test_tagging_api_finds_buckets_function_and_queue(invoked):
    """moto's Resource Groups Tagging API covers S3, Lambda, SQS (and tagged log groups)."""
    cfg = invoked
    arns = tagged_arns(cfg)
    assert {f"arn:aws:s3:::{cfg.input_bucket}", f"arn:aws:s3:::{cfg.output_bucket}"} <= arns
    assert any(arn.endswith(f":function:{cfg.function_name}") for arn in arns)
    assert any(arn.endswith(f":{cfg.failure_queue}") for arn in arns)
    assert not any(":iam::" in arn for arn in arns)  # IAM is not in that API: roles by name


def test_find_leftovers_sees_everything_before_cleanup(invoked):
    found = {(f["type"], f["name"], f["found_by"]) for f in find_leftovers(invoked)}
    cfg = invoked
    assert found == {("s3 bucket", cfg.input_bucket, "name"),
                     ("s3 bucket", cfg.output_bucket, "name"),
                     ("lambda function", cfg.function_name, "name"),
                     ("log group", cfg.log_group, "name"),
                     ("sqs queue", cfg.failure_queue, "name"),
                     ("iam role", cfg.role_name, "name")}


def test_cleanup_deletes_every_version_and_leaves_nothing(invoked):
    cfg, s3 = invoked, client("s3")
    s3.put_bucket_versioning(Bucket=cfg.output_bucket,
                             VersioningConfiguration={"Status": "Enabled"})
    key = f"{cfg.output_prefix}kept.json"
    for body in (b"1", b"2"):
        s3.put_object(Bucket=cfg.output_bucket, Key=key, Body=body)
    s3.delete_object(Bucket=cfg.output_bucket, Key=key)  # a delete marker over two versions
    versions = s3.list_object_versions(Bucket=cfg.output_bucket)
    assert len(versions["Versions"]) >= 2 and versions["DeleteMarkers"]

    steps = delete_all(cfg)
    stopping, deleting = steps[:3], steps[3:]
    assert stopping == [f"trigger on {cfg.input_bucket}: removed",
                        f"new runs of {cfg.function_name}: stopped (reserved concurrency 0)",
                        "runs in flight: none"]
    assert [step.split(" ")[0] for step in deleting] == [  # the function before its log group
        "function", "log", "bucket", "bucket", "queue", "role"]
    assert all(step.endswith(": deleted") for step in deleting), steps
    assert find_leftovers(cfg) == []
    assert tagged_arns(cfg) == set()
    names = {b["Name"] for b in s3.list_buckets()["Buckets"]}
    assert not {cfg.input_bucket, cfg.output_bucket} & names


def test_cleanup_is_safe_to_rerun(invoked):
    steps = delete_all(invoked)
    assert "runs in flight: none (no function)" in steps
    assert all(step.endswith(": already gone") for step in steps if not step.startswith("runs")), steps
    assert find_leftovers(invoked) == []


def test_a_forgotten_resource_is_found_by_tag(invoked):
    cfg = invoked
    tags = [{"Key": k, "Value": v} for k, v in cfg.tags.items()]
    sqs, s3, logs = client("sqs"), client("s3"), client("logs")
    url = sqs.create_queue(QueueName="scratch-queue", tags=cfg.tags)["QueueUrl"]
    s3.create_bucket(Bucket="scratch-bucket-xyz")
    s3.put_bucket_tagging(Bucket="scratch-bucket-xyz", Tagging={"TagSet": tags})
    logs.create_log_group(logGroupName="/scratch/logs", tags=cfg.tags)
    try:
        found = find_leftovers(cfg)
        assert {(f["type"], f["found_by"]) for f in found} == {
            ("sqs", "tag"), ("s3", "tag"), ("logs", "tag")}
        assert any(f["name"].endswith(":scratch-queue") for f in found)
        assert "arn:aws:s3:::scratch-bucket-xyz" in {f["name"] for f in found}
    finally:
        sqs.delete_queue(QueueUrl=url)
        s3.delete_bucket(Bucket="scratch-bucket-xyz")
        logs.delete_log_group(logGroupName="/scratch/logs")
    assert find_leftovers(cfg) == []


def test_a_stale_tag_listing_is_not_a_leftover(invoked, monkeypatch):
    """On AWS the tagging API can list a resource for a while after its deletion."""
    from helpers.cloud import cleanup

    stale = [f"arn:aws:s3:::{invoked.input_bucket}",
             f"arn:aws:sqs:us-east-1:123456789012:{invoked.failure_queue}",
             f"arn:aws:lambda:us-east-1:123456789012:function:{invoked.function_name}",
             f"arn:aws:logs:us-east-1:123456789012:log-group:{invoked.log_group}:*"]
    monkeypatch.setattr(cleanup, "_tagged_arns", lambda cfg: stale)
    assert find_leftovers(invoked) == []


def test_cli_cleans_up_a_half_finished_workbook(invoked, sandbox):
    """A workbook that crashed after making its buckets: the CLI removes them."""
    half = Settings(mode="local", workbook_id="fmriwb-halfdone")
    s3 = client("s3")
    for bucket in (half.input_bucket, half.output_bucket):
        s3.create_bucket(Bucket=bucket)
        s3.put_bucket_tagging(Bucket=bucket, Tagging={
            "TagSet": [{"Key": k, "Value": v} for k, v in half.tags.items()]})
    s3.put_object(Bucket=half.input_bucket, Key="raw/sub-01_bold.nii.gz", Body=b"x")
    assert len(find_leftovers(half)) == 2
    done = run_module(sandbox, "helpers.cloud.cleanup", "--workbook-id", half.workbook_id)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"bucket {half.input_bucket} (every object version first): deleted" in done.stdout
    assert f"function {half.function_name}" in done.stdout and "already gone" in done.stdout
    assert "Nothing is left." in done.stdout
    assert find_leftovers(half) == []


@pytest.mark.parametrize("extra,env,refusal", [
    ([], {}, "pass --yes"),                      # no confirmation
    (["--yes"], {"CI": "true"}, "never"),        # confirmed, but under CI
])
def test_cli_refuses_aws_without_opt_in_or_under_ci(sandbox, extra, env, refusal):
    done = run_module(sandbox, "helpers.cloud.cleanup", "--mode", "aws", "--workbook-id",
                      "fmriwb-nothere", *extra, env=env)
    assert done.returncode != 0
    assert "AwsModeRefused" in done.stderr and refusal in done.stderr


def test_notebook_05_runs_again_after_cleanup(invoked, sandbox):
    """After cleanup (the tests above), notebook 05 twice: once with the saved id, whose
    buckets and logs are gone, then with a fresh id. Costs are zero, every deletion is
    "already gone", nothing is left, and neither run fails."""
    for run in ("saved id", "fresh id"):
        done = subprocess.run(
            [sys.executable, "ci/run_workbook.py", "--ci", "--only", "05", "--build-dir",
             str(sandbox / "build")], cwd=ROOT, env=sandbox_env(sandbox), capture_output=True,
            text=True, timeout=600)
        assert done.returncode == 0, f"{run}:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
        report = json.loads((sandbox / "build" / "results" / "cleanup_report.json").read_text())
        assert report["remaining"] == [] and report["cost_usd"] == 0, run
    assert report["workbook_id"] != invoked.workbook_id
