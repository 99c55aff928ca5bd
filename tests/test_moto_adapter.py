"""Contract tests: one per moto internal that ``helpers/local_cloud/moto_adapter.py`` uses.

They run moto in this process (``mock_aws``), so they are quick and say exactly which hook
a moto upgrade broke. Each restores what it patched.
"""
from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from urllib.parse import unquote_plus

import boto3
import pytest
from moto import mock_aws

from conftest import make_zip
from helpers.cloud.iam import lambda_trust_policy
from helpers.local_cloud import moto_adapter
from helpers.local_cloud.moto_adapter import FunctionView
from pipeline_fixtures import wait_until

REGION = "us-east-1"
ACCOUNT = "123456789012"  # moto's default account
APP = "def lambda_handler(event, context):\n    return event\n"


@pytest.fixture
def aws(monkeypatch):
    """moto in this process, never the session's local cloud; patches undone afterwards."""
    import moto.s3.notifications as notifications
    from moto.awslambda.models import LambdaFunction
    from moto.iam.models import IAMBackend
    from moto.sqs.models import SQSBackend

    for name in ("AWS_ENDPOINT_URL", "AWS_CA_BUNDLE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAIOSFODNN7EXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "contract-tests")
    patched = [(LambdaFunction, "_invoke_lambda"), (LambdaFunction, "invoke"),
               (notifications, "_invoke_awslambda"), (IAMBackend, "delete_role"),
               (SQSBackend, "delete_queue")]
    saved = [(owner, name, owner.__dict__[name]) for owner, name in patched]
    with mock_aws():
        yield
    for owner, name, value in saved:
        setattr(owner, name, value)


def _client(service):
    return boto3.client(service, region_name=REGION)


def _function(**config):
    role = _client("iam").create_role(
        RoleName="contract-role", AssumeRolePolicyDocument=json.dumps(lambda_trust_policy()))
    lam = _client("lambda")
    lam.create_function(FunctionName="contract", Runtime="python3.11",
                        Role=role["Role"]["Arn"], Handler="app.lambda_handler",
                        Code={"ZipFile": make_zip({"app.py": APP})}, **config)
    return lam


def _recorder():
    calls = []

    def on_invoke(fn, event):
        calls.append(("sync", fn, event))
        return json.dumps({"ran": fn.name}), False, "log line"

    def on_event(fn, event, source):
        calls.append((source, fn, event))

    return calls, on_invoke, on_event


def test_install_hooks_routes_invoke_to_our_executor(aws):
    lam = _function()
    calls, on_invoke, on_event = _recorder()
    moto_adapter.install_hooks(on_invoke, on_event)
    answer = lam.invoke(FunctionName="contract", Payload=json.dumps({"n": 1}))
    assert json.loads(answer["Payload"].read()) == {"ran": "contract"}
    queued = lam.invoke(FunctionName="contract", InvocationType="Event",
                        Payload=json.dumps({"n": 2}))
    assert queued["StatusCode"] == 202
    # RequestResponse runs in the request; Event is handed over as an asynchronous event.
    assert [(kind, fn.name, event) for kind, fn, event in calls] == [
        ("sync", "contract", {"n": 1}), ("invoke", "contract", {"n": 2})]
    assert isinstance(calls[0][1], FunctionView)


def test_install_hooks_routes_s3_notifications_to_our_executor(aws):
    lam = _function()
    arn = lam.get_function(FunctionName="contract")["Configuration"]["FunctionArn"]
    calls, on_invoke, on_event = _recorder()
    moto_adapter.install_hooks(on_invoke, on_event)
    s3 = _client("s3")
    s3.create_bucket(Bucket="contract-in")
    s3.put_bucket_notification_configuration(Bucket="contract-in", NotificationConfiguration={
        "LambdaFunctionConfigurations": [{"LambdaFunctionArn": arn,
                                          "Events": ["s3:ObjectCreated:*"]}]})
    s3.put_object(Bucket="contract-in", Key="raw/x.nii.gz", Body=b"x")
    assert [(kind, fn.name) for kind, fn, _ in calls] == [("s3", "contract")]
    record = calls[0][2]["Records"][0]
    assert unquote_plus(record["s3"]["object"]["key"]) == "raw/x.nii.gz"  # moto encodes "/"


def test_function_view_reads_every_setting(aws):
    lam = _function(Timeout=42, MemorySize=384, EphemeralStorage={"Size": 1024},
                    Environment={"Variables": {"A": "1"}})
    lam.put_function_concurrency(FunctionName="contract", ReservedConcurrentExecutions=3)
    lam.put_function_event_invoke_config(
        FunctionName="contract", MaximumRetryAttempts=1, MaximumEventAgeInSeconds=120,
        DestinationConfig={"OnFailure": {"Destination": "arn:aws:sqs:us-east-1:123456789012:q"}})
    from moto.awslambda.utils import get_backend
    fn = FunctionView(get_backend("123456789012", REGION).get_function("contract"))
    assert (fn.name, fn.handler, fn.runtime, fn.version) == (
        "contract", "app.lambda_handler", "python3.11", "$LATEST")
    assert (fn.timeout_s, fn.memory_mb, fn.ephemeral_mb) == (42.0, 384, 1024)
    assert fn.environment == {"A": "1"} and fn.reserved_concurrency == 3
    assert fn.async_config["MaximumRetryAttempts"] == 1
    assert fn.async_config["MaximumEventAgeInSeconds"] == 120
    assert fn.async_config["DestinationConfig"]["OnFailure"]["Destination"].endswith(":q")
    assert fn.role_arn.endswith(":role/contract-role") and fn.account_id == "123456789012"
    assert fn.region == REGION and fn.log_group == "/aws/lambda/contract"
    assert fn.arn.endswith(":function:contract") and len(fn.code_sha256) > 20
    assert fn.code_bytes.startswith(b"PK")


def _view():
    from moto.awslambda.utils import get_backend
    return FunctionView(get_backend("123456789012", REGION).get_function("contract"))


def test_write_log_events_fills_the_functions_log_group(aws):
    _function()
    now = int(time.time() * 1000)
    lines = [(now, "START x"), (now + 5, "REPORT x")]
    moto_adapter.write_log_events(_view(), "2026/01/01/[$LATEST]abc", lines[:1])
    moto_adapter.write_log_events(_view(), "2026/01/01/[$LATEST]abc", lines[1:])  # appended
    events = _client("logs").get_log_events(logGroupName="/aws/lambda/contract",
                                            logStreamName="2026/01/01/[$LATEST]abc",
                                            startFromHead=True)["events"]
    assert [(e["timestamp"], e["message"]) for e in events] == lines


def test_role_credentials_act_as_the_execution_role(aws):
    _function()
    creds = moto_adapter.role_credentials(_view(), session_name="contract")
    sts = boto3.client("sts", region_name=REGION, aws_access_key_id=creds["AWS_ACCESS_KEY_ID"],
                       aws_secret_access_key=creds["AWS_SECRET_ACCESS_KEY"],
                       aws_session_token=creds["AWS_SESSION_TOKEN"])
    assert sts.get_caller_identity()["Arn"].endswith(":assumed-role/contract-role/contract")


def test_issued_secret_knows_user_keys_and_role_sessions_only(aws):
    _function()
    iam = _client("iam")
    iam.create_user(UserName="someone")
    key = iam.create_access_key(UserName="someone")["AccessKey"]
    assert moto_adapter.issued_secret(key["AccessKeyId"]) == (key["SecretAccessKey"], None)
    creds = moto_adapter.role_credentials(_view(), session_name="contract")
    assert moto_adapter.issued_secret(creds["AWS_ACCESS_KEY_ID"]) == (
        creds["AWS_SECRET_ACCESS_KEY"], creds["AWS_SESSION_TOKEN"])
    assert moto_adapter.issued_secret("AKIAMADEUPMADEUPMADE") is None
    iam.update_access_key(UserName="someone", AccessKeyId=key["AccessKeyId"], Status="Inactive")
    assert moto_adapter.issued_secret(key["AccessKeyId"]) is None


def test_send_message_reaches_the_queue(aws):
    sqs = _client("sqs")
    url = sqs.create_queue(QueueName="contract-failures")["QueueUrl"]
    moto_adapter.send_message("arn:aws:sqs:us-east-1:123456789012:contract-failures", "body")
    messages = sqs.receive_message(QueueUrl=url)["Messages"]
    assert [m["Body"] for m in messages] == ["body"]


def test_delay_deletions_keeps_roles_and_queues_visible_for_a_while(aws):
    delay = {"s": 60.0}
    moto_adapter.delay_deletions(lambda: delay["s"])
    iam, sqs = _client("iam"), _client("sqs")
    iam.create_role(RoleName="ghost", AssumeRolePolicyDocument=json.dumps(lambda_trust_policy()))
    url = sqs.create_queue(QueueName="ghost")["QueueUrl"]
    iam.delete_role(RoleName="ghost")
    sqs.delete_queue(QueueUrl=url)
    assert iam.get_role(RoleName="ghost")["Role"]["RoleName"] == "ghost"
    assert sqs.get_queue_url(QueueName="ghost")["QueueUrl"] == url
    # moto's own checks still apply at once ...
    iam.create_role(RoleName="busy", AssumeRolePolicyDocument=json.dumps(lambda_trust_policy()))
    iam.put_role_policy(RoleName="busy", PolicyName="p", PolicyDocument=json.dumps(
        {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*",
                                                 "Resource": "*"}]}))
    with pytest.raises(iam.exceptions.DeleteConflictException):
        iam.delete_role(RoleName="busy")
    # ... and with a short delay the deleted ones really go.
    delay["s"] = 0.2
    iam.create_role(RoleName="brief", AssumeRolePolicyDocument=json.dumps(lambda_trust_policy()))
    iam.delete_role(RoleName="brief")
    assert wait_until(lambda: "brief" not in {r["RoleName"] for r in iam.list_roles()["Roles"]},
                      timeout=10)


