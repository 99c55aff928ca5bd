"""The Lambda function: preprocess each uploaded BOLD run and write BIDS derivatives to S3.

S3 calls :func:`lambda_handler` asynchronously for every ``*_bold.nii.gz`` created under the
input prefix. For each record the function first reads the run's header (a ranged GET)
and checks that the run fits its memory, /tmp and remaining time (:mod:`fmri_preproc.resources`: a run
that cannot fit gets a permanent error naming the setting to raise); it then downloads
**the exact object version the event names** (``IfMatch`` its ETag), reads the run's BIDS
sidecar (with the dataset-level ``task-<label>_bold.json`` it inherits), runs the engine
(:mod:`fmri_preproc`), uploads the outputs to ``<output prefix><run folder>/`` with
fMRIPrep's names, and writes the completion marker ``<run>_done.json`` **last**: a reader who
sees the marker sees a complete set. A run that fails gets ``<run>_error.json`` (what went
wrong, the likely cause, what to do). Names come from :mod:`fmri_preproc.contract`.

- **One current state per input.** A success removes the run's old error record; a failure
  removes its old marker and outputs, which no longer describe the input.
- **The latest upload wins.** Before every write the function checks that the input is still
  the version it was triggered for; if a newer upload replaced it, this run stops without
  writing (log event ``superseded``): the newer upload's own run writes the outputs.
- **Permanent or transient** (:func:`classify`, the one place that decides): bad inputs, a
  missing object, an archived object and names too long are permanent (a record, no retry);
  S3 outages and throttling are transient (a record marked ``permanent: false``, then the
  exception, so that Lambda retries the event).

Configuration comes from environment variables only (set from one source,
``helpers.cloud.deploy.function_configuration``); the function refuses to start without them.
Inputs are never modified.
"""
from __future__ import annotations

import errno
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote_plus

import boto3
from botocore.config import Config as BotoConfig
from botocore.exceptions import BotoCoreError, ClientError

import fmri_preproc
from fmri_preproc import resources
from fmri_preproc.contract import (OUTPUTS, LogEvent, Record, Run, dataset_files, input_problem,
                                   run_from_key)

# Standard retry mode: transient S3 errors (5xx, throttling) are retried up to 5 times
# (6 attempts) with jittered exponential backoff.
s3 = boto3.client("s3", config=BotoConfig(retries={"max_attempts": 5, "mode": "standard"}))


@dataclass(frozen=True)
class Config:
    """The function's settings, from its environment variables."""

    output_bucket: str
    output_prefix: str
    input_prefix: str
    fwhm_mm: float
    max_input_mb: float
    ephemeral_mb: float | None = None        # the function's EphemeralStorage, if stated
    repetition_time_s: float | None = None   # a TR stated by the user: wins over the files
    size_check: bool = True                  # SIZE_CHECK=off: no check before the download

    VARIABLES = ("OUTPUT_BUCKET", "OUTPUT_PREFIX", "INPUT_PREFIX", "FWHM_MM", "MAX_INPUT_MB")
    OPTIONAL = ("EPHEMERAL_STORAGE_MB", "REPETITION_TIME_S")

    @classmethod
    def from_environment(cls, env=os.environ) -> "Config":
        """Read the settings; raise RuntimeError naming every missing (or empty) variable.

        None may be empty: an empty INPUT_PREFIX would accept any key in the bucket.
        """
        missing = [name for name in cls.VARIABLES if not env.get(name, "").strip()]
        if missing:
            raise RuntimeError(
                f"The function is missing environment variable(s) {', '.join(missing)}. "
                "Deploy it with helpers.cloud.deploy.function_configuration (notebook 02), "
                "which sets them all.")
        optional = {name: float(env[name]) if env.get(name, "").strip() else None
                    for name in cls.OPTIONAL}
        return cls(output_bucket=env["OUTPUT_BUCKET"], output_prefix=env["OUTPUT_PREFIX"],
                   input_prefix=env["INPUT_PREFIX"], fwhm_mm=float(env["FWHM_MM"]),
                   max_input_mb=float(env["MAX_INPUT_MB"]),
                   ephemeral_mb=optional["EPHEMERAL_STORAGE_MB"],
                   repetition_time_s=optional["REPETITION_TIME_S"],
                   size_check=env.get("SIZE_CHECK", "on").strip().lower() != "off")


