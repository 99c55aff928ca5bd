"""What a workbook run cost, from its own logs and buckets, priced from one dated table.

Each price is AWS's public on-demand list price (us-east-1, x86 unless said), with the
allowance that is free **every month, for every account, for ever** (AWS's "always free"
tier: Lambda's 1 M requests and 400,000 GB-s, 100 GB of data out to the internet, 5 GB of
CloudWatch Logs, 1 M SQS requests). A workbook run stays far inside those, so most users
pay $0 for them: :func:`run_cost` shows the list price and what is left to pay after the
allowance side by side, assuming nothing else in the account used the allowance that month.
S3's free tier is only for the first 12 months of older accounts, so it is not counted.
Review the table before trusting a figure: PRICES_DATE and PRICES_SOURCE say where and
when it was read.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from datetime import datetime, timezone

import pandas as pd
from boto3.s3.transfer import TransferConfig
from botocore.exceptions import ClientError

from helpers.cloud.logs import invocations, log_events
from helpers.cloud.settings import Settings
from helpers.cloud.status import wait_for_results
from helpers.cloud.transfer import list_objects


@dataclass(frozen=True)
class Price:
    """One line of the price table."""

    usd: float                  # per unit
    unit: str
    free_per_month: float = 0.0  # always free, every account (0: no such allowance)


PRICES_DATE = "2026-11-25"
PRICES_SOURCE = ("https://aws.amazon.com/lambda/pricing/, https://aws.amazon.com/s3/pricing/, "
                 "https://aws.amazon.com/cloudwatch/pricing/, https://aws.amazon.com/sqs/pricing/, "
                 "https://aws.amazon.com/free/ (us-east-1)")
PRICES = {
    "lambda_gb_second": Price(0.0000166667, "GB-s", 400_000),   # x86, first 6 B GB-s a month
    "lambda_gb_second_arm64": Price(0.0000133334, "GB-s", 400_000),  # Graviton: 20 % less
    "lambda_request": Price(0.20 / 1e6, "request", 1_000_000),
    "s3_gb_month": Price(0.023, "GB-month"),                   # S3 Standard, first 50 TB
    "s3_put_request": Price(0.005 / 1000, "request"),           # PUT, COPY, POST, LIST
    "s3_get_request": Price(0.0004 / 1000, "request"),          # GET, HEAD and all others
    "transfer_out_gb": Price(0.09, "GB", 100),                  # to the internet
    "logs_ingest_gb": Price(0.50, "GB", 5),                     # 5 GB of logs data free
    "sqs_request": Price(0.40 / 1e6, "request", 1_000_000),     # standard queue
}
LAMBDA_MB_PER_VCPU = 1769  # Lambda gives one full vCPU at 1,769 MB, in proportion below
HOURS_PER_MONTH = 730
GB = 1024**3
LIST_PAGE = 1000  # keys per ListObjectsV2 page
# boto3's managed transfers (upload_file, download_file) switch to parts above this size.
TRANSFER = TransferConfig()
# wait_for_results (notebook 03) looks at the buckets every poll_s seconds.
STATUS_POLL_S = inspect.signature(wait_for_results).parameters["poll_s"].default


def run_cost(cfg: Settings, *, downloaded_bytes: int | None = None,
             status_polls: int | None = None, until: datetime | None = None) -> pd.DataFrame:
    """Line items of what this workbook run cost, from its REPORT lines and its buckets.

    Parameters
    ----------
    cfg : Settings
        The workbook whose logs and buckets to read (missing ones count as empty).
    downloaded_bytes : int, optional
        Bytes downloaded out of AWS (notebook 04 downloads the derivatives); default: the
        size of the output bucket, downloaded once.
    status_polls : int, optional
        How often notebook 03's status table looked at the buckets; default: once every
        ``STATUS_POLL_S`` seconds from the first run's START to the last run's REPORT.
    until : datetime, optional
        When storage stops being billed (default: now, as cleanup follows).

    Returns
    -------
    pandas.DataFrame
        ``item, quantity, unit, unit_price_usd, cost_usd`` (list price), ``free_per_month``
        and ``after_free_tier_usd``; the last row is the total.

    Notes
    -----
    S3 requests are counted as the workbook makes them: a multipart upload is one PUT per
    part plus two (create, complete), told by its ETag (``"...-<parts>"``); each download
    is a HEAD plus one ranged GET per 8 MB part; the function GETs its input once per
    attempt and HEADs it before each write; the status table LISTs both buckets per poll.
    """
    events = log_events(cfg.log_group)
    runs = [r for r in invocations(events) if r.get("key")]
    all_runs = invocations(events)
    inputs, outputs = _objects(cfg.input_bucket), _objects(cfg.output_bucket)
    until = until or datetime.now(timezone.utc)
    gb_seconds = sum(r["billed_ms"] / 1000 * r["memory_mb"] / 1024 for r in all_runs)
    gb_months = sum(o["Size"] / GB * (until - o["LastModified"]).total_seconds() / 3600
                    for o in inputs + outputs) / HOURS_PER_MONTH
    downloaded = sum(o["Size"] for o in outputs) if downloaded_bytes is None else downloaded_bytes
    polls = _status_polls(runs) if status_polls is None else status_polls
    puts, gets = _s3_requests(cfg, inputs, outputs, runs, polls)
    # CloudWatch Logs bills the UTF-8 bytes of each event plus 26 bytes of metadata.
    log_bytes = sum(len(e["message"].encode()) + 26 for e in events)
    items = [
        ("Lambda compute", gb_seconds, PRICES["lambda_gb_second"]),
        ("Lambda requests", len(all_runs), PRICES["lambda_request"]),
        ("S3 PUT, COPY, POST, LIST requests", puts, PRICES["s3_put_request"]),
        ("S3 GET, HEAD requests", gets, PRICES["s3_get_request"]),
        ("S3 storage", gb_months, PRICES["s3_gb_month"]),
        ("Data transfer out", downloaded / GB, PRICES["transfer_out_gb"]),
        ("CloudWatch Logs ingestion", log_bytes / GB, PRICES["logs_ingest_gb"]),
        ("SQS requests (failure queue polls)", polls, PRICES["sqs_request"]),
    ]
    return _table(items)


def _table(items: list[tuple[str, float, Price]]) -> pd.DataFrame:
    table = pd.DataFrame([{"item": name, "quantity": quantity, "unit": price.unit,
                           "unit_price_usd": price.usd, "free_per_month": price.free_per_month}
                          for name, quantity, price in items])
    table["cost_usd"] = table["quantity"] * table["unit_price_usd"]
    billable = (table["quantity"] - table["free_per_month"]).clip(lower=0)
    table["after_free_tier_usd"] = billable * table["unit_price_usd"]
    total = {"item": "Total", "quantity": None, "unit": "", "unit_price_usd": None,
             "free_per_month": None, "cost_usd": table["cost_usd"].sum(),
             "after_free_tier_usd": table["after_free_tier_usd"].sum()}
    columns = ["item", "quantity", "unit", "unit_price_usd", "cost_usd", "free_per_month",
               "after_free_tier_usd"]
    return pd.concat([table, pd.DataFrame([total])], ignore_index=True)[columns]


def month_cost(costs: pd.DataFrame, factor: float) -> tuple[float, float]:
    """(list price, after the free tier) in USD of ``factor`` times a :func:`run_cost`
    table's usage in one month, in an account that uses nothing else that month."""
    lines = costs.iloc[:-1]
    quantity = lines["quantity"].astype(float) * factor
    billable = (quantity - lines["free_per_month"].astype(float)).clip(lower=0)
    return (float((quantity * lines["unit_price_usd"]).sum()),
            float((billable * lines["unit_price_usd"]).sum()))


