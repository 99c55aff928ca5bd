"""The Lambda function: preprocess each uploaded fMRI run and write the results to S3.

S3 calls ``lambda_handler`` asynchronously for every object created under the input prefix
with the input suffix. For each record the function downloads the run to /tmp, runs the
engine (:mod:`fmri_preproc`: motion correction, smoothing, confounds), uploads the outputs
under the output prefix, and writes a completion marker ``<name>_done.json`` **last**, so a
reader who sees the marker sees a complete set. A run that cannot be processed gets a
readable ``<name>_error.json`` in the same place instead, and the function returns normally:
retrying a bad file cannot help. Inputs are never modified.

Output keys depend only on the input's name, so a repeated event or upload rewrites the
same objects: the same result, no duplicates. The execution role may only *write* the output
prefix (no read, list or delete), so the newer of ``_done.json`` and ``_error.json`` is
the input's current state.

Environment variables (set by notebook 02): ``OUTPUT_BUCKET``, ``OUTPUT_PREFIX``,
``INPUT_PREFIX``, ``INPUT_SUFFIX``, ``FWHM_MM``, ``MAX_INPUT_MB``.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import unquote_plus

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

import fmri_preproc

# Standard retry mode: transient S3 errors (5xx, throttling) are retried up to 5 times
# (6 attempts) with jittered exponential backoff.
s3 = boto3.client("s3", config=Config(retries={"max_attempts": 5, "mode": "standard"}))


def lambda_handler(event: dict, context: Any) -> dict:
    """Process every S3 record in the event; return one status per record."""
    return {"results": [process_object(bucket, key, size) for bucket, key, size in
                        s3_records(event)]}


def s3_records(event: dict) -> list[tuple[str, str, int]]:
    """(bucket, key, size) of each record. S3 URL-encodes keys in events: decode once, here."""
    return [(r["s3"]["bucket"]["name"], unquote_plus(r["s3"]["object"]["key"]),
             int(r["s3"]["object"].get("size", 0))) for r in event.get("Records", [])]


def process_object(bucket: str, key: str, size: int) -> dict:
    """Preprocess one run; write its outputs and marker, or its error record."""
    cfg = _config()
    name = fmri_preproc.output_name(key)
    base = f"{cfg['output_prefix']}{name}"
    _log("start", bucket=bucket, key=key, size=size)
    if not (key.startswith(cfg["input_prefix"]) and key.endswith(cfg["input_suffix"])):
        _log("skipped: outside the trigger's prefix/suffix", key=key)
        return {"key": key, "status": "skipped"}
    started = time.time()
    try:
        summary = _preprocess(bucket, key, size, base, cfg)
    except fmri_preproc.InputError as exc:
        _record_error(cfg["output_bucket"], base, bucket, key, exc, started)
        return {"key": key, "status": "failed", "reason": str(exc)}
    except Exception as exc:  # unexpected: record it, then let Lambda retry and report
        _record_error(cfg["output_bucket"], base, bucket, key, exc, started)
        raise
    marker = {"source": f"s3://{bucket}/{key}", "finished": _utc_now(),
              "duration_s": round(time.time() - started, 3), **summary}
    _put_json(cfg["output_bucket"], f"{base}_done.json", marker)
    _log("done", key=key, **summary)
    return {"key": key, "status": "processed"}


def _preprocess(bucket: str, key: str, size: int, base: str, cfg: dict) -> dict:
    """Download, check, run the engine and upload the outputs (marker not yet written)."""
    if size > cfg["max_input_mb"] * 2**20:
        raise fmri_preproc.InputError(
            f"{Path(key).name} is {size / 2**20:.1f} MB, over this function's limit of "
            f"{cfg['max_input_mb']:g} MB (MAX_INPUT_MB).",
            cause="The run is larger than the function is sized for.",
            action="Split the run, or raise MAX_INPUT_MB and the function's memory together.")
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / Path(key).name
        s3.download_file(bucket, key, str(local))
        fmri_preproc.check_input(local, max_bytes=cfg["max_input_mb"] * 2**20)
        outputs = fmri_preproc.preprocess(local, Path(tmp) / "out", fwhm=cfg["fwhm_mm"])
        local.unlink()  # free /tmp before uploading
        for kind in ("bold", "confounds", "sidecar"):
            path = Path(outputs[kind])
            s3.upload_file(str(path), cfg["output_bucket"], f"{cfg['output_prefix']}{path.name}")
    return {k: v for k, v in outputs.items() if k not in ("bold", "confounds", "sidecar")}


def _record_error(out_bucket: str, base: str, bucket: str, key: str, exc: Exception,
                  started: float) -> None:
    """Write ``<name>_error.json`` (what went wrong, likely cause, what to do) and log it."""
    permanent = isinstance(exc, fmri_preproc.InputError)
    what, cause, action = _explain(exc)
    record = {
        "source": f"s3://{bucket}/{key}",
        "error": what,
        "error_type": type(exc).__name__,
        "cause": cause,
        "action": action,
        "permanent": permanent,
        "finished": _utc_now(),
        "duration_s": round(time.time() - started, 3),
    }
    _log("failed", level="ERROR", key=key, error=what, permanent=permanent)
    try:
        _put_json(out_bucket, f"{base}_error.json", record)
    except Exception as write_exc:  # S3 itself failing: the log line above still tells
        _log("could not write the error record", level="ERROR", error=str(write_exc))


def _explain(exc: Exception) -> tuple[str, str, str]:
    """(what went wrong, the likely cause, what to do) for an error record."""
    if isinstance(exc, fmri_preproc.InputError):
        return exc.message, exc.cause, exc.action
    if isinstance(exc, (BotoCoreError, ClientError)):  # after the SDK's own retries
        return (str(exc), "S3 kept failing after several retries (an outage, throttling, "
                "or a missing permission).", "Nothing at first: Lambda retries the event. "
                "If the run stays failed, check the role's permissions and upload it again.")
    return (f"{type(exc).__name__}: {exc}", "An unexpected error in the function.",
            "See the function's log for the traceback.")


def _put_json(bucket: str, key: str, body: dict) -> None:
    s3.put_object(Bucket=bucket, Key=key, Body=json.dumps(body, indent=2).encode(),
                  ContentType="application/json")


def _config() -> dict:
    env = os.environ
    return {"output_bucket": env["OUTPUT_BUCKET"],
            "output_prefix": env.get("OUTPUT_PREFIX", "derivatives/"),
            "input_prefix": env.get("INPUT_PREFIX", ""),
            "input_suffix": env.get("INPUT_SUFFIX", ""),
            "fwhm_mm": float(env.get("FWHM_MM", "6")),
            "max_input_mb": float(env.get("MAX_INPUT_MB", "200"))}


def _log(message: str, level: str = "INFO", **fields: Any) -> None:
    """One JSON line per event: CloudWatch Logs Insights can query it on AWS."""
    print(json.dumps({"level": level, "message": message, **fields}, default=str), flush=True)


def _utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