CONFIG = Config.from_environment()  # at import: a misconfigured function never starts


@dataclass
class S3Object:
    """One record of an S3 event: the object version the event is about."""

    bucket: str
    key: str
    size: int
    etag: str | None
    version_id: str | None
    last_modified: str | None = None  # once read: identifies the upload with the ETag

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


class Superseded(Exception):
    """A newer upload replaced the input while this run was processing it."""


@dataclass(frozen=True)
class Failure:
    """How a failed run is recorded: the three things a person needs, and whether to retry."""

    permanent: bool
    what: str
    cause: str
    action: str


def lambda_handler(event: dict, context: Any) -> dict:
    """Process every S3 record in the event; return one status per record."""
    return {"results": [process_object(obj, context) for obj in s3_records(event)]}


def s3_records(event: dict) -> list[S3Object]:
    """The objects of an S3 event. S3 URL-encodes keys in events: decoded once, here.

    ``eTag`` is always present; ``versionId`` only when the bucket has versioning on.
    """
    objects = []
    for record in event.get("Records", []):
        s3_part = record["s3"]
        obj = s3_part["object"]
        objects.append(S3Object(s3_part["bucket"]["name"], unquote_plus(obj["key"]),
                                int(obj.get("size", 0)), _etag(obj.get("eTag")),
                                obj.get("versionId") or None))
    return objects


def process_object(obj: S3Object, context: Any = None) -> dict:
    """Preprocess one run; write its outputs and marker, or its error record."""
    relative = obj.key.removeprefix(CONFIG.input_prefix)
    problem = input_problem(obj.key) if obj.key.startswith(CONFIG.input_prefix) else \
        f"{obj.key} is outside the input prefix {CONFIG.input_prefix}"
    if problem:
        _log(LogEvent.SKIPPED, key=obj.key, reason=problem)
        return {"key": obj.key, "status": "skipped", "reason": problem}
    run = run_from_key(relative)
    _log(LogEvent.START, key=obj.key, run=run.id, etag=obj.etag, size=obj.size)
    started = time.time()
    try:
        result = _preprocess(obj, run, context)
    except Superseded:
        _log(LogEvent.SUPERSEDED, key=obj.key, etag=obj.etag)
        return {"key": obj.key, "status": "superseded"}
    except Exception as exc:
        failure = classify(exc)
        _record_error(obj, run, exc, failure, started)
        if failure.permanent:
            return {"key": obj.key, "status": "failed", "reason": failure.what}
        raise  # transient: Lambda retries the event, then sends it to the failure queue
    marker = {**_source(obj), Record.FINISHED: _utc_now(),
              Record.DURATION_S: round(time.time() - started, 3),
              Record.WARNINGS: result.summary.get("warnings", []), **result.summary}
    _put_current(obj, _key(run.done), json.dumps(marker, indent=2).encode())
    _delete(_key(run.error))
    _log(LogEvent.DONE, key=obj.key, run=run.id, **result.summary)
    return {"key": obj.key, "status": "processed"}


def _preprocess(obj: S3Object, run: Run, context: Any):
    """Check the run fits, download the pinned version, run the engine, upload the outputs
    (no marker yet)."""
    if obj.size > CONFIG.max_input_mb * 2**20:
        raise fmri_preproc.InputError(
            f"{Path(obj.key).name} is {obj.size / 2**20:.1f} MB, over this function's limit "
            f"of {CONFIG.max_input_mb:g} MB (MAX_INPUT_MB).",
            cause="The run is larger than the function is sized for.",
            action="Split the run, or raise MAX_INPUT_MB and the function's memory together.")
    with tempfile.TemporaryDirectory() as tmp:
        if CONFIG.size_check:
            _check_fits(obj, tmp, context)  # from the header alone, before the download
        sidecar = _read_sidecar(obj, run)
        # Fixed local names, whatever the key: a long key never makes a name too long for
        # /tmp. Outputs are uploaded by kind, under the run's own names.
        local = Path(tmp) / "input_bold.nii.gz"
        _download_pinned(obj, local)
        result = fmri_preproc.preprocess(local, Path(tmp) / "out", fwhm=CONFIG.fwhm_mm,
                                         max_bytes=int(CONFIG.max_input_mb * 2**20),
                                         work_dir=tmp, sidecar=sidecar,
                                         tr_override=CONFIG.repetition_time_s)
        local.unlink()  # free /tmp before uploading
        _write_dataset_files(obj)
        for kind, path in result.outputs.items():
            _upload_current(obj, path, _key(run.path(kind)))
        for kind in OUTPUTS.keys() - result.outputs.keys():  # from an earlier configuration
            _delete(_key(run.path(kind)))
    return result


