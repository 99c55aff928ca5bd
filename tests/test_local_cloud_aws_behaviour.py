"""AWS behaviour the local cloud shows on request (``set_aws_behaviour``), where the
workbook's code depends on it: event age, retry delays, eventual consistency after
deletion, Init errors retried, CPU in proportion to memory, a limited /tmp."""
from __future__ import annotations

import json
import statistics
import uuid

import pytest
from botocore.exceptions import ClientError

from conftest import make_zip
from helpers import local_cloud
from helpers.cloud.clients import client
from helpers.cloud.iam import lambda_trust_policy
from helpers.cloud.logs import invocations, log_events
from pipeline_fixtures import wait_until

DEFAULTS = {"async_time_scale": None, "deletion_delay_s": 0, "cpu_shares": False,
            "ephemeral_storage": False}

APP = '''
import os, tempfile, time

def lambda_handler(event, context):
    if event.get("fail"):
        raise RuntimeError("failing on purpose")
    time.sleep(event.get("sleep", 0))
    if "write_mb" in event:
        chunk = b"x" * 2**20
        with open(os.path.join(tempfile.gettempdir(), "big"), "wb") as f:
            for _ in range(event["write_mb"]):
                f.write(chunk)
                f.flush()
    if "spin" in event:  # CPU-bound, single-threaded
        started = time.perf_counter()
        total = 0
        for i in range(event["spin"]):
            total += i * i
        return {"wall_s": time.perf_counter() - started}
    return {"ok": True}
'''


@pytest.fixture
def aws_behaviour(cloud):
    """Change the session's local cloud's settings for one test; the defaults afterwards."""
    yield local_cloud.set_aws_behaviour
    assert local_cloud.set_aws_behaviour(**DEFAULTS) == {**DEFAULTS, "deletion_delay_s": 0.0}


@pytest.fixture
def async_function(cloud, role_arn, request):
    """A function with an on-failure queue: ``make(files, retries, max_age, concurrency)``."""
    lam, sqs = client("lambda"), client("sqs")
    made = []

    def make(files=None, *, retries=0, max_age=None, concurrency=None, memory=128, **extra):
        name = f"aws-{request.node.originalname[5:30]}-{uuid.uuid4().hex[:8]}"
        queue = sqs.create_queue(QueueName=f"{name}-failures")["QueueUrl"]
        arn = sqs.get_queue_attributes(QueueUrl=queue, AttributeNames=["QueueArn"])
        lam.create_function(FunctionName=name, Runtime="python3.11", Role=role_arn,
                            Handler="app.lambda_handler", Timeout=60, MemorySize=memory,
                            Code={"ZipFile": make_zip(files or {"app.py": APP})}, **extra)
        config = {"MaximumRetryAttempts": retries, "DestinationConfig": {
            "OnFailure": {"Destination": arn["Attributes"]["QueueArn"]}}}
        if max_age is not None:
            config["MaximumEventAgeInSeconds"] = max_age
        lam.put_function_event_invoke_config(FunctionName=name, **config)
        if concurrency is not None:
            lam.put_function_concurrency(FunctionName=name,
                                         ReservedConcurrentExecutions=concurrency)
        made.append(name)
        return name, queue

    yield make
    for name in made:
        lam.delete_function(FunctionName=name)


def _send(name, event):
    client("lambda").invoke(FunctionName=name, InvocationType="Event", Payload=json.dumps(event))


def _failures(queue, count, timeout=60):
    got = []

    def enough():
        for message in client("sqs").receive_message(QueueUrl=queue, MaxNumberOfMessages=10,
                                                     WaitTimeSeconds=1).get("Messages", []):
            got.append(json.loads(message["Body"]))
        return len(got) >= count

    assert wait_until(enough, timeout=timeout), got
    return got


def _runs(name, count, timeout=60):
    assert wait_until(lambda: len(invocations(log_events(f"/aws/lambda/{name}"))) >= count,
                      timeout=timeout)
    return invocations(log_events(f"/aws/lambda/{name}"))


# ------------------------------------------------------------------------------------------
# MaximumEventAgeInSeconds and retry delays (AWS's asynchronous clock, scaled)


