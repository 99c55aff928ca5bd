"""Where each upload stands: processed, failed (and why) or pending.

Read only from what AWS itself keeps, the output bucket and the function's logs, so the
same table works on the local cloud and on a real account.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from fmri_preproc import output_name
from helpers.cloud.clients import client
from helpers.cloud.logs import invocations, log_events
from helpers.cloud.settings import Settings
from helpers.cloud.transfer import list_objects

STATUS_COLUMNS = ["key", "status", "reason", "duration_s", "max_memory_mb"]
LOG_GRACE_S = 15.0


def processing_status(cfg: Settings, keys: list[str]) -> pd.DataFrame:
    """One row per input key: ``key, status, reason, duration_s, max_memory_mb``.

    ``status`` is "processed" (a completion marker is newer than any error record),
    "failed" (an error record is newer, or every allowed attempt ended in a timeout or
    out-of-memory kill, as the logs say) or "pending".
    """
    objects = {o["Key"]: o for o in list_objects(cfg.output_bucket, cfg.output_prefix)}
    runs = invocations(log_events(cfg.log_group))
    attempts = _max_attempts(cfg)
    rows = [_status_row(cfg, key, objects, [r for r in runs if r.get("key") == key], attempts)
            for key in keys]
    return pd.DataFrame(rows, columns=STATUS_COLUMNS)


def _status_row(cfg: Settings, key: str, objects: dict, runs: list[dict],
                attempts: int) -> dict:
    base = f"{cfg.output_prefix}{output_name(key)}"
    done, error = objects.get(f"{base}_done.json"), objects.get(f"{base}_error.json")
    last = runs[-1] if runs else {}
    row = {"key": key, "status": "pending", "reason": "", "duration_s": None,
           "max_memory_mb": last.get("max_memory_mb")}
    if done and (not error or done["LastModified"] >= error["LastModified"]):
        marker = _read_json(cfg.output_bucket, done["Key"])
        row.update(status="processed", duration_s=marker.get("duration_s"))
    elif error:
        record = _read_json(cfg.output_bucket, error["Key"])
        row.update(status="failed", reason=record.get("error", ""),
                   duration_s=record.get("duration_s"))
    elif runs and all(r.get("error") for r in runs[-attempts:]) and len(runs) >= attempts:
        row.update(status="failed", reason=_killed_reason(last),
                   duration_s=round(last["duration_ms"] / 1000, 3))
    return row


def _killed_reason(run: dict) -> str:
    """Why the last attempt failed, from the logs (a killed run cannot write a record)."""
    if run.get("error_type") == "Runtime.OutOfMemory":
        return (f"out of memory: the run needed more than the function's {run['memory_mb']} MB "
                "(Runtime exited with error: signal: killed); raise the function's memory")
    if run.get("error_type") == "Sandbox.Timedout":
        return f"{run['error']}; raise the function's timeout"
    return run["error"]


def _max_attempts(cfg: Settings) -> int:
    """1 + the function's MaximumRetryAttempts for asynchronous events (AWS default 2)."""
    lam = client("lambda")
    try:
        config = lam.get_function_event_invoke_config(FunctionName=cfg.function_name)
    except lam.exceptions.ResourceNotFoundException:
        return 3
    return 1 + config.get("MaximumRetryAttempts", 2)


def _read_json(bucket: str, key: str) -> dict:
    return json.loads(client("s3").get_object(Bucket=bucket, Key=key)["Body"].read())


def wait_for_results(cfg: Settings, keys: list[str], *, timeout_s: float = 600,
                     poll_s: float = 2.0) -> pd.DataFrame:
    """Poll until no input is pending (or the timeout passes), with a progress bar.

    Returns
    -------
    pandas.DataFrame
        The final :func:`processing_status` table.
    """
    deadline = time.monotonic() + timeout_s
    with tqdm(total=len(keys), desc="runs finished", unit="run") as bar:
        while True:
            table = processing_status(cfg, keys)
            finished = int((table["status"] != "pending").sum())
            bar.update(finished - bar.n)
            # A run's REPORT line lands just after its marker: give the logs LOG_GRACE_S.
            logged = table["max_memory_mb"].notna().all()
            if finished == len(keys) and not logged and time.monotonic() < deadline:
                deadline = min(deadline, time.monotonic() + LOG_GRACE_S)
            elif finished == len(keys) or time.monotonic() > deadline:
                print(f"{finished} of {len(keys)} runs finished")  # plain text for saved copies
                return table
            time.sleep(poll_s)


def write_status(table: pd.DataFrame, path: Path) -> Path:
    """Save the table as ``{"inputs": [{key, status, reason, duration_s, max_memory_mb}]}``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = json.loads(table.to_json(orient="records"))
    path.write_text(json.dumps({"inputs": rows}, indent=2))
    return path