# ------------------------------------------------------------------------------------------
# Before the download: does the run fit, and what does its sidecar say


def _check_fits(obj: S3Object, tmp: str, context: Any) -> None:
    """Compare what the run needs (from its header: a ranged GET) with this function's memory,
    free /tmp and remaining time; raise :class:`fmri_preproc.resources.RunTooLarge` if it
    cannot fit. Inputs whose first bytes are no NIfTI header are left to the engine, which
    explains what is wrong with them."""
    shape = _header_shape(obj)
    if shape is None:
        return
    memory_mb = int(os.environ.get("AWS_LAMBDA_FUNCTION_MEMORY_SIZE") or 0) or math.inf
    tmp_free_mb = shutil.disk_usage(tmp).free / 2**20
    if CONFIG.ephemeral_mb:  # what this function's /tmp holds, even where the disk is larger
        # (a warm environment's /tmp may still hold an earlier invocation's files)
        tmp_free_mb = min(tmp_free_mb, CONFIG.ephemeral_mb - _used_mb(tempfile.gettempdir()))
    remaining_s = context.get_remaining_time_in_millis() / 1000 \
        if hasattr(context, "get_remaining_time_in_millis") else math.inf
    need = resources.check_fits(shape, name=Path(obj.key).name, memory_mb=memory_mb,
                                tmp_free_mb=tmp_free_mb, remaining_s=remaining_s,
                                input_bytes=obj.size, smoothed=CONFIG.fwhm_mm > 0)
    _log("fits", key=obj.key, run_shape=str(shape), needs_memory_mb=round(need.memory_mb),
         needs_tmp_mb=round(need.tmp_mb), needs_s=round(need.seconds), memory_mb=memory_mb,
         tmp_free_mb=round(tmp_free_mb), remaining_s=round(remaining_s))


def _header_shape(obj: S3Object):
    """The run's shape from its first bytes (pinned like the download), or None."""
    if obj.size < 348 or not obj.key.endswith(".gz"):
        return None
    pinned = {"IfMatch": f'"{obj.etag}"'} if obj.etag else {}
    if obj.version_id:
        pinned["VersionId"] = obj.version_id
    start = s3.get_object(Bucket=obj.bucket, Key=obj.key,
                          Range=f"bytes=0-{resources.HEADER_BYTES - 1}", **pinned)["Body"].read()
    try:
        return resources.shape_from_header_bytes(start)
    except Exception:  # not gzip, not NIfTI, not 4D: the engine's checks say which
        return None


def _used_mb(folder: str) -> float:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file()) / 2**20


def _read_sidecar(obj: S3Object, run: Run) -> dict:
    """The run's BIDS sidecar with inheritance: the dataset-level ``task-<label>_bold.json``
    (at the dataset's root), then the run's own ``<name>_bold.json``, later keys winning
    (BIDS inheritance principle). Missing files are fine: the header's TR is used then.

    A missing key answers 404, or 403 when the role may not list the bucket (as here: it
    may only GetObject under the input prefix), so both mean "no sidecar there".
    """
    merged: dict = {}
    for key in _sidecar_keys(run):
        try:
            body = s3.get_object(Bucket=obj.bucket, Key=CONFIG.input_prefix + key)["Body"].read()
        except ClientError as exc:
            if _error_code(exc) in ("404", "NoSuchKey", "NotFound", "403", "AccessDenied"):
                continue
            raise
        try:
            document = json.loads(body)
            if not isinstance(document, dict):
                raise ValueError("not a JSON object")
        except ValueError as exc:
            raise fmri_preproc.InputError(
                f"The sidecar {key} is not valid JSON ({exc}).",
                cause="The file was edited by hand or cut off during the upload.",
                action="Fix the JSON (e.g. check it with `python -m json.tool`) and upload the "
                       "sidecar, then the run, again.") from exc
        merged.update(document)
    return merged