def test_an_event_too_old_in_the_throttle_queue_is_dropped(aws_behaviour, async_function):
    aws_behaviour(async_time_scale=0.01)  # a minute lasts 0.6 s
    name, queue = async_function(max_age=60, concurrency=1)
    _send(name, {"sleep": 3})  # holds the only slot for 3 s (= 5 "minutes")
    _send(name, {"n": 2})      # waits longer than its maximum age (1 "minute")
    [failure] = _failures(queue, 1)
    assert failure["requestContext"]["condition"] == "EventAgeExceeded"
    assert failure["requestContext"]["approximateInvokeCount"] == 0
    assert failure["requestPayload"] == {"n": 2}
    runs = _runs(name, 1)
    assert len(runs) == 1 and runs[0]["error"] is None  # the old event never ran


def test_an_event_too_old_to_retry_is_dropped(aws_behaviour, async_function):
    aws_behaviour(async_time_scale=0.01)  # first retry after 0.6 s, maximum age 0.6 s
    name, queue = async_function(retries=2, max_age=60)
    _send(name, {"fail": True})
    [failure] = _failures(queue, 1)
    assert failure["requestContext"]["condition"] == "EventAgeExceeded"
    assert failure["requestContext"]["approximateInvokeCount"] == 1
    assert failure["responsePayload"]["errorType"] == "RuntimeError"
    assert len(_runs(name, 1)) == 1


@pytest.mark.slow
def test_retries_wait_as_on_aws_scaled(aws_behaviour, async_function):
    scale = 0.02  # AWS's 60 s and 120 s become 1.2 s and 2.4 s
    assert aws_behaviour(async_time_scale=scale)["async_time_scale"] == scale
    name, queue = async_function(retries=2)
    _send(name, {"fail": True})
    [failure] = _failures(queue, 1)
    assert failure["requestContext"]["condition"] == "RetriesExhausted"
    assert failure["requestContext"]["approximateInvokeCount"] == 3
    runs = _runs(name, 3)
    waits = [(b["start_ms"] - a["end_ms"]) / 1000 for a, b in zip(runs, runs[1:])]
    assert waits[0] >= 60 * scale - 0.05 and waits[1] >= 120 * scale - 0.05, waits
    print(f"\nwaits between attempts: {waits} s (AWS: 60 and 120 s, scaled by {scale})")


# ------------------------------------------------------------------------------------------
# Init errors: retried and sent to the failure destination, AWS's wording


@pytest.mark.parametrize("source, error_type, report_type", [
    ("import not_in_the_zip\n", "Runtime.ImportModuleError", "Runtime.ImportModuleError"),
    ("import os\nBUCKET = os.environ['OUTPUT_BUCKET']\n", "KeyError", "Runtime.Unknown"),
], ids=["import-error", "missing-variable"])
def test_init_errors_are_retried_then_sent_to_the_failure_destination(
        aws_behaviour, async_function, source, error_type, report_type):
    aws_behaviour(async_time_scale=0.005)  # retries after 0.3 s
    name, queue = async_function({"app.py": source}, retries=1)
    _send(name, {"Records": []})
    [failure] = _failures(queue, 1)
    assert failure["requestContext"]["condition"] == "RetriesExhausted"
    assert failure["requestContext"]["approximateInvokeCount"] == 2
    assert failure["responsePayload"]["errorType"] == error_type
    runs = _runs(name, 2)
    assert [r["error_type"] for r in runs] == [report_type] * 2
    messages = [e["message"] for e in log_events(f"/aws/lambda/{name}")]
    assert sum(m.startswith(f"[ERROR] {error_type}: ") for m in messages) == 2
    assert sum(m.startswith("INIT_REPORT Init Duration: ") and
               m.endswith(f"Status: error\tError Type: {report_type}") for m in messages) == 2
    assert sum(m.startswith("REPORT RequestId: ") for m in messages) == 2


# ------------------------------------------------------------------------------------------
# Eventual consistency after deletion


