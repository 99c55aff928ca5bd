"""The true cost: run_cost on the REPORT lines of real invocations, checked by hand."""
import json
import math
import re
from datetime import date, timedelta

import pytest

from helpers.cloud.clients import client
from helpers.cloud.costs import (GB, HOURS_PER_MONTH, LAMBDA_MB_PER_VCPU, PRICES, PRICES_DATE,
                                 compute_cost, cpu_bound_seconds, download_requests,
                                 month_cost, run_cost, upload_requests)
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
    assert compute["cost_usd"] == pytest.approx(by_hand * PRICES["lambda_gb_second"].usd)
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
    log_bytes = sum(len(e["message"].encode()) + 26 for e in workbook["events"])
    assert item(costs, "CloudWatch Logs ingestion")["quantity"] == pytest.approx(log_bytes / GB)


def test_default_download_is_the_output_bucket_once(workbook):
    assert item(workbook["costs"], "Data transfer out")["quantity"] == pytest.approx(
        OUTPUT_BYTES / GB)


def test_every_price_used_comes_from_the_one_dated_table(workbook):
    prices = workbook["costs"]["unit_price_usd"].iloc[:-1]
    assert set(prices) <= {price.usd for price in PRICES.values()}
    assert date.fromisoformat(PRICES_DATE) <= date.today()


def test_a_real_aws_report_line_is_read():
    events = [{"logStreamName": "s", "timestamp": 1,
               "message": "START RequestId: 3f1c Version: $LATEST"},
              {"logStreamName": "s", "timestamp": 9, "message": AWS_REPORT}]
    (record,) = invocations(events)
    assert (record["billed_ms"], record["memory_mb"], record["max_memory_mb"]) == (8242, 1024, 312)
    assert record["duration_ms"] == pytest.approx(8241.07)


def test_list_price_and_after_the_free_tier_side_by_side(workbook):
    """The always-free allowances cover a workbook run's Lambda, transfer and logs; S3
    requests and storage have none (S3's free tier is only for new accounts' first year)."""
    costs = workbook["costs"].set_index("item")
    lines = costs.iloc[:-1]
    for name in ("Lambda compute", "Lambda requests", "Data transfer out",
                 "CloudWatch Logs ingestion"):
        assert lines.loc[name, "quantity"] < lines.loc[name, "free_per_month"]
        assert lines.loc[name, "cost_usd"] > 0 and lines.loc[name, "after_free_tier_usd"] == 0
    for name in ("S3 PUT, COPY, POST, LIST requests", "S3 storage"):
        assert lines.loc[name, "after_free_tier_usd"] == pytest.approx(lines.loc[name, "cost_usd"])
    assert costs.loc["Total", "after_free_tier_usd"] == pytest.approx(
        lines["after_free_tier_usd"].sum())
    assert PRICES["lambda_gb_second"].free_per_month == 400_000
    assert PRICES["lambda_request"].free_per_month == 1_000_000
    assert (PRICES["transfer_out_gb"].free_per_month, PRICES["logs_ingest_gb"].free_per_month) == (100, 5)


def test_requests_count_parts_ranges_and_status_polls(workbook):
    """A multipart upload is a PUT per part plus two; a download a HEAD plus a GET per 8 MB
    part; the status table LISTs both buckets at every poll. Checked on real objects."""
    cfg = Settings(mode="local", workbook_id="fmriwb-requests")
    s3 = client("s3")
    for bucket in (cfg.input_bucket, cfg.output_bucket):
        s3.create_bucket(Bucket=bucket)
    key = "raw/sub-01/func/sub-01_task-rest_bold.nii.gz"
    upload = s3.create_multipart_upload(Bucket=cfg.input_bucket, Key=key)["UploadId"]
    parts = [s3.upload_part(Bucket=cfg.input_bucket, Key=key, UploadId=upload, PartNumber=n,
                            Body=b"\0" * (5 * 2**20 if n < 3 else 1000))["ETag"] for n in (1, 2, 3)]
    s3.complete_multipart_upload(Bucket=cfg.input_bucket, Key=key, UploadId=upload,
                                 MultipartUpload={"Parts": [{"ETag": e, "PartNumber": n}
                                                            for n, e in enumerate(parts, 1)]})
    s3.put_object(Bucket=cfg.input_bucket, Key="raw/sub-01/func/sub-01_task-rest_bold.json",
                  Body=b"{}")
    out = "derivatives/sub-01/func/sub-01_task-rest_desc-preproc_bold.nii.gz"
    s3.put_object(Bucket=cfg.output_bucket, Key=out, Body=b"\0" * (20 * 2**20))
    s3.put_object(Bucket=cfg.output_bucket, Key="derivatives/sub-01/func/x_done.json", Body=b"{}")
    stored = s3.head_object(Bucket=cfg.input_bucket, Key=key)
    assert stored["ETag"].strip('"').endswith("-3") and upload_requests(stored) == 5
    assert download_requests(20 * 2**20) == 1 + 3 and download_requests(1000) == 2

    costs = run_cost(cfg, status_polls=7).set_index("item")
    # 5 (multipart) + 1 (sidecar) + 2 outputs; 7 polls x 2 LISTs; notebook 04's one LIST.
    assert costs.loc["S3 PUT, COPY, POST, LIST requests", "quantity"] == 5 + 1 + 2 + 7 * 2 + 1
    # No run in the logs: 2 HEADs before writes, 1 record read, downloads 4 + 2.
    assert costs.loc["S3 GET, HEAD requests", "quantity"] == 2 + 1 + 4 + 2
    assert costs.loc["SQS requests (failure queue polls)", "quantity"] == 7


def test_run_cost_of_a_cleaned_up_workbook_is_zero(workbook):
    """A re-run of notebook 05 after cleanup: no buckets, no logs, nothing to pay."""
    costs = run_cost(Settings(mode="local", workbook_id="fmriwb-gone"))
    assert (costs["quantity"].iloc[:-1] == 0).all()
    assert costs["cost_usd"].iloc[-1] == 0 and costs["after_free_tier_usd"].iloc[-1] == 0


def test_gb_seconds_stay_flat_below_one_vcpu():
    """CPU in proportion to memory: half the memory, twice the duration, the same GB-s."""
    assert cpu_bound_seconds(10.0, 1024, 512) == pytest.approx(20.0)
    assert compute_cost(20.0, 512) == pytest.approx(compute_cost(10.0, 1024))
    above = cpu_bound_seconds(10.0, LAMBDA_MB_PER_VCPU, 2 * LAMBDA_MB_PER_VCPU)
    assert above == pytest.approx(10.0)  # one thread gets no faster: GB-s double
    assert compute_cost(10.0, 1024, arm64=True) == pytest.approx(0.8 * compute_cost(10.0, 1024),
                                                                  rel=1e-4)


def test_a_month_of_many_runs_uses_up_the_free_tier_line_by_line(workbook):
    costs = workbook["costs"]
    list_price, after = month_cost(costs, 1.0)
    assert list_price == pytest.approx(costs["cost_usd"].iloc[-1])
    assert after == pytest.approx(costs["after_free_tier_usd"].iloc[-1])
    compute = item(costs, "Lambda compute")
    factor = 2 * 400_000 / compute["quantity"]  # twice the free GB-s
    _, after = month_cost(costs, factor)
    assert after >= 400_000 * PRICES["lambda_gb_second"].usd  # half of it is paid