def _sidecar_keys(run: Run) -> list[str]:
    """Sidecar keys relative to the input root, least specific first."""
    own = run.sidecar_key()
    parts = own.split("/")
    subject = f"sub-{run.source.get('sub')}"
    root = "/".join(parts[:parts.index(subject)]) if subject in parts[:-1] else \
        "/".join(parts[:-1])  # a flat key: the dataset root is its own folder
    task = run.source.get("task")
    keys = []
    if task:
        name = f"task-{task}_{run.source.suffix}.json"
        keys.append(f"{root}/{name}" if root else name)
    return [key for key in keys if key != own] + [own]


def classify(exc: BaseException) -> Failure:
    """Permanent (a clear record, no retry) or transient (retried), with what/cause/action.

    The one place that decides. Permanent: bad inputs (:class:`fmri_preproc.InputError`), an
    input deleted or replaced before it could be read (404, 412), an archived object
    (``InvalidObjectState``), a missing permission, names too long for the file system, and
    running out of memory. Everything else from S3 (5xx, throttling, timeouts) is transient.
    """
    if isinstance(exc, fmri_preproc.InputError):
        return Failure(True, exc.message, exc.cause, exc.action)
    code = _error_code(exc)
    if code in ("404", "NoSuchKey", "NotFound", "NoSuchVersion"):
        return Failure(True, f"The input is gone: {exc}", "It was deleted (or overwritten) "
                       "right after the upload, before the function could read it.",
                       "Upload the run again.")
    if code in ("412", "PreconditionFailed"):
        return Failure(True, f"The input changed while it was being read: {exc}",
                       "A newer upload replaced it; that upload is processed on its own.",
                       "Nothing: wait for the newer upload's result.")
    if code == "InvalidObjectState":
        return Failure(True, f"The input is archived: {exc}", "The object is in an archive "
                       "storage class (Glacier / Deep Archive) and cannot be read directly.",
                       "Restore it (restore_object) or copy it to S3 Standard, then upload "
                       "it again.")
    if code in ("403", "AccessDenied", "AllAccessDisabled"):
        return Failure(True, f"Access denied: {exc}", "The function's role may not read the "
                       "input or write the output (its policy, or a bucket policy).",
                       "Check the role's policy (notebook 01) and the buckets' policies.")
    if isinstance(exc, OSError) and exc.errno == errno.ENAMETOOLONG:
        return Failure(True, f"A name is too long: {exc}", "The key's file name is longer "
                       "than the file system allows (255 bytes).",
                       "Upload the run under a shorter name.")
    if isinstance(exc, MemoryError):
        return Failure(True, "The run did not fit in the function's memory.",
                       "The function's MemorySize is too small for this run.",
                       "Raise the function's memory (notebook 02) and upload the run again.")
    if isinstance(exc, (BotoCoreError, ClientError)):
        return Failure(False, str(exc), "S3 kept failing after several retries (an outage or "
                       "throttling).", "Nothing at first: Lambda retries the event. If the run "
                       "stays failed, upload it again.")
    return Failure(False, f"{type(exc).__name__}: {exc}", "An unexpected error in the function.",
                   "See the function's log for the traceback; Lambda retries the event.")


def _error_code(exc: BaseException) -> str | None:
    if isinstance(exc, ClientError):
        return str(exc.response.get("Error", {}).get("Code"))
    return None


