"""Least privilege, proven with the local cloud's IAM enforcement on.

The execution role is made as notebook 01 makes it. A small probe function runs *as that
role*: the local cloud's Lambda executor hands it the role's own temporary credentials, as
the Lambda service does. The probe tries each action and reports whether it was allowed.
This is a local cloud of the module's own (enforcement is global to a server).
"""
import json
from pathlib import Path

import pytest

from helpers import local_cloud
from helpers.cloud.clients import client
from helpers.cloud.iam import execution_policy, lambda_trust_policy
from helpers.cloud.settings import Settings
from conftest import make_zip
from private_cloud import private_cloud

pytestmark = pytest.mark.slow  # the local cloud (see pyproject's markers)

CFG = Settings(mode="local", workbook_id="fmriwb-iamtest")
OTHER_BUCKET = "fmriwb-someone-elses-data"
OTHER_QUEUE = "fmriwb-someone-elses-queue"
IN, OUT = CFG.input_bucket, CFG.output_bucket
RAW, DERIV = CFG.input_prefix, CFG.output_prefix
PROBE = '''
import boto3
from botocore.exceptions import ClientError

def lambda_handler(event, context):
    """Try each call with this function's (the role's) credentials."""
    outcomes = {"caller": boto3.client("sts").get_caller_identity()["Arn"]}
    for name, (service, operation, args) in event.items():
        try:
            getattr(boto3.client(service), operation)(**args)
            outcomes[name] = "allowed"
        except ClientError as exc:
            # Some services' denials reach botocore as "403" with AWS's XML in the message.
            error = f"{exc.response['Error'].get('Code')} {exc.response['Error'].get('Message')}"
            outcomes[name] = "denied" if "AccessDenied" in error else error[:300]
    return outcomes
'''
EVERYTHING = json.dumps({"Version": "2012-10-17",
                         "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]})

# What the role tries: {name: (service, boto3 operation, arguments)}.
ALLOWED = {
    "s3:GetObject input bucket, input prefix":
        ("s3", "get_object", {"Bucket": IN, "Key": f"{RAW}sub-01_bold.nii.gz"}),
    "s3:GetObject (HeadObject) input bucket, input prefix":
        ("s3", "head_object", {"Bucket": IN, "Key": f"{RAW}sub-01_bold.nii.gz"}),
    "s3:PutObject output bucket, output prefix":
        ("s3", "put_object", {"Bucket": OUT, "Key": f"{DERIV}sub-01_done.json", "Body": "{}"}),
    "s3:DeleteObject output bucket, output prefix (a stale record)":
        ("s3", "delete_object", {"Bucket": OUT, "Key": f"{DERIV}stale_error.json"}),
    "sqs:SendMessage own failure queue":
        ("sqs", "send_message", {"QueueUrl": CFG.failure_queue, "MessageBody": "x"}),
}
DENIED = {
    "s3:PutObject input bucket (would re-trigger)":
        ("s3", "put_object", {"Bucket": IN, "Key": f"{RAW}sub-99_bold.nii.gz", "Body": "x"}),
    "s3:GetObject input bucket, outside input prefix":
        ("s3", "get_object", {"Bucket": IN, "Key": "notes/readme.txt"}),
    "s3:GetObject input bucket, prefix lookalike 'raw-old/'":
        ("s3", "get_object", {"Bucket": IN, "Key": "raw-old/sub-01_bold.nii.gz"}),
    "s3:GetObject output bucket":
        ("s3", "get_object", {"Bucket": OUT, "Key": f"{DERIV}existing.json"}),
    "s3:PutObject output bucket, outside output prefix":
        ("s3", "put_object", {"Bucket": OUT, "Key": "elsewhere/x.json", "Body": "x"}),
    "s3:GetObject another bucket":
        ("s3", "get_object", {"Bucket": OTHER_BUCKET, "Key": f"{RAW}sub-01_bold.nii.gz"}),
    "s3:PutObject another bucket":
        ("s3", "put_object", {"Bucket": OTHER_BUCKET, "Key": f"{DERIV}x.json", "Body": "x"}),
    "s3:ListBucket input bucket": ("s3", "list_objects_v2", {"Bucket": IN}),
    "s3:ListBucket output bucket": ("s3", "list_objects_v2", {"Bucket": OUT}),
    "s3:ListAllMyBuckets": ("s3", "list_buckets", {}),
    "s3:DeleteObject input bucket":
        ("s3", "delete_object", {"Bucket": IN, "Key": f"{RAW}sub-01_bold.nii.gz"}),
    "s3:DeleteObject output bucket, outside the output prefix":
        ("s3", "delete_object", {"Bucket": OUT, "Key": "notes/existing.json"}),
    "s3:PutBucketPolicy input bucket (e.g. make it public)":
        ("s3", "put_bucket_policy", {"Bucket": IN, "Policy": json.dumps({
            "Version": "2012-10-17", "Statement": [{
                "Effect": "Allow", "Principal": "*", "Action": "s3:GetObject",
                "Resource": f"arn:aws:s3:::{IN}/*"}]})}),
    "s3:DeleteBucket output bucket": ("s3", "delete_bucket", {"Bucket": OUT}),
    "sqs:SendMessage another queue":
        ("sqs", "send_message", {"QueueUrl": OTHER_QUEUE, "MessageBody": "x"}),
    "sqs:ReceiveMessage own failure queue":
        ("sqs", "receive_message", {"QueueUrl": CFG.failure_queue}),
    "sqs:DeleteQueue own failure queue": ("sqs", "delete_queue", {"QueueUrl": CFG.failure_queue}),
    "iam:PutRolePolicy own role (escalation)":
        ("iam", "put_role_policy", {"RoleName": CFG.role_name, "PolicyName": "more",
                                    "PolicyDocument": EVERYTHING}),
    "iam:ListRoles": ("iam", "list_roles", {}),
    "logs:DeleteLogGroup own log group": ("logs", "delete_log_group",
                                          {"logGroupName": CFG.log_group}),
}


@pytest.fixture(scope="module")
def account(tmp_path_factory):
    """Buckets, objects, role and queue as notebooks 01-02 make them; enforcement on.

    Returns the admin's credentials (an IAM user allowed everything), for the checks that
    the denied objects exist.
    """
    with private_cloud(tmp_path_factory.mktemp("iam")) as state:
        s3, iam, sqs, lam = (client(s) for s in ("s3", "iam", "sqs", "lambda"))
        account_id = client("sts").get_caller_identity()["Account"]
        for bucket in (IN, OUT, OTHER_BUCKET):
            s3.create_bucket(Bucket=bucket)
        for bucket, key in [(IN, f"{RAW}sub-01_bold.nii.gz"), (IN, "notes/readme.txt"),
                            (IN, "raw-old/sub-01_bold.nii.gz"), (OUT, f"{DERIV}existing.json"),
                            (OUT, "notes/existing.json"), (OUT, f"{DERIV}stale_error.json"),
                            (OTHER_BUCKET, f"{RAW}sub-01_bold.nii.gz")]:
            s3.put_object(Bucket=bucket, Key=key, Body=b"data")
        for queue in (CFG.failure_queue, OTHER_QUEUE):
            sqs.create_queue(QueueName=queue)
        role = iam.create_role(RoleName=CFG.role_name,
                               AssumeRolePolicyDocument=json.dumps(lambda_trust_policy()),
                               Tags=[{"Key": k, "Value": v} for k, v in CFG.tags.items()])
        iam.put_role_policy(RoleName=CFG.role_name, PolicyName=CFG.policy_name,
                            PolicyDocument=json.dumps(execution_policy(CFG, account_id)))
        lam.create_function(FunctionName="probe", Runtime="python3.11",
                            Handler="app.lambda_handler", Role=role["Role"]["Arn"],
                            Code={"ZipFile": make_zip({"app.py": PROBE})}, Timeout=60,
                            MemorySize=256)
        iam.create_user(UserName="admin")
        iam.put_user_policy(UserName="admin", PolicyName="everything", PolicyDocument=EVERYTHING)
        key = iam.create_access_key(UserName="admin")["AccessKey"]
        admin = {"aws_access_key_id": key["AccessKeyId"],
                 "aws_secret_access_key": key["SecretAccessKey"], "aws_session_token": None}
        local_cloud.set_iam_enforcement(state["endpoint"], ca_bundle=Path(state["ca_bundle"]))
        yield admin


@pytest.fixture(scope="module")
def outcomes(account):
    """Run every probe once, as the execution role."""
    probes = {**ALLOWED, **DENIED}
    response = client("lambda", **account).invoke(FunctionName="probe",
                                                  Payload=json.dumps(probes))
    payload = json.loads(response["Payload"].read())
    assert "FunctionError" not in response, payload
    return payload


def test_enforcement_is_on(account):
    s3 = client("s3")  # the local cloud's dummy credentials belong to no one
    with pytest.raises(s3.exceptions.ClientError, match="InvalidAccessKeyId"):
        s3.list_buckets()


def test_probe_runs_as_the_execution_role(outcomes):
    assert f":assumed-role/{CFG.role_name}/probe" in outcomes["caller"]


@pytest.mark.parametrize("action", ALLOWED)
def test_allowed(outcomes, action):
    assert outcomes[action] == "allowed"


@pytest.mark.parametrize("action", DENIED)
def test_denied(outcomes, action):
    assert outcomes[action] == "denied"


# Not checked here: the role's own logs grant. moto checks logs actions only against
# Resource "*", so the correctly scoped grant is denied locally (docs/setup_guide.md).


def test_the_effects_are_as_reported(outcomes, account):
    """Seen by an admin: the allowed write landed, denied writes did not, every object the
    role was refused exists (a denial, not a missing key), nothing was deleted."""
    s3 = client("s3", **account)
    assert s3.head_object(Bucket=OUT, Key=f"{DERIV}sub-01_done.json")
    with pytest.raises(s3.exceptions.ClientError, match="404"):  # the allowed delete happened
        s3.head_object(Bucket=OUT, Key=f"{DERIV}stale_error.json")
    for service, operation, args in DENIED.values():
        if service == "s3" and operation in ("get_object", "delete_object", "head_object"):
            assert s3.head_object(Bucket=args["Bucket"], Key=args["Key"])
        elif service == "s3" and operation == "put_object":
            with pytest.raises(s3.exceptions.ClientError, match="404"):
                s3.head_object(Bucket=args["Bucket"], Key=args["Key"])
    assert s3.head_bucket(Bucket=OUT)
    with pytest.raises(s3.exceptions.ClientError, match="NoSuchBucketPolicy"):
        s3.get_bucket_policy(Bucket=IN)
    iam = client("iam", **account)
    assert iam.list_role_policies(RoleName=CFG.role_name)["PolicyNames"] == [CFG.policy_name]


def test_policy_document_has_no_wildcards():
    policy = execution_policy(CFG, "123456789012")
    statements = policy["Statement"]
    assert all(s["Effect"] == "Allow" for s in statements)
    actions = [a for s in statements for a in ([s["Action"]] if isinstance(s["Action"], str)
                                               else s["Action"])]
    assert not [a for a in actions if "*" in a]
    assert sorted(actions) == ["logs:CreateLogGroup", "logs:CreateLogStream",
                               "logs:PutLogEvents", "s3:DeleteObject", "s3:GetObject",
                               "s3:PutObject", "sqs:SendMessage"]
    resources = [r for s in statements for r in ([s["Resource"]] if isinstance(s["Resource"], str)
                                                 else s["Resource"])]
    assert "*" not in resources
    s3_resources = {r for r in resources if r.startswith("arn:aws:s3:::")}
    assert s3_resources == {f"arn:aws:s3:::{IN}/{RAW}*", f"arn:aws:s3:::{OUT}/{DERIV}*"}
    assert all(":123456789012:" in r for r in resources if not r.startswith("arn:aws:s3:::"))
    assert all(CFG.workbook_id in r for r in resources)


def test_trust_policy_names_only_lambda():
    (statement,) = lambda_trust_policy()["Statement"]
    assert statement == {"Effect": "Allow", "Principal": {"Service": "lambda.amazonaws.com"},
                         "Action": "sts:AssumeRole"}
