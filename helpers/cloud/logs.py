"""Read the function's CloudWatch logs: one record per invocation, from its own log lines.

The same code reads the local cloud's logs and real ones: both hold Lambda's
START / END / REPORT lines and the handler's JSON lines.
"""
from __future__ import annotations

import json
import re

from fmri_preproc.contract import LogEvent
from helpers.cloud.clients import client

REPORT_RE = re.compile(
    r"REPORT RequestId: (?P<request_id>\S+)\s+Duration: (?P<duration_ms>[\d.]+) ms\s+"
    r"Billed Duration: (?P<billed_ms>\d+) ms\s+Memory Size: (?P<memory_mb>\d+) MB\s+"
    r"Max Memory Used: (?P<max_memory_mb>\d+) MB")
ERROR_TYPE_RE = re.compile(r"Error Type: (\S+)")


def log_events(log_group: str) -> list[dict]:
    """Every event of a log group, oldest first (all streams, all pages)."""
    logs = client("logs")
    try:
        pages = logs.get_paginator("filter_log_events").paginate(logGroupName=log_group)
        events = [event for page in pages for event in page["events"]]
    except logs.exceptions.ResourceNotFoundException:
        return []  # no invocation yet: Lambda creates the group on the first one
    return sorted(events, key=lambda e: (e["timestamp"], e.get("ingestionTime", 0)))


def invocations(events: list[dict]) -> list[dict]:
    """Group log events into invocations, one dict each.

    Returns
    -------
    list of dict
        ``request_id``, ``key`` and ``etag`` (the S3 object version it processed, from the
        handler's start line), ``duration_ms``, ``billed_ms``, ``memory_mb``, ``max_memory_mb``,
        ``error`` (None, or e.g. "Task timed out after 60.00 seconds"), ``error_type``,
        ``start_ms`` and ``end_ms`` (timestamps).
    """
    by_stream: dict[str, list[dict]] = {}
    for event in events:
        by_stream.setdefault(event["logStreamName"], []).append(event)
    records = []
    for stream_events in by_stream.values():
        current: dict = {}
        for event in stream_events:
            current = _take_line(current, event, records)
    return sorted(records, key=lambda r: r["start_ms"])


def _take_line(current: dict, event: dict, records: list[dict]) -> dict:
    """Fold one log line into the invocation being read; close it on REPORT."""
    message = event["message"]
    if message.startswith("START RequestId:"):
        return {"request_id": message.split()[2], "key": None, "error": None,
                "error_type": None, "start_ms": event["timestamp"]}
    if match := REPORT_RE.search(message):
        record = {**current, **{k: float(v) if k == "duration_ms" else
                                (v if k == "request_id" else int(v))
                                for k, v in match.groupdict().items()}}
        record["end_ms"] = event["timestamp"]
        if error_type := ERROR_TYPE_RE.search(message):
            record["error_type"] = error_type.group(1)
        record.setdefault("start_ms", event["timestamp"])
        records.append(record)
        return {}
    if "Task timed out after" in message or "Runtime exited with error" in message:
        current["error"] = message.split(" ", 2)[-1] if "timed out" in message else message
    elif message.startswith("{"):
        try:
            line = json.loads(message)
        except ValueError:
            return current
        if line.get("message") == LogEvent.START:
            current.update(key=line.get("key"), etag=line.get("etag"))
        elif line.get("level") == "ERROR" and line.get("error"):
            current["error"] = line["error"]
    elif message.startswith("[ERROR]"):
        current["error"] = message.removeprefix("[ERROR] ")
    return current


def peak_concurrency(records: list[dict]) -> int:
    """The most invocations that overlapped in time, from START/REPORT timestamps."""
    edges = sorted([(r["start_ms"], 1) for r in records] + [(r["end_ms"], -1) for r in records],
                   key=lambda e: (e[0], e[1]))
    running = peak = 0
    for _, step in edges:
        running += step
        peak = max(peak, running)
    return peak