def _record_error(obj: S3Object, run: Run, exc: Exception, failure: Failure,
                  started: float) -> None:
    """Write ``<run>_error.json`` and remove the older result it replaces; log it."""
    record = {**_source(obj), Record.ERROR: failure.what,
              Record.ERROR_TYPE: type(exc).__name__, Record.CAUSE: failure.cause,
              Record.ACTION: failure.action, Record.PERMANENT: failure.permanent,
              Record.FINISHED: _utc_now(), Record.DURATION_S: round(time.time() - started, 3)}
    _log(LogEvent.FAILED, level="ERROR", key=obj.key, error=failure.what,
         permanent=failure.permanent)
    try:
        if failure.permanent:  # it deletes the old result: only for the latest upload
            _still_current(obj)
        s3.put_object(Bucket=CONFIG.output_bucket, Key=_key(run.error),
                      Body=json.dumps(record, indent=2).encode(), ContentType="application/json")
        if failure.permanent:
            for target in [run.done, *(run.path(kind) for kind in OUTPUTS)]:
                _delete(_key(target))  # the old result no longer describes the input
    except Superseded:
        _log(LogEvent.SUPERSEDED, key=obj.key, etag=obj.etag)
    except Exception as write_exc:  # S3 itself failing: the log line above still tells
        _log("could not write the error record", level="ERROR", error=str(write_exc))


def _write_dataset_files(obj: S3Object) -> None:
    """The derivatives dataset's own files (the same bytes every time: idempotent)."""
    files = dataset_files(fmri_preproc.__version__,
                          source_url=f"s3://{obj.bucket}/{CONFIG.input_prefix}")
    for name, text in files.items():
        kind = {"ContentType": "application/json"} if name.endswith(".json") else {}
        s3.put_object(Bucket=CONFIG.output_bucket, Key=_key(name), Body=text.encode(), **kind)


def _download_pinned(obj: S3Object, path: Path) -> None:
    """Stream the event's own version of the object to ``path`` (412 if it was replaced)."""
    pinned = {"IfMatch": f'"{obj.etag}"'} if obj.etag else {}
    if obj.version_id:
        pinned["VersionId"] = obj.version_id
    response = s3.get_object(Bucket=obj.bucket, Key=obj.key, **pinned)
    obj.last_modified = response["LastModified"].isoformat()
    with open(path, "wb") as out:
        for chunk in response["Body"].iter_chunks(8 * 2**20):
            out.write(chunk)


def _etag(value: str | None) -> str | None:
    """An ETag without quotes (events omit them, HeadObject includes them)."""
    return value.strip('"') if value else None


def _still_current(obj: S3Object) -> None:
    """Raise :class:`Superseded` if the input is no longer the version this run processes."""
    if not obj.etag:
        return
    try:
        head = s3.head_object(Bucket=obj.bucket, Key=obj.key)
    except ClientError as exc:
        if _error_code(exc) in ("404", "NoSuchKey", "NotFound"):
            return  # deleted since, not replaced: this run's record is the latest word
        raise
    same = (head.get("VersionId") == obj.version_id) if obj.version_id else \
        (_etag(head.get("ETag")) == obj.etag)
    if not same:
        raise Superseded()


def _upload_current(obj: S3Object, path: Path, key: str) -> None:
    _still_current(obj)
    s3.upload_file(str(path), CONFIG.output_bucket, key)


def _put_current(obj: S3Object, key: str, body: bytes) -> None:
    _still_current(obj)
    s3.put_object(Bucket=CONFIG.output_bucket, Key=key, Body=body,
                  ContentType="application/json")


def _delete(key: str) -> None:
    """Delete an output object (S3 answers success when it does not exist)."""
    s3.delete_object(Bucket=CONFIG.output_bucket, Key=key)


def _key(relative: str) -> str:
    return f"{CONFIG.output_prefix}{relative}"


def _source(obj: S3Object) -> dict:
    return {Record.SOURCE: obj.url, Record.ETAG: obj.etag, Record.VERSION_ID: obj.version_id,
            Record.INPUT_LAST_MODIFIED: obj.last_modified}


def _log(message: str, level: str = "INFO", **fields: Any) -> None:
    """One JSON line per event: CloudWatch Logs Insights can query it on AWS."""
    print(json.dumps({"level": level, "message": message, **fields}, default=str), flush=True)


def _utc_now() -> str:
    now = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"