def test_moto_app_health_and_iam_enforcement_paths(aws):
    from werkzeug.test import Client

    app = Client(moto_adapter.moto_app())
    assert app.get(moto_adapter.HEALTH_PATH).status_code in (200, 201)
    from moto import settings
    before = settings.INITIAL_NO_AUTH_ACTION_COUNT
    try:
        app.post(moto_adapter.IAM_ENFORCEMENT_PATH, data=b"0",
                 headers={"Content-Type": "text/plain"})
        assert settings.INITIAL_NO_AUTH_ACTION_COUNT == 0
    finally:
        app.post(moto_adapter.IAM_ENFORCEMENT_PATH, data=str(before).encode(),
                 headers={"Content-Type": "text/plain"})
    assert moto_adapter.ADMIN_PREFIX and moto_adapter.HEALTH_PATH.startswith(
        moto_adapter.ADMIN_PREFIX)


def test_serve_answers_over_https(tmp_path):
    """``serve`` runs a WSGI app (ours in front of moto's) over HTTPS with our certificate."""
    from helpers.local_cloud import control

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    control_files = {"CERT_FILE": cert, "KEY_FILE": key}
    script = (
        "import sys\n"
        "from helpers.local_cloud import moto_adapter\n"
        "def app(environ, start):\n"
        "    start('200 OK', [('Content-Type', 'text/plain')])\n"
        "    return [environ['PATH_INFO'].encode()]\n"
        "moto_adapter.serve('127.0.0.1', int(sys.argv[1]), app, cert=sys.argv[2], key=sys.argv[3])\n")
    _make_certificate(control, control_files)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-c", script, str(port), str(cert), str(key)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        context = ssl.create_default_context(cafile=str(cert))
        got = {}

        def answered():
            try:
                with urllib.request.urlopen(f"https://127.0.0.1:{port}/hello", timeout=2,
                                            context=context) as response:
                    got["body"] = response.read()
                    return True
            except OSError:
                return False

        assert wait_until(answered, timeout=30, poll=0.1)
        assert got["body"] == b"/hello"
    finally:
        server.kill()
        server.wait()


