"""The local cloud is closed to other users of the machine: only requests signed with the
workbook's own key, or with credentials the local cloud issued, get in."""
from __future__ import annotations

import json
import os
import ssl
import stat
import subprocess
import sys
import urllib.error
import urllib.request
from datetime import datetime, timedelta, timezone
from pathlib import Path

import boto3
import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from botocore.exceptions import ClientError

from helpers import local_cloud
from helpers.cloud.clients import client
from helpers.local_cloud import auth, control, moto_adapter
from private_cloud import ROOT, cloud_state, run_module, sandbox_env, state_dir

CREDS_APP = '''
import os
def lambda_handler(event, context):
    return {name: os.environ[name] for name in
            ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")}
'''


def _stranger(service, **keys):
    """A client of someone else on the machine: right endpoint and certificate, own keys."""
    keys = keys or {"aws_access_key_id": "AKIAMADEUPMADEUPMADE",
                    "aws_secret_access_key": "made-up"}
    return boto3.client(service, region_name="us-east-1", **keys)


@pytest.mark.parametrize("service, call, kwargs", [
    ("s3", "list_buckets", {}),
    ("iam", "list_roles", {}),
    ("sqs", "list_queues", {}),
    ("lambda", "list_functions", {}),
    ("logs", "describe_log_groups", {}),
])
def test_made_up_credentials_are_refused(cloud, service, call, kwargs):
    with pytest.raises(ClientError) as refused:
        getattr(_stranger(service), call)(**kwargs)
    assert refused.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    assert refused.value.response["Error"]["Code"] in ("InvalidClientTokenId",
                                                       "InvalidAccessKeyId")


def test_the_signature_is_checked_not_just_the_key_id(cloud):
    """The workbook's own key id with a wrong secret: the signature does not match."""
    key = control.own_key()
    client("s3").create_bucket(Bucket="auth-test-bucket")
    stranger = _stranger("s3", aws_access_key_id=key["AWS_ACCESS_KEY_ID"],
                         aws_secret_access_key="guessed")
    with pytest.raises(ClientError) as refused:
        stranger.list_objects_v2(Bucket="auth-test-bucket")
    assert refused.value.response["Error"]["Code"] == "SignatureDoesNotMatch"
    with pytest.raises(ClientError):
        _stranger("lambda", aws_access_key_id=key["AWS_ACCESS_KEY_ID"],
                  aws_secret_access_key="guessed").create_function(
            FunctionName="intruder", Runtime="python3.11", Role="arn:aws:iam::1:role/x",
            Handler="app.h", Code={"ZipFile": b"PK"})


def test_unsigned_admin_requests_are_refused_and_change_nothing(cloud):
    client("s3").create_bucket(Bucket="survives-reset")
    context = ssl.create_default_context(cafile=str(local_cloud.CERT_FILE))
    for path, body in (("/moto-api/reset", b""), (moto_adapter.IAM_ENFORCEMENT_PATH, b"0"),
                       ("/local-cloud/aws-behaviour", b'{"cpu_shares": true}')):
        request = urllib.request.Request(cloud["endpoint"] + path, data=body, method="POST")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, context=context, timeout=5)
        assert refused.value.code == 403
    client("s3").head_bucket(Bucket="survives-reset")  # not wiped
    assert local_cloud.set_aws_behaviour()["cpu_shares"] is False


def test_issued_credentials_get_in_but_not_to_the_admin_api(deploy, role_arn):
    """The function's role session works; so does a key made with IAM's CreateAccessKey.
    Neither may use the administrative API."""
    name = deploy({"app.py": CREDS_APP})
    response = client("lambda").invoke(FunctionName=name, Payload=b"{}")
    role = json.loads(response["Payload"].read())
    as_role = boto3.client("sts", region_name="us-east-1",
                           aws_access_key_id=role["AWS_ACCESS_KEY_ID"],
                           aws_secret_access_key=role["AWS_SECRET_ACCESS_KEY"],
                           aws_session_token=role["AWS_SESSION_TOKEN"])
    assert ":assumed-role/test-lambda-role/" in as_role.get_caller_identity()["Arn"]
    iam = client("iam")
    iam.create_user(UserName="auth-test-user")
    key = iam.create_access_key(UserName="auth-test-user")["AccessKey"]
    as_user = _stranger("s3", aws_access_key_id=key["AccessKeyId"],
                        aws_secret_access_key=key["SecretAccessKey"])
    as_user.list_buckets()
    for creds in (Credentials(role["AWS_ACCESS_KEY_ID"], role["AWS_SECRET_ACCESS_KEY"],
                              role["AWS_SESSION_TOKEN"]),
                  Credentials(key["AccessKeyId"], key["SecretAccessKey"])):
        with pytest.raises(urllib.error.HTTPError) as refused:
            _signed_post(cloud_endpoint(), "/moto-api/reset", creds)
        assert refused.value.code == 403
    # A role session's key without its token is refused.
    with pytest.raises(ClientError):
        _stranger("sts", aws_access_key_id=role["AWS_ACCESS_KEY_ID"],
                  aws_secret_access_key=role["AWS_SECRET_ACCESS_KEY"]).get_caller_identity()


def cloud_endpoint() -> str:
    return local_cloud.find()["endpoint"]


def _signed_post(endpoint, path, creds):
    request = AWSRequest(method="POST", url=endpoint + path, data=b"",
                         headers={"Content-Type": "text/plain"})
    SigV4Auth(creds, "local-cloud", "us-east-1").add_auth(request)
    urllib.request.urlopen(urllib.request.Request(endpoint + path, data=b"", method="POST",
                                                  headers=dict(request.headers.items())),
                           context=ssl.create_default_context(cafile=str(local_cloud.CERT_FILE)),
                           timeout=5)