def _objects(bucket: str) -> list[dict]:
    """The bucket's objects; none if it is gone (a re-run after cleanup)."""
    try:
        return list_objects(bucket)
    except ClientError as exc:
        if exc.response["Error"]["Code"] in ("NoSuchBucket", "404"):
            return []
        raise


def upload_requests(obj: dict) -> int:
    """PUT-class requests that stored ``obj``: 1, or parts + 2 for a multipart upload
    (CreateMultipartUpload, one UploadPart per part, CompleteMultipartUpload)."""
    etag = obj["ETag"].strip('"')
    return int(etag.rsplit("-", 1)[1]) + 2 if "-" in etag else 1


def download_requests(size: int) -> int:
    """GET-class requests of one ``download_file``: a HEAD, then one GET, or one ranged
    GET per part above boto3's multipart threshold."""
    if size < TRANSFER.multipart_threshold:
        return 2
    return 1 + math.ceil(size / TRANSFER.multipart_chunksize)


def _status_polls(runs: list[dict]) -> int:
    """Polls of notebook 03's status table: one per STATUS_POLL_S while runs went on."""
    if not runs:
        return 0
    span_s = (max(r["end_ms"] for r in runs) - min(r["start_ms"] for r in runs)) / 1000
    return 1 + math.ceil(span_s / STATUS_POLL_S)


