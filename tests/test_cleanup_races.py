"""Cleanup as it must behave on AWS, with the local cloud showing AWS's behaviour: a run
still in flight, a write that lands after a bucket was emptied, a step that keeps failing,
deletions that take effect only after a while, and the command line finding every
workbook by tag and name. One local cloud of the module's own (AWS behaviour settings are
global to a server)."""
from __future__ import annotations

import datetime
import json
import threading
import time

import boto3
import pytest

from conftest import make_zip
from fmri_preproc.contract import LogEvent, Record, run_from_key
from helpers import local_cloud
from helpers.cloud import cleanup
from helpers.cloud.cleanup import (CleanupIncomplete, delete_all, find_leftovers,
                                   wait_until_gone)
from helpers.cloud.clients import client
from helpers.cloud.deploy import notification_configuration
from helpers.cloud.iam import execution_policy, lambda_trust_policy
from helpers.cloud.settings import ROLE_PATH, Settings
from held_invocation import HELD_APP, HeldInvocation
from pipeline_fixtures import wait_until
from private_cloud import private_cloud, run_module

pytestmark = pytest.mark.slow  # the local cloud (see pyproject's markers)

CONTROL = "cleanup-races-control"
HELD_KEY = "raw/sub-01/func/sub-01_task-hold_bold.nii.gz"
# An S3-triggered run that holds until released, then writes late into the output bucket
# and finishes as the real handler does: its start line, then a marker for the upload.
HELD_S3_APP = '''
import json, os, time
from urllib.parse import unquote_plus
import boto3

def lambda_handler(event, context):
    s3 = boto3.client("s3")
    control, out = os.environ["CONTROL_BUCKET"], os.environ["OUTPUT_BUCKET"]
    for record in event["Records"]:
        key = unquote_plus(record["s3"]["object"]["key"])
        head = s3.head_object(Bucket=record["s3"]["bucket"]["name"], Key=key)
        etag = head["ETag"].strip('"')
        print(json.dumps({"message": "%(start)s", "key": key, "etag": etag}))
        s3.put_object(Bucket=control, Key="held/" + os.environ["HOLD_ID"], Body=b"")
        while True:
            try:
                s3.head_object(Bucket=control, Key="release/" + os.environ["HOLD_ID"])
                break
            except s3.exceptions.ClientError:
                time.sleep(0.1)
        s3.put_object(Bucket=out, Key="derivatives/late_write.json", Body=b"written late")
        marker = {"%(etag)s": etag, "%(modified)s": head["LastModified"].isoformat()}
        s3.put_object(Bucket=out, Key=os.environ["MARKER_KEY"], Body=json.dumps(marker))
    return {}
''' % {"start": LogEvent.START, "etag": Record.ETAG, "modified": Record.INPUT_LAST_MODIFIED}


@pytest.fixture(scope="module")
def cloud_state(tmp_path_factory):
    with private_cloud(tmp_path_factory.mktemp("races")) as state:
        client("s3").create_bucket(Bucket=CONTROL)
        yield state


@pytest.fixture
def aws_behaviour(cloud_state):
    """Set AWS behaviour on the module's local cloud for one test; the defaults after."""
    def change(**settings):
        return local_cloud.set_aws_behaviour(cloud_state["endpoint"],
                                             state_dir=cloud_state["state_dir"], **settings)
    yield change
    change(deletion_delay_s=0, async_time_scale=None)


def tagged(cfg):
    return [{"Key": k, "Value": v} for k, v in cfg.tags.items()]


