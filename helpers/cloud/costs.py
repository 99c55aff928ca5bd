"""What a workbook run cost, from its own logs and buckets, priced from one table.

Prices are AWS's public on-demand prices for us-east-1, x86, without the free tier (which
would make a workbook run free for most new accounts). Review them before trusting a
figure: PRICES_DATE and PRICES_SOURCE say where and when they were read.
"""
from __future__ import annotations

from datetime import datetime, timezone

import pandas as pd

from helpers.cloud.logs import invocations, log_events
from helpers.cloud.settings import Settings
from helpers.cloud.transfer import list_objects

PRICES_DATE = "2026-11-25"
PRICES_SOURCE = ("https://aws.amazon.com/lambda/pricing/, https://aws.amazon.com/s3/pricing/, "
                 "https://aws.amazon.com/cloudwatch/pricing/ (us-east-1)")
PRICES = {
    "lambda_gb_second": 0.0000166667,   # x86, first 6 billion GB-s per month
    "lambda_request": 0.20 / 1e6,
    "s3_gb_month": 0.023,               # S3 Standard, first 50 TB
    "s3_put_request": 0.005 / 1000,     # PUT, COPY, POST, LIST
    "s3_get_request": 0.0004 / 1000,    # GET, SELECT and all other requests
    "transfer_out_gb": 0.09,            # internet egress, after the first 100 GB a month
    "logs_ingest_gb": 0.50,
}
HOURS_PER_MONTH = 730
GB = 1024**3


def run_cost(cfg: Settings, *, downloaded_bytes: int | None = None,
             until: datetime | None = None) -> pd.DataFrame:
    """Line items of what this workbook run cost, from its REPORT lines and its buckets.

    Parameters
    ----------
    cfg : Settings
        The workbook whose logs and buckets to read.
    downloaded_bytes : int, optional
        Bytes downloaded out of AWS (notebook 04 downloads the derivatives); default: the
        size of the output bucket, downloaded once.
    until : datetime, optional
        When storage stops being billed (default: now, as cleanup follows).

    Returns
    -------
    pandas.DataFrame
        Columns ``item, quantity, unit, unit_price_usd, cost_usd``; the last row is the total.
    """
    events = log_events(cfg.log_group)
    runs = invocations(events)
    inputs = list_objects(cfg.input_bucket)
    outputs = list_objects(cfg.output_bucket)
    until = until or datetime.now(timezone.utc)
    gb_seconds = sum(r["billed_ms"] / 1000 * r["memory_mb"] / 1024 for r in runs)
    gb_months = sum(o["Size"] / GB * (until - o["LastModified"]).total_seconds() / 3600
                    for o in inputs + outputs) / HOURS_PER_MONTH
    downloaded = sum(o["Size"] for o in outputs) if downloaded_bytes is None else downloaded_bytes
    # CloudWatch Logs bills the UTF-8 bytes of each event plus 26 bytes of metadata.
    log_bytes = sum(len(e["message"].encode()) + 26 for e in events)
    items = [
        ("Lambda compute", gb_seconds, "GB-s", PRICES["lambda_gb_second"]),
        ("Lambda requests", len(runs), "invocations", PRICES["lambda_request"]),
        ("S3 PUT requests", len(inputs) + len(outputs), "requests", PRICES["s3_put_request"]),
        # The function reads each input once; notebook 04 reads each output once.
        ("S3 GET requests", len(runs) + len(outputs), "requests", PRICES["s3_get_request"]),
        ("S3 storage", gb_months, "GB-month", PRICES["s3_gb_month"]),
        ("Data transfer out", downloaded / GB, "GB", PRICES["transfer_out_gb"]),
        ("CloudWatch Logs ingestion", log_bytes / GB, "GB", PRICES["logs_ingest_gb"]),
    ]
    table = pd.DataFrame(items, columns=["item", "quantity", "unit", "unit_price_usd"])
    table["cost_usd"] = table["quantity"] * table["unit_price_usd"]
    total = {"item": "Total", "quantity": None, "unit": "", "unit_price_usd": None,
             "cost_usd": table["cost_usd"].sum()}
    return pd.concat([table, pd.DataFrame([total])], ignore_index=True)