def _s3_requests(cfg: Settings, inputs: list[dict], outputs: list[dict], runs: list[dict],
                 polls: int) -> tuple[int, int]:
    """(PUT-class, GET-class) S3 requests of the whole run (see :func:`run_cost`)."""
    # Files at the top of the derivatives dataset (dataset_description.json, .bidsignore)
    # are written again by every run; a run's own outputs once per processed run.
    top = [o for o in outputs if "/" not in o["Key"].removeprefix(cfg.output_prefix)]
    own = [o for o in outputs if o not in top]
    puts = (sum(upload_requests(o) for o in inputs + own)
            + len(runs) * sum(upload_requests(o) for o in top))
    pages = math.ceil(len(inputs) / LIST_PAGE) or 1, math.ceil(len(outputs) / LIST_PAGE) or 1
    puts += polls * sum(pages) + (pages[1] if outputs else 0)  # status table; notebook 04
    records = [o for o in own if o["Key"].endswith(("_done.json", "_error.json"))]
    gets = (len(runs)                      # the function reads its input once per attempt
            + len(own)                     # and HEADs it before each write
            + len(records)                 # the status table reads each record once
            + sum(download_requests(o["Size"]) for o in outputs))  # notebook 04
    return puts, gets


# ------------------------------------------------------------------------------------------
# Memory, CPU and what a run costs


def cpu_bound_seconds(duration_s: float, memory_mb: float, at_memory_mb: float) -> float:
    """A single-threaded, CPU-bound run's duration at another memory size.

    Lambda gives CPU in proportion to memory, one vCPU at 1,769 MB
    (:data:`LAMBDA_MB_PER_VCPU`); a single thread cannot use more than one.

    Parameters
    ----------
    duration_s : float
        Measured duration (s) at ``memory_mb``.
    memory_mb, at_memory_mb : float
        The measured memory size and the one to predict for (MB).
    """
    share = min(memory_mb, LAMBDA_MB_PER_VCPU) / min(at_memory_mb, LAMBDA_MB_PER_VCPU)
    return duration_s * share


def compute_cost(duration_s: float, memory_mb: float, *, arm64: bool = False) -> float:
    """List price (USD) of one run's compute: GB-seconds times the price per GB-s."""
    price = PRICES["lambda_gb_second_arm64" if arm64 else "lambda_gb_second"].usd
    return duration_s * memory_mb / 1024 * price


def replay_event(cfg: Settings, key: str) -> dict:
    """The S3 event of an input's current upload, as S3 delivers it (key URL-encoded,
    ETag without quotes), to invoke the function on it by hand."""
    from urllib.parse import quote_plus

    from helpers.cloud.clients import client

    head = client("s3").head_object(Bucket=cfg.input_bucket, Key=key)
    return {"Records": [{
        "eventSource": "aws:s3", "eventName": "ObjectCreated:Put", "awsRegion": cfg.region,
        "s3": {"bucket": {"name": cfg.input_bucket,
                          "arn": f"arn:{cfg.partition}:s3:::{cfg.input_bucket}"},
               "object": {"key": quote_plus(key), "size": head["ContentLength"],
                          "eTag": head["ETag"].strip('"')}}}]}
