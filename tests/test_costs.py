"""The true cost: run_cost on the REPORT lines of real invocations, checked by hand."""
import json
import math
import re
from datetime import date, timedelta

import pytest

from helpers.cloud.clients import client
from helpers.cloud.costs import GB, HOURS_PER_MONTH, PRICES, PRICES_DATE, run_cost
from helpers.cloud.iam import lambda_trust_policy
from helpers.cloud.logs import invocations
from helpers.cloud.settings import Settings
from conftest import make_zip
from private_cloud import private_cloud

pytestmark = pytest.mark.slow  # the local cloud (see pyproject's markers)

CFG = Settings(mode="local", workbook_id="fmriwb-costtest")
APP = '''
import time

def lambda_handler(event, context):
    time.sleep(event["sleep"])
    return {"slept": event["sleep"]}
'''
SLEEPS = [0.05, 0.3, 0.6]
INPUT_BYTES, OUTPUT_BYTES = 3_000_000, 1_000_000
# A REPORT line as AWS writes it (cold start: Init Duration; X-Ray on).
AWS_REPORT = ("REPORT RequestId: 3f1c2b6e-7d8a-4c5e-9b0a-1e2f3a4b5c6d\tDuration: 8241.07 ms\t"
              "Billed Duration: 8242 ms\tMemory Size: 1024 MB\tMax Memory Used: 312 MB\t"
              "Init Duration: 612.33 ms\t\nXRAY TraceId: 1-5e1b4151-5ac6c58f5a5e5e5e5e5e5e5e\t"
              "SegmentId: 6a6a6a6a6a6a6a6a\tSampled: true\t")


@pytest.fixture(scope="module")
def workbook(tmp_path_factory):
    """A workbook with its function invoked three times and objects in both buckets."""
    with private_cloud(tmp_path_factory.mktemp("costs")):
        s3, lam = client("s3"), client("lambda")
        for bucket in (CFG.input_bucket, CFG.output_bucket):
            s3.create_bucket(Bucket=bucket)
        s3.put_object(Bucket=CFG.input_bucket, Key="raw/sub-01_bold.nii.gz",
                      Body=b"\0" * INPUT_BYTES)
        s3.put_object(Bucket=CFG.output_bucket, Key="derivatives/sub-01_done.json",
                      Body=b"\0" * OUTPUT_BYTES)
        role = client("iam").create_role(
            RoleName=CFG.role_name, AssumeRolePolicyDocument=json.dumps(lambda_trust_policy()))
        lam.create_function(FunctionName=CFG.function_name, Runtime="python3.11",
                            Handler="app.lambda_handler", Role=role["Role"]["Arn"],
                            Code={"ZipFile": make_zip({"app.py": APP})}, Timeout=10,
                            MemorySize=384)
        for sleep in SLEEPS:
            response = lam.invoke(FunctionName=CFG.function_name,
                                  Payload=json.dumps({"sleep": sleep}))
            assert "FunctionError" not in response
        events = client("logs").filter_log_events(logGroupName=CFG.log_group)["events"]
        yield {"events": events, "costs": run_cost(CFG)}


def item(costs, name):
    return costs.set_index("item").loc[name]


def report_fields(message):
    """The fields of a REPORT line, parsed here independently of helpers.cloud.logs."""
    return dict(re.findall(r"([A-Za-z ]+): ([\d.]+) (?:ms|MB)", message))


def test_compute_is_billed_duration_times_memory(workbook):
    reports = [report_fields(e["message"]) for e in workbook["events"]
               if e["message"].startswith("REPORT")]
    assert len(reports) == len(SLEEPS)
    by_hand = sum(int(r["Billed Duration"]) / 1000 * int(r["Memory Size"]) / 1024
                  for r in reports)
    for r, sleep in zip(reports, SLEEPS):
        assert int(r["Billed Duration"]) == math.ceil(float(r["Duration"]))  # per ms, rounded up
        assert int(r["Billed Duration"]) >= sleep * 1000 and int(r["Memory Size"]) == 384
    compute = item(workbook["costs"], "Lambda compute")
    assert compute["quantity"] == pytest.approx(by_hand, rel=1e-12)
    assert compute["cost_usd"] == pytest.approx(by_hand * PRICES["lambda_gb_second"])
    assert item(workbook["costs"], "Lambda requests")["quantity"] == len(SLEEPS)


def test_total_is_the_sum_of_the_items(workbook):
    costs = workbook["costs"]
    assert costs["item"].iloc[-1] == "Total"
    assert costs["cost_usd"].iloc[-1] == pytest.approx(costs["cost_usd"].iloc[:-1].sum())
    lines = costs.iloc[:-1]
    assert (lines["cost_usd"] == lines["quantity"] * lines["unit_price_usd"]).all()
    assert (lines["cost_usd"] >= 0).all()


def test_storage_transfer_and_logs_by_hand(workbook):
    s3 = client("s3")
    stored = [s3.head_object(Bucket=b, Key=k) for b, k in [
        (CFG.input_bucket, "raw/sub-01_bold.nii.gz"),
        (CFG.output_bucket, "derivatives/sub-01_done.json")]]
    until = max(o["LastModified"] for o in stored) + timedelta(days=30)
    costs = run_cost(CFG, until=until, downloaded_bytes=5 * GB)
    gb_months = sum(o["ContentLength"] / GB * (until - o["LastModified"]).total_seconds() / 3600
                    for o in stored) / HOURS_PER_MONTH
    assert gb_months == pytest.approx((INPUT_BYTES + OUTPUT_BYTES) / GB * 720 / 730, rel=1e-3)
    assert item(costs, "S3 storage")["quantity"] == pytest.approx(gb_months)
    assert item(costs, "Data transfer out")["cost_usd"] == pytest.approx(5 * 0.09)
    assert item(costs, "S3 PUT requests")["quantity"] == 2
    log_bytes = sum(len(e["message"].encode()) + 26 for e in workbook["events"])
    assert item(costs, "CloudWatch Logs ingestion")["quantity"] == pytest.approx(log_bytes / GB)


def test_default_download_is_the_output_bucket_once(workbook):
    assert item(workbook["costs"], "Data transfer out")["quantity"] == pytest.approx(
        OUTPUT_BYTES / GB)


def test_every_price_used_comes_from_the_one_dated_table(workbook):
    prices = workbook["costs"]["unit_price_usd"].iloc[:-1]
    assert set(prices) <= set(PRICES.values())
    assert date.fromisoformat(PRICES_DATE) <= date.today()


def test_a_real_aws_report_line_is_read():
    events = [{"logStreamName": "s", "timestamp": 1,
               "message": "START RequestId: 3f1c Version: $LATEST"},
              {"logStreamName": "s", "timestamp": 9, "message": AWS_REPORT}]
    (record,) = invocations(events)
    assert (record["billed_ms"], record["memory_mb"], record["max_memory_mb"]) == (8242, 1024, 312)
    assert record["duration_ms"] == pytest.approx(8241.07)
