"""Where each upload stands: processed, failed (and why), retrying, pending or not processed.

Read only from what AWS itself keeps, so the same table works on the local cloud and on a
real account: the input bucket (which upload is current), the output bucket (each run's
marker or error record), the function's logs (attempts, kills) and the failure queue (events
Lambda gave up on, including those that never reached the handler).

A record counts only if it describes the input's **latest upload**: its ETag and the
upload's LastModified, both written by the function, must match the input object now in the
bucket. An older run's marker never makes a newer upload look processed.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from urllib.parse import unquote_plus

import pandas as pd
from tqdm.auto import tqdm

from fmri_preproc.contract import Record, input_problem, run_from_key
from helpers.cloud.clients import client
from helpers.cloud.logs import invocations, log_events
from helpers.cloud.settings import Settings
from helpers.cloud.transfer import list_objects

STATUS_COLUMNS = ["key", "run", "status", "reason", "attempts", "duration_s", "max_memory_mb"]
FINISHED = ("processed", "processed with warnings", "failed", "not processed")
LOG_GRACE_S = 15.0
_records: dict[tuple, dict] = {}  # (bucket, key, ETag of the record) -> its JSON: read once


def processing_status(cfg: Settings, keys: list[str], *,
                      failed_events: list[dict] | None = None) -> pd.DataFrame:
    """One row per input key: ``key, run, status, reason, attempts, duration_s, max_memory_mb``.

    ``status`` is one of:

    * "processed" / "processed with warnings": the run's marker describes the latest upload;
    * "failed": a permanent error record; or every allowed attempt failed (the failure
      queue has the event, or the logs show each attempt killed); or the event was
      dropped (``EventAgeExceeded``) or never reached the handler (an init error);
    * "retrying": an attempt failed and Lambda will try again;
    * "pending": no attempt has finished yet;
    * "not processed": the trigger does not take this key (the reason says why).

    Parameters
    ----------
    failed_events : list of dict, optional
        Messages of the failure queue (:func:`failure_events`); read here when not given.
    """
    inputs = {o["Key"]: o for o in list_objects(cfg.input_bucket, cfg.input_prefix)}
    outputs = {o["Key"]: o for o in list_objects(cfg.output_bucket, cfg.output_prefix)}
    attempts_allowed = _max_attempts(cfg)
    logged = invocations(log_events(cfg.log_group))
    failed = failure_events(cfg) if failed_events is None else failed_events
    rows = [_status_row(cfg, key, inputs.get(key), outputs, logged, failed, attempts_allowed)
            for key in keys]
    return pd.DataFrame(rows, columns=STATUS_COLUMNS)


def _status_row(cfg: Settings, key: str, current: dict | None, outputs: dict, logged: list,
                failed: list, attempts_allowed: int) -> dict:
    row = dict.fromkeys(STATUS_COLUMNS)
    row.update(key=key, status="pending", reason="", attempts=0)
    problem = input_problem(key) if key.startswith(cfg.input_prefix) else \
        f"{key} is outside the input prefix {cfg.input_prefix}"
    if problem or current is None:
        row.update(status="not processed", reason=problem or "the input is not in the bucket")
        return row
    run = run_from_key(key.removeprefix(cfg.input_prefix))
    etag = current["ETag"].strip('"')
    runs = [r for r in logged if r.get("key") == key and r.get("etag") in (None, etag)]
    last = runs[-1] if runs else {}
    row.update(run=run.id, attempts=len(runs), max_memory_mb=last.get("max_memory_mb"))
    done = _current_record(cfg, outputs, run.done, current)
    error = _current_record(cfg, outputs, run.error, current)
    gave_up = [e for e in failed if e["key"] == key and e["etag"] in (None, etag)]
    if done:
        warnings = done.get(Record.WARNINGS) or []
        row.update(status="processed with warnings" if warnings else "processed",
                   reason="; ".join(map(str, warnings)), duration_s=done.get(Record.DURATION_S))
    elif error and error.get(Record.PERMANENT, True):
        row.update(status="failed", reason=error.get(Record.ERROR, ""),
                   duration_s=error.get(Record.DURATION_S))
    elif gave_up:
        reason = (error.get(Record.ERROR) if error else _killed_reason(last)
                  if last.get("error") and gave_up[-1]["condition"] != "EventAgeExceeded"
                  else _queue_reason(gave_up[-1]))
        row.update(status="failed", reason=f"{reason} ({gave_up[-1]['condition']})")
    elif runs and len(runs) >= attempts_allowed and all(r.get("error") for r in runs):
        row.update(status="failed", reason=_killed_reason(last),
                   duration_s=round(last["duration_ms"] / 1000, 3))
    elif error or (runs and last.get("error")):
        reason = error.get(Record.ERROR) if error else _killed_reason(last)
        row.update(status="retrying", reason=f"attempt {len(runs)} of {attempts_allowed} "
                                             f"failed: {reason}")
    return row


def _current_record(cfg: Settings, outputs: dict, relative: str, current: dict) -> dict | None:
    """A marker or error record, if it exists and describes the input's latest upload."""
    listed = outputs.get(f"{cfg.output_prefix}{relative}")
    if listed is None:
        return None
    cache_key = (cfg.output_bucket, listed["Key"], listed["ETag"])
    if cache_key not in _records:
        body = client("s3").get_object(Bucket=cfg.output_bucket, Key=listed["Key"])["Body"]
        _records[cache_key] = json.loads(body.read())
    record = _records[cache_key]
    if record.get(Record.ETAG) not in (None, current["ETag"].strip('"')):
        return None  # an older upload's record
    uploaded = record.get(Record.INPUT_LAST_MODIFIED)
    if uploaded and pd.Timestamp(uploaded) != pd.Timestamp(current["LastModified"]):
        return None  # the same bytes uploaded again: this run is the earlier upload's
    return record