def make_workbook(workbook_id: str, *, app: str = HELD_S3_APP, timeout: int = 30,
                  object_lock: bool = False) -> Settings:
    """Everything notebooks 01 and 02 make (buckets, role under the path, queue, log group,
    function with reserved concurrency, async config, permission, trigger), tagged; the
    function is ``app``."""
    cfg = Settings(mode="local", workbook_id=workbook_id)
    s3, iam, lam, sqs, logs = (client(s) for s in ("s3", "iam", "lambda", "sqs", "logs"))
    account_id = client("sts").get_caller_identity()["Account"]
    for bucket in (cfg.input_bucket, cfg.output_bucket):
        lock = {"ObjectLockEnabledForBucket": True} if object_lock and bucket == cfg.output_bucket else {}
        s3.create_bucket(Bucket=bucket, **lock)
        s3.put_bucket_tagging(Bucket=bucket, Tagging={"TagSet": tagged(cfg)})
    role = iam.create_role(RoleName=cfg.role_name, Path=ROLE_PATH, Tags=tagged(cfg),
                           AssumeRolePolicyDocument=json.dumps(lambda_trust_policy()))["Role"]
    iam.put_role_policy(RoleName=cfg.role_name, PolicyName=cfg.policy_name,
                        PolicyDocument=json.dumps(execution_policy(cfg, account_id)))
    queue_url = sqs.create_queue(QueueName=cfg.failure_queue, tags=cfg.tags)["QueueUrl"]
    queue_arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])[
        "Attributes"]["QueueArn"]
    logs.create_log_group(logGroupName=cfg.log_group, tags=cfg.tags)
    marker = f"{cfg.output_prefix}{run_from_key(HELD_KEY.removeprefix(cfg.input_prefix)).done}"
    function = lam.create_function(
        FunctionName=cfg.function_name, Runtime="python3.11", Handler="app.lambda_handler",
        Role=role["Arn"], Code={"ZipFile": make_zip({"app.py": app})}, Timeout=timeout,
        MemorySize=128, Tags=cfg.tags, Environment={"Variables": {
            "CONTROL_BUCKET": CONTROL, "OUTPUT_BUCKET": cfg.output_bucket,
            "HOLD_ID": workbook_id, "MARKER_KEY": marker}})
    lam.put_function_concurrency(FunctionName=cfg.function_name, ReservedConcurrentExecutions=2)
    lam.put_function_event_invoke_config(FunctionName=cfg.function_name, MaximumRetryAttempts=0,
                                         DestinationConfig={"OnFailure": {"Destination": queue_arn}})
    lam.add_permission(FunctionName=cfg.function_name, StatementId="s3-invoke",
                       Action="lambda:InvokeFunction", Principal="s3.amazonaws.com",
                       SourceArn=f"arn:aws:s3:::{cfg.input_bucket}", SourceAccount=account_id)
    s3.put_bucket_notification_configuration(
        **notification_configuration(cfg, function_arn=function["FunctionArn"]))
    return cfg


def exists(bucket, key):
    try:
        client("s3").head_object(Bucket=bucket, Key=key)
        return True
    except client("s3").exceptions.ClientError:
        return False


def function_exists(cfg):
    try:
        client("lambda").get_function_configuration(FunctionName=cfg.function_name)
        return True
    except client("lambda").exceptions.ResourceNotFoundException:
        return False


def test_cleanup_waits_for_a_run_in_flight(cloud_state):
    """An upload's run is still going when cleanup starts: cleanup stops new runs, waits
    for it (not blindly: until it has finished and been logged), then deletes; the run's
    late write and its REPORT line land before the bucket and the log group go."""
    cfg = make_workbook("fmriwb-inflight", timeout=40)
    client("s3").put_object(Bucket=cfg.input_bucket, Key=HELD_KEY, Body=b"a run")
    assert wait_until(lambda: exists(CONTROL, f"held/{cfg.workbook_id}"), timeout=60)
    done = {}
    sweep = threading.Thread(target=lambda: done.update(lines=delete_all(cfg)))
    sweep.start()
    lam, s3 = client("lambda"), client("s3")
    assert wait_until(lambda: lam.get_function_concurrency(FunctionName=cfg.function_name).get(
        "ReservedConcurrentExecutions") == 0, timeout=30)
    assert "LambdaFunctionConfigurations" not in s3.get_bucket_notification_configuration(
        Bucket=cfg.input_bucket)
    time.sleep(4)
    assert sweep.is_alive() and function_exists(cfg), "cleanup did not wait for the run"
    s3.head_bucket(Bucket=cfg.output_bucket)

    released = time.monotonic()
    s3.put_object(Bucket=CONTROL, Key=f"release/{cfg.workbook_id}", Body=b"")
    sweep.join(timeout=90)
    assert not sweep.is_alive()
    assert time.monotonic() - released < 40  # it followed the run, not the function's timeout
    lines = done["lines"]
    assert any(line.startswith("runs in flight: none (waited") for line in lines), lines
    assert f"bucket {cfg.output_bucket} (every object version first): deleted" in lines
    time.sleep(2)  # anything the run still wrote has landed by now
    assert find_leftovers(cfg) == []  # no log group re-created by a late REPORT line