def test_keys_are_private_files_in_a_private_folder(cloud):
    assert stat.S_IMODE(local_cloud.STATE_DIR.stat().st_mode) == 0o700
    for private in (control.CREDENTIALS_FILE, control.KEY_FILE, control.STATE_FILE):
        assert stat.S_IMODE(private.stat().st_mode) == 0o600, private
    key = control.own_key()
    assert key["AWS_ACCESS_KEY_ID"].startswith("AKIA") and len(key["AWS_ACCESS_KEY_ID"]) == 20
    assert len(key["AWS_SECRET_ACCESS_KEY"]) >= 40
    # This process's clients use it (notebook code calls client("s3") unchanged).
    assert os.environ["AWS_ACCESS_KEY_ID"] == key["AWS_ACCESS_KEY_ID"]
    assert "AWS_SESSION_TOKEN" not in os.environ


def test_the_server_starts_with_a_clean_environment(tmp_path):
    """Secrets exported in the shell that starts the local cloud do not reach it."""
    secrets = {"AWS_ACCESS_KEY_ID": "AKIAREALREALREALREAL", "AWS_SECRET_ACCESS_KEY": "real",
               "AWS_SESSION_TOKEN": "real-token", "GITHUB_TOKEN": "ghp_secret",
               "LOCAL_CLOUD_DELETION_DELAY_S": "3"}
    started = run_module(tmp_path, "helpers.local_cloud", "start", env=secrets, timeout=60)
    try:
        assert started.returncode == 0, started.stderr
        pid = cloud_state(tmp_path)["pid"]
        environ = dict(item.split("=", 1) for item in
                       Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in item)
        assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                    "GITHUB_TOKEN", "VIRTUAL_ENV", "PYTEST_CURRENT_TEST"} & set(environ)
        assert "real" not in "".join(environ.values())
        assert environ["LOCAL_CLOUD_DELETION_DELAY_S"] == "3"  # settings pass through
        assert environ["WORKBOOK_BUILD_DIR"] == str(tmp_path / "build")
        script = ("import json\nfrom helpers.local_cloud import set_aws_behaviour\n"
                  "print(json.dumps(set_aws_behaviour()))")
        shown = subprocess.run([sys.executable, "-c", script], env=sandbox_env(tmp_path),
                               cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert json.loads(shown.stdout)["deletion_delay_s"] == 3.0, shown.stderr
    finally:
        run_module(tmp_path, "helpers.local_cloud", "stop", timeout=60)
    assert not (state_dir(tmp_path) / "state.json").exists()


# ------------------------------------------------------------------------------------------
# The signature check itself (no server)

def _signed(service="sqs", body=b'{"QueueName": "q"}', when=None, secret="s3cr3t"):
    request = AWSRequest(method="POST", url="https://127.0.0.1:4566/path?b=2&a=1",
                         data=body, headers={"Content-Type": "application/x-amz-json-1.0",
                                             "X-Amz-Target": "AmazonSQS.CreateQueue"})
    signer = SigV4Auth(Credentials("AKIAEXAMPLEEXAMPLE12", secret), service, "us-east-1")
    if when is None:
        signer.add_auth(request)
    else:
        request.context["timestamp"] = when.strftime("%Y%m%dT%H%M%SZ")
        signer._modify_request_before_signing(request)
        request.headers["X-Amz-Date"] = request.context["timestamp"]
        canonical = signer.canonical_request(request)
        signature = signer.signature(signer.string_to_sign(request, canonical), request)
        signer._inject_signature_to_request(request, signature)
    sig = auth.Signature.parse(request.headers["Authorization"])
    headers = {name: request.headers.get(name, "127.0.0.1:4566" if name == "host" else "")
               for name in sig.signed_headers}
    return request, sig, headers


def test_verify_accepts_botocores_signature_and_refuses_any_change():
    request, sig, headers = _signed()
    auth.verify("POST", request.url, headers, request.body, "s3cr3t", sig)
    for method, url, changed, body, secret in [
            ("POST", request.url, headers, b'{"QueueName": "other"}', "s3cr3t"),
            ("POST", request.url.replace("a=1", "a=2"), headers, request.body, "s3cr3t"),
            ("POST", request.url, {**headers, "x-amz-target": "AmazonSQS.DeleteQueue"},
             request.body, "s3cr3t"),
            ("PUT", request.url, headers, request.body, "s3cr3t"),
            ("POST", request.url, headers, request.body, "other secret")]:
        with pytest.raises(auth.Denied) as refused:
            auth.verify(method, url, changed, body, secret, sig)
        assert refused.value.code == "SignatureDoesNotMatch"


def test_verify_refuses_an_old_signature():
    request, sig, headers = _signed(when=datetime.now(timezone.utc) - timedelta(minutes=20))
    with pytest.raises(auth.Denied) as refused:
        auth.verify("POST", request.url, headers, request.body, "s3cr3t", sig)
    assert refused.value.code == "RequestTimeTooSkewed"


def test_a_missing_or_foreign_authorization_header_is_refused():
    for header in (None, "", "AWS AKIAEXAMPLE:signature-v2",
                   "AWS4-HMAC-SHA256 Credential=AKIA/20260101/us-east-1/s3"):
        with pytest.raises(auth.Denied):
            auth.Signature.parse(header)