def test_deleted_queue_and_role_are_still_found_for_a_while(aws_behaviour):
    iam, sqs = client("iam"), client("sqs")
    tag = uuid.uuid4().hex[:8]

    def make(suffix):
        iam.create_role(RoleName=f"ghost-{tag}-{suffix}",
                        AssumeRolePolicyDocument=json.dumps(lambda_trust_policy()))
        return sqs.create_queue(QueueName=f"ghost-{tag}-{suffix}")["QueueUrl"]

    aws_behaviour(deletion_delay_s=60)
    url = make("long")
    iam.delete_role(RoleName=f"ghost-{tag}-long")
    sqs.delete_queue(QueueUrl=url)
    assert iam.get_role(RoleName=f"ghost-{tag}-long")["Role"]["RoleName"].endswith("-long")
    assert sqs.get_queue_url(QueueName=f"ghost-{tag}-long")["QueueUrl"] == url
    aws_behaviour(deletion_delay_s=0.5)
    url = make("short")
    iam.delete_role(RoleName=f"ghost-{tag}-short")
    sqs.delete_queue(QueueUrl=url)

    def gone():
        try:
            sqs.get_queue_url(QueueName=f"ghost-{tag}-short")
            iam.get_role(RoleName=f"ghost-{tag}-short")
        except ClientError:
            return True
        return False

    assert wait_until(gone, timeout=20)
    with pytest.raises(ClientError):
        iam.get_role(RoleName=f"ghost-{tag}-short")
    with pytest.raises(ClientError):
        sqs.get_queue_url(QueueName=f"ghost-{tag}-short")


# ------------------------------------------------------------------------------------------
# CPU in proportion to memory


@pytest.mark.slow
def test_cpu_share_follows_memory(aws_behaviour, async_function):
    """Below 1,769 MB a CPU-bound run's duration scales about inversely with memory, so
    GB-seconds stay about flat (measured against each other in the same run)."""
    aws_behaviour(cpu_shares=True)
    small, _ = async_function(memory=256)
    large, _ = async_function(memory=1024)
    walls = {small: [], large: []}
    for name in (small, large, small, large):
        response = client("lambda").invoke(FunctionName=name,
                                           Payload=json.dumps({"spin": 3_000_000}))
        walls[name].append(json.loads(response["Payload"].read())["wall_s"])
    wall = {name: statistics.median(values) for name, values in walls.items()}
    ratio = wall[small] / wall[large]
    gb_s = (0.25 * wall[small]) / (1.0 * wall[large])
    print(f"\nCPU-bound work: {wall[small]:.2f} s at 256 MB, {wall[large]:.2f} s at 1024 MB: "
          f"ratio {ratio:.2f} (Lambda: 4.0); GB-s ratio {gb_s:.2f} (Lambda: 1.0)")
    # Without CPU shares the ratio is about 1. A busy machine squeezes the larger share more
    # (measured: 4.8 on a quiet machine, 2.5-3.1 while other work ran), hence the margins.
    assert 2.0 < ratio < 6.0
    assert 0.5 < gb_s < 1.5
    reports = {name: [r["duration_ms"] for r in invocations(log_events(f"/aws/lambda/{name}"))]
               for name in walls}
    # The REPORT lines show it too (their Duration also holds the interpreter's start).
    assert min(reports[small]) > max(reports[large])


# ------------------------------------------------------------------------------------------
# Ephemeral storage


@pytest.mark.slow
def test_tmp_is_limited_to_the_functions_ephemeral_storage(aws_behaviour, async_function):
    aws_behaviour(ephemeral_storage=True)
    name, _ = async_function(EphemeralStorage={"Size": 512})
    lam = client("lambda")
    fits = lam.invoke(FunctionName=name, Payload=json.dumps({"write_mb": 100}))
    assert "FunctionError" not in fits, fits["Payload"].read()
    too_much = lam.invoke(FunctionName=name, Payload=json.dumps({"write_mb": 700}))
    payload = json.loads(too_much["Payload"].read())
    assert payload["errorType"] == "Runtime.ExitError"
    assert "ephemeral storage exhausted" in payload["errorMessage"]
    messages = [e["message"] for e in log_events(f"/aws/lambda/{name}")]
    [line] = [m for m in messages if "ephemeral storage exhausted" in m]
    assert "more than the function's EphemeralStorage of 512 MB" in line
    assert "No space left on device" in line
    report = invocations(log_events(f"/aws/lambda/{name}"))[-1]
    assert report["error_type"] == "Runtime.ExitError"