def test_a_late_write_after_emptying_is_retried(cloud_state, monkeypatch):
    """Something writes into the output bucket after cleanup emptied it: DeleteBucket
    fails with BucketNotEmpty; cleanup empties it again, and every later step still runs."""
    cfg = make_workbook("fmriwb-latewrite")
    client("lambda").create_function(
        FunctionName="late-writer", Runtime="python3.11", Handler="app.lambda_handler",
        Role=client("iam").get_role(RoleName=cfg.role_name)["Role"]["Arn"], Timeout=60,
        Code={"ZipFile": make_zip({"app.py": HELD_APP})})
    held = HeldInvocation(control_bucket=CONTROL, target_bucket=cfg.output_bucket)
    held.start("late-writer")
    assert held.wait_until_running()
    real_empty, released = cleanup.empty_bucket, []

    def empty_then_late_write(bucket):
        removed = real_empty(bucket)
        if bucket == cfg.output_bucket and not released:
            held.release()  # the write lands between emptying and DeleteBucket
            released.append(bucket)
            assert held.wait_until_written()
        return removed

    monkeypatch.setattr(cleanup, "empty_bucket", empty_then_late_write)
    lines = delete_all(cfg)
    assert (f"bucket {cfg.output_bucket} (every object version first): deleted (after "
            "removing 1 object(s) written late)") in lines
    assert lines[-2:] == [f"queue {cfg.failure_queue}: deleted",
                          f"role {cfg.role_name} and its policies: deleted"]
    assert find_leftovers(cfg) == []
    client("lambda").delete_function(FunctionName="late-writer")


def test_a_step_that_keeps_failing_does_not_stop_the_others(cloud_state):
    """An object under Object Lock cannot be deleted (delete_objects answers 200 with an
    AccessDenied per object): that bucket stays, every other resource goes, and the error
    is raised at the end with what to do."""
    cfg = make_workbook("fmriwb-locked", object_lock=True)
    until = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=1)
    s3 = client("s3")
    s3.put_object(Bucket=cfg.output_bucket, Key="derivatives/kept.json", Body=b"{}",
                  ObjectLockMode="GOVERNANCE", ObjectLockRetainUntilDate=until)
    with pytest.raises(CleanupIncomplete) as incomplete:
        delete_all(cfg)
    (error,) = incomplete.value.errors
    assert error.startswith(f"bucket {cfg.output_bucket}") and "AccessDenied" in error
    assert "object lock" in error.lower() and "run the cleanup again" in str(incomplete.value)
    steps = incomplete.value.steps
    for deleted in (f"function {cfg.function_name}", f"log group {cfg.log_group}",
                    f"bucket {cfg.input_bucket}", f"queue {cfg.failure_queue}",
                    f"role {cfg.role_name}"):
        assert any(s.startswith(deleted) and s.endswith(": deleted") for s in steps), deleted
    assert [(f["type"], f["name"]) for f in find_leftovers(cfg)] == [
        ("s3 bucket", cfg.output_bucket)]
    for version in s3.list_object_versions(Bucket=cfg.output_bucket)["Versions"]:
        s3.delete_object(Bucket=cfg.output_bucket, Key=version["Key"],
                         VersionId=version["VersionId"], BypassGovernanceRetention=True)
    s3.delete_bucket(Bucket=cfg.output_bucket)


