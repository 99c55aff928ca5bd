"""S3 notifications invoke the function asynchronously, filtered by prefix and suffix,
within its reserved concurrency; failures are retried, then sent to the failure queue."""
import json
import time
from urllib.parse import unquote_plus

import pytest

from helpers.cloud.clients import client
from helpers.cloud.logs import invocations, log_events, peak_concurrency
from pipeline_fixtures import wait_until

pytestmark = pytest.mark.slow  # the local cloud (see pyproject's markers)

APP = '''
import json, os, time, boto3
from urllib.parse import unquote_plus

def lambda_handler(event, context):
    s3 = boto3.client("s3")
    for record in event["Records"]:
        key = unquote_plus(record["s3"]["object"]["key"])
        print(json.dumps({"message": "start", "key": key}))
        time.sleep(float(os.environ.get("SLEEP", "0")))
        if "fail" in key:
            raise RuntimeError("cannot process " + key)
        s3.put_object(Bucket=os.environ["OUT"], Key="done/" + key, Body=b"ok")
'''


@pytest.fixture
def wired(deploy, request):
    """An input bucket whose raw/*.nii.gz uploads trigger a function writing to an output bucket."""
    s3, lam = client("s3"), client("lambda")
    tag = request.node.name[5:25].replace("_", "-").lower()
    inp, out = f"in-{tag}", f"out-{tag}"
    for bucket in (inp, out):
        s3.create_bucket(Bucket=bucket)

    def _wire(*, sleep=0.0, concurrency=None, retries=None, destination=None):
        name = deploy({"app.py": APP}, env={"OUT": out, "SLEEP": str(sleep)}, timeout=30)
        arn = lam.get_function_configuration(FunctionName=name)["FunctionArn"]
        if concurrency:
            lam.put_function_concurrency(FunctionName=name, ReservedConcurrentExecutions=concurrency)
        if retries is not None:
            config = {"OnFailure": {"Destination": destination}} if destination else {}
            lam.put_function_event_invoke_config(FunctionName=name, MaximumRetryAttempts=retries,
                                                 DestinationConfig=config)
        s3.put_bucket_notification_configuration(Bucket=inp, NotificationConfiguration={
            "LambdaFunctionConfigurations": [{
                "LambdaFunctionArn": arn, "Events": ["s3:ObjectCreated:*"],
                "Filter": {"Key": {"FilterRules": [{"Name": "prefix", "Value": "raw/"},
                                                   {"Name": "suffix", "Value": ".nii.gz"}]}}}]})
        return name, inp, out

    return _wire


def done_keys(bucket):
    return {o["Key"] for o in client("s3").list_objects_v2(Bucket=bucket).get("Contents", [])}


def test_matching_upload_runs_in_background(wired):
    name, inp, out = wired(sleep=1.5)
    client("s3").put_object(Bucket=inp, Key="raw/sub 01 é_bold.nii.gz", Body=b"data")
    # The upload returned before the function (which sleeps 1.5 s) finished: asynchronous.
    assert done_keys(out) == set()
    assert wait_until(lambda: done_keys(out) == {"done/raw/sub 01 é_bold.nii.gz"})


def test_multipart_upload_runs_once(wired, tmp_path):
    """AWS sends one event per multipart upload (moto sends two; the executor drops one)."""
    from boto3.s3.transfer import TransferConfig

    name, inp, out = wired()
    path = tmp_path / "big_bold.nii.gz"
    path.write_bytes(b"\0" * (6 * 2**20))
    client("s3").upload_file(str(path), inp, "raw/big_bold.nii.gz", Config=TransferConfig(
        multipart_threshold=5 * 2**20, multipart_chunksize=5 * 2**20))
    assert wait_until(lambda: done_keys(out) == {"done/raw/big_bold.nii.gz"})
    time.sleep(1.0)  # room for a second, wrong invocation to show up
    records = invocations(log_events(f"/aws/lambda/{name}"))
    assert len(records) == 1


def test_filters_keep_other_keys_out(wired):
    name, inp, out = wired()
    s3 = client("s3")
    s3.put_object(Bucket=inp, Key="raw/notes.txt", Body=b"x")          # wrong suffix
    s3.put_object(Bucket=inp, Key="other/sub-02.nii.gz", Body=b"x")    # wrong prefix
    s3.put_object(Bucket=inp, Key="raw/sub-03.nii.gz", Body=b"x")      # matches
    assert wait_until(lambda: done_keys(out) == {"done/raw/sub-03.nii.gz"})
    time.sleep(1.0)  # give any wrongly triggered run the time to show up
    keys = {r["key"] for r in invocations(log_events(f"/aws/lambda/{name}"))}
    assert keys == {"raw/sub-03.nii.gz"}


def test_reserved_concurrency_caps_parallel_runs(wired):
    name, inp, out = wired(sleep=1.0, concurrency=2)
    s3 = client("s3")
    for i in range(6):
        s3.put_object(Bucket=inp, Key=f"raw/sub-{i:02d}.nii.gz", Body=b"x")
    assert wait_until(lambda: len(done_keys(out)) == 6, timeout=60)
    # Logs land just after a run ends, as on AWS.
    records = lambda: invocations(log_events(f"/aws/lambda/{name}"))  # noqa: E731
    assert wait_until(lambda: len(records()) == 6)
    assert peak_concurrency(records()) == 2


def test_failure_is_retried_then_sent_to_destination(wired):
    sqs = client("sqs")
    url = sqs.create_queue(QueueName="test-failures")["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    name, inp, out = wired(retries=1, destination=arn)
    client("s3").put_object(Bucket=inp, Key="raw/fail_bold.nii.gz", Body=b"x")
    messages = []
    assert wait_until(lambda: messages.extend(
        sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10).get("Messages", [])) or messages)
    record = json.loads(messages[0]["Body"])
    assert record["requestContext"]["condition"] == "RetriesExhausted"
    assert record["requestContext"]["approximateInvokeCount"] == 2
    assert record["responsePayload"]["errorType"] == "RuntimeError"
    key = record["requestPayload"]["Records"][0]["s3"]["object"]["key"]
    assert unquote_plus(key) == "raw/fail_bold.nii.gz"  # event keys are URL-encoded
    # First try + one retry; nothing more.
    assert len(invocations(log_events(f"/aws/lambda/{name}"))) == 2