def _make_certificate(control, files):
    """The local cloud's own certificate code, writing into a temporary folder."""
    saved = {name: getattr(control, name) for name in files}
    try:
        for name, path in files.items():
            setattr(control, name, path)
        control._ensure_certificate()
    finally:
        for name, value in saved.items():
            setattr(control, name, value)


def test_keep_s3_objects_on_disk_spills_object_bytes_beyond_the_buffer(aws, monkeypatch):
    """moto's key buffer honours the setting: a 1 MB object is on disk, not in memory."""
    from moto.s3.models import s3_backends

    monkeypatch.delenv("MOTO_S3_DEFAULT_KEY_BUFFER_SIZE", raising=False)
    moto_adapter.keep_s3_objects_on_disk(64 * 1024)
    s3 = _client("s3")
    s3.create_bucket(Bucket="spill")
    s3.put_object(Bucket="spill", Key="big", Body=os.urandom(2**20))
    s3.put_object(Bucket="spill", Key="small", Body=b"x" * 1000)
    bucket = s3_backends[ACCOUNT]["aws"].buckets["spill"]
    assert bucket.keys["big"]._value_buffer._rolled  # spilled to a temporary file
    assert not bucket.keys["small"]._value_buffer._rolled
    assert s3.get_object(Bucket="spill", Key="big")["ContentLength"] == 2**20