def test_leftovers_are_looked_for_again_while_deletions_take_effect(cloud_state, aws_behaviour):
    """As on AWS, a deleted queue and role can still be found for a while: an immediate
    look reports them; waiting with backoff does not."""
    aws_behaviour(deletion_delay_s=6)
    cfg = make_workbook("fmriwb-eventual")
    delete_all(cfg)
    assert {f["name"] for f in find_leftovers(cfg)} >= {cfg.failure_queue, cfg.role_name}
    started = time.monotonic()
    assert wait_until_gone(cfg, timeout_s=60) == []
    assert time.monotonic() - started >= 3  # it did have to wait


def test_cli_waits_for_deletions_instead_of_reporting_leftovers(cloud_state, aws_behaviour):
    aws_behaviour(deletion_delay_s=6)
    cfg = make_workbook("fmriwb-clidelay")
    done = run_module(cloud_state["state_dir"].parents[1], "helpers.cloud.cleanup",
                      "--workbook-id", cfg.workbook_id)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "still being deleted" in done.stdout and "Nothing is left." in done.stdout


def test_cli_all_lists_every_workbook_then_deletes_it(cloud_state):
    """--all finds workbooks by tag and by name (a bucket never tagged, a log group Lambda
    made), lists them before deleting anything, and leaves nothing."""
    sandbox = cloud_state["state_dir"].parents[1]
    tagged_one = make_workbook("fmriwb-all1", app="def lambda_handler(e, c):\n    return {}\n")
    untagged = Settings(mode="local", workbook_id="fmriwb-all2")
    client("s3").create_bucket(Bucket=untagged.input_bucket)  # crashed before tagging
    client("logs").create_log_group(logGroupName=untagged.log_group)
    done = run_module(sandbox, "helpers.cloud.cleanup", "--all")
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    listing = out[:out.index("Deleting workbook")]
    for cfg in (tagged_one, untagged):
        assert f"  {cfg.workbook_id}:" in listing
        assert f"Deleting workbook {cfg.workbook_id}" in out
        assert find_leftovers(cfg) == []
    assert f"bucket {untagged.input_bucket}" in listing and untagged.log_group in listing
    assert out.rstrip().endswith("Nothing is left.")


def test_cli_does_not_invent_a_workbook(cloud_state):
    """No saved id, none given: an error, not a new id and a false "Nothing is left"."""
    done = run_module(cloud_state["state_dir"].parents[1], "helpers.cloud.cleanup")
    assert done.returncode == 2
    assert "No local workbook id is saved" in done.stderr and "--all" in done.stderr
    assert "Nothing is left" not in done.stdout


def test_the_role_scan_reads_only_the_workbooks_path(cloud_state):
    """Roles elsewhere in the account (however many) are never read, even if tagged."""
    cfg = make_workbook("fmriwb-rolescan", app="def lambda_handler(e, c):\n    return {}\n")
    iam = client("iam")
    for n in range(5):
        iam.create_role(RoleName=f"someone-elses-role-{n}", Tags=tagged(cfg),
                        AssumeRolePolicyDocument=json.dumps(lambda_trust_policy()))
    read = []
    boto3.setup_default_session()
    boto3.DEFAULT_SESSION.events.register(
        "provide-client-params.iam.ListRoleTags", lambda params, **_: read.append(params["RoleName"]))
    try:
        found = find_leftovers(cfg)
    finally:
        boto3.DEFAULT_SESSION = None
    assert read == [cfg.role_name]
    assert ("iam role", cfg.role_name) in {(f["type"], f["name"]) for f in found}
    assert iam.get_role(RoleName=cfg.role_name)["Role"]["Path"] == ROLE_PATH
    delete_all(cfg)
    for n in range(5):
        iam.delete_role(RoleName=f"someone-elses-role-{n}")