def failure_events(cfg: Settings, *, wait_s: int = 1) -> list[dict]:
    """Events Lambda gave up on, from the on-failure queue (read, not deleted).

    Returns
    -------
    list of dict
        ``key``, ``etag``, ``condition`` ("RetriesExhausted", "EventAgeExceeded"),
        ``error_type`` and ``error`` (from the last attempt), ``attempts``.

    Notes
    -----
    Messages stay in the queue (visibility timeout 0), so later notebooks see them too. A
    long poll (``wait_s``, up to 20 s) waits for a message that is on its way.
    """
    sqs = client("sqs")
    try:
        url = sqs.get_queue_url(QueueName=cfg.failure_queue)["QueueUrl"]
    except sqs.exceptions.QueueDoesNotExist:
        return []
    seen: dict[str, dict] = {}
    for _ in range(20):  # SQS returns a sample per call: read until nothing new arrives
        messages = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, VisibilityTimeout=0,
                                       WaitTimeSeconds=wait_s).get("Messages", [])
        new = {m["MessageId"]: m for m in messages if m["MessageId"] not in seen}
        if not new:
            break
        seen.update(new)
        wait_s = 0
    return [event for message in seen.values() for event in _failed_records(message["Body"])]


def _failed_records(body: str) -> list[dict]:
    """One entry per S3 record of an on-failure destination message."""
    message = json.loads(body)
    context = message.get("requestContext", {})
    response = message.get("responsePayload") or {}
    return [{"key": unquote_plus(r["s3"]["object"]["key"]),
             "etag": (r["s3"]["object"].get("eTag") or "").strip('"') or None,
             "condition": context.get("condition", ""),
             "attempts": context.get("approximateInvokeCount"),
             "error_type": response.get("errorType"), "error": response.get("errorMessage")}
            for r in message.get("requestPayload", {}).get("Records", [])]


def _queue_reason(event: dict) -> str:
    if event["condition"] == "EventAgeExceeded":
        return ("the event waited longer than the function's maximum event age and was "
                "dropped; raise MaximumEventAgeInSeconds or the concurrency, and upload again")
    if event.get("error_type"):
        return f"{event['error_type']}: {event.get('error') or ''}".strip()
    return "Lambda gave up on the event"


def _killed_reason(run: dict) -> str:
    """Why an attempt failed, from the logs (a killed run cannot write a record)."""
    if run.get("error_type") == "Runtime.OutOfMemory":
        return (f"out of memory: the run needed more than the function's {run['memory_mb']} MB "
                "(Runtime exited with error: signal: killed); raise the function's memory")
    if run.get("error_type") == "Sandbox.Timedout":
        return f"{run['error']}; raise the function's timeout"
    return run.get("error") or "the attempt failed"


def _max_attempts(cfg: Settings) -> int:
    """1 + the function's MaximumRetryAttempts for asynchronous events (AWS default 2)."""
    lam = client("lambda")
    try:
        config = lam.get_function_event_invoke_config(FunctionName=cfg.function_name)
    except lam.exceptions.ResourceNotFoundException:
        return 3
    return 1 + config.get("MaximumRetryAttempts", 2)


def wait_for_results(cfg: Settings, keys: list[str], *, timeout_s: float = 600,
                     poll_s: float = 2.0) -> pd.DataFrame:
    """Poll until every input has finished (or the timeout passes), with a progress bar.

    "Retrying" and "pending" are not finished. The failure queue is read with a long poll
    once the rest has finished, so a failure on its way is not missed.

    Returns
    -------
    pandas.DataFrame
        The final :func:`processing_status` table.
    """
    deadline = time.monotonic() + timeout_s
    with tqdm(total=len(keys), desc="runs finished", unit="run") as bar:
        while True:
            table = processing_status(cfg, keys)
            finished = int(table["status"].isin(FINISHED).sum())
            bar.update(finished - bar.n)
            # A run's REPORT line lands just after its marker: give the logs LOG_GRACE_S.
            logged = table.loc[table["status"] != "not processed", "max_memory_mb"].notna().all()
            if finished == len(keys) and not logged and time.monotonic() < deadline:
                deadline = min(deadline, time.monotonic() + LOG_GRACE_S)
            elif finished == len(keys) or time.monotonic() > deadline:
                break
            time.sleep(poll_s)
    if table["status"].isin(("failed", "retrying", "pending")).any():  # a message on its way
        table = processing_status(cfg, keys, failed_events=failure_events(cfg, wait_s=10))
    print(f"{int(table['status'].isin(FINISHED).sum())} of {len(keys)} runs finished")
    return table


def write_status(table: pd.DataFrame, path: Path) -> Path:
    """Save the table as ``{"inputs": [{key, run, status, reason, ...}]}``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = json.loads(table.to_json(orient="records"))
    path.write_text(json.dumps({"inputs": rows}, indent=2))
    return path
