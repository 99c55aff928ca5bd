"""The local Lambda executor runs deployed code faithfully: fresh interpreter, clean
environment, role credentials, timeout, memory limit, CloudWatch-style logs."""
import base64
import json

import pytest

from helpers.cloud.clients import client
from helpers.cloud.logs import invocations, log_events

APP = '''
import json, os, sys, time

def lambda_handler(event, context):
    action = event.get("action")
    print("got", json.dumps(event))
    if action == "raise":
        raise ValueError("bad value in event")
    if action == "sleep":
        time.sleep(event["seconds"])
    if action == "allocate":
        block = bytearray(event["mb"] * 2**20)
        block[::4096] = b"x" * len(block[::4096])  # touch every page: make it resident
    if action == "import":
        __import__(event["module"])
    if action == "whoami":
        import boto3
        return {"arn": boto3.client("sts").get_caller_identity()["Arn"],
                "env": sorted(os.environ), "path": sys.path,
                "remaining_ms": context.get_remaining_time_in_millis(),
                "memory_limit": context.memory_limit_in_mb}
    return {"ok": True, "echo": event}
'''


def invoke(name, event):
    response = client("lambda").invoke(FunctionName=name, Payload=json.dumps(event),
                                       LogType="Tail")
    payload = json.loads(response["Payload"].read())
    log_tail = base64.b64decode(response.get("LogResult", "")).decode()
    return response.get("FunctionError"), payload, log_tail


def test_hook_runs_real_code_not_docker(deploy):
    """If moto's internals change and our hook stops taking effect, this fails loudly."""
    name = deploy({"app.py": APP})
    error, payload, _ = invoke(name, {"action": "echo", "n": 1})
    assert "docker" not in json.dumps(payload).lower(), "moto tried Docker: the executor hook is gone"
    assert error is None
    assert payload == {"ok": True, "echo": {"action": "echo", "n": 1}}


def test_clean_environment_and_role_credentials(deploy, role_arn):
    name = deploy({"app.py": APP}, env={"MY_SETTING": "42"}, timeout=30, memory=256)
    error, payload, _ = invoke(name, {"action": "whoami"})
    assert error is None
    # The function acts as its execution role, through temporary credentials.
    assert ":assumed-role/test-lambda-role/" in payload["arn"]
    assert {"AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN", "MY_SETTING", "LAMBDA_TASK_ROOT",
            "AWS_LAMBDA_FUNCTION_NAME", "AWS_ENDPOINT_URL"} <= set(payload["env"])
    # Nothing leaks from the machine that runs the local cloud.
    assert not {"VIRTUAL_ENV", "WORKBOOK_BUILD_DIR", "PYTEST_CURRENT_TEST"} & set(payload["env"])
    assert not any("site-packages" in p for p in payload["path"])
    assert payload["memory_limit"] == 256
    assert 0 < payload["remaining_ms"] <= 30_000


def test_dependencies_must_be_in_the_zip(deploy):
    """numpy is installed where the local cloud runs, but not in this zip: like on AWS,
    the import fails."""
    name = deploy({"app.py": APP})
    error, payload, _ = invoke(name, {"action": "import", "module": "numpy"})
    assert error is not None
    assert payload["errorType"] == "ModuleNotFoundError"


def test_exception_is_reported_with_traceback(deploy):
    name = deploy({"app.py": APP})
    error, payload, tail = invoke(name, {"action": "raise"})
    assert error == "Handled"  # moto's word for every function error
    assert payload["errorType"] == "ValueError"
    assert payload["errorMessage"] == "bad value in event"
    assert "[ERROR] ValueError: bad value in event" in tail
    assert "Traceback" in tail


def test_timeout_kills_the_run(deploy):
    name = deploy({"app.py": APP}, timeout=1)
    error, payload, tail = invoke(name, {"action": "sleep", "seconds": 30})
    assert error is not None
    assert payload["errorType"] == "Sandbox.Timedout"
    assert "Task timed out after 1.00 seconds" in tail
    record = invocations(log_events(f"/aws/lambda/{name}"))[-1]
    assert record["billed_ms"] == 1000
    assert record["error_type"] == "Sandbox.Timedout"
    assert record["duration_ms"] < 5000  # killed, not left to sleep 30 s


def test_memory_limit_is_enforced(deploy):
    name = deploy({"app.py": APP}, memory=128, timeout=30)
    error, payload, tail = invoke(name, {"action": "allocate", "mb": 400})
    assert payload["errorType"] == "Runtime.OutOfMemory"
    assert "Runtime exited with error: signal: killed" in tail
    record = invocations(log_events(f"/aws/lambda/{name}"))[-1]
    assert record["max_memory_mb"] == 128 == record["memory_mb"]


def test_within_memory_runs_and_reports_usage(deploy):
    name = deploy({"app.py": APP}, memory=512, timeout=30)
    error, _, _ = invoke(name, {"action": "allocate", "mb": 100})
    assert error is None
    record = invocations(log_events(f"/aws/lambda/{name}"))[-1]
    assert 100 <= record["max_memory_mb"] < 512


@pytest.mark.parametrize("source, error_type, message, report_type", [
    ("def lambda_handler(event, context) return 1\n", "Runtime.UserCodeSyntaxError",
     "Syntax error in module 'app'", "Runtime.UserCodeSyntaxError"),
    ("import not_in_the_zip\n", "Runtime.ImportModuleError",
     "Unable to import module 'app': No module named 'not_in_the_zip'",
     "Runtime.ImportModuleError"),
    ("import os\nBUCKET = os.environ['OUTPUT_BUCKET']\n", "KeyError", "'OUTPUT_BUCKET'",
     "Runtime.Unknown"),
], ids=["syntax", "import", "raises-at-import"])
def test_init_errors_are_worded_as_on_aws(deploy, source, error_type, message, report_type):
    """What the AWS Python runtime and the Lambda service write when Init fails."""
    name = deploy({"app.py": source})
    error, payload, tail = invoke(name, {})
    assert error is not None
    assert payload["errorType"] == error_type
    assert payload["errorMessage"].startswith(message)
    assert f"[ERROR] {error_type}: {message}" in tail
    assert f"Phase: invoke\tStatus: error\tError Type: {report_type}" in tail
    record = invocations(log_events(f"/aws/lambda/{name}"))[-1]
    assert record["error_type"] == report_type  # from the REPORT line's Status / Error Type


def test_logs_have_start_end_report(deploy):
    name = deploy({"app.py": APP}, memory=192)
    invoke(name, {"action": "echo"})
    messages = [e["message"] for e in log_events(f"/aws/lambda/{name}")]
    assert messages[0].startswith("START RequestId: ")
    assert any(m.startswith('got {"action": "echo"}') for m in messages)
    assert messages[-2].startswith("END RequestId: ")
    record = invocations(log_events(f"/aws/lambda/{name}"))[-1]
    assert record["memory_mb"] == 192
    assert record["billed_ms"] == pytest.approx(record["duration_ms"], abs=1.0)
    assert record["billed_ms"] >= record["duration_ms"]
