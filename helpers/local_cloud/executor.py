"""Run the deployed Lambda zip for real inside the local cloud.

moto emulates Lambda's control plane but runs function code only in Docker, which students
rarely have. :func:`install` replaces that runner, in the local cloud's server process, with
one that behaves like the Lambda service:

- the **same zip** that notebook 02 uploads is extracted into a fresh, read-only task
  directory and run by a fresh interpreter (``python -I -S``: no site-packages, so the zip
  must carry its own dependencies; boto3 is provided, as the Lambda runtime provides it),
  as an unprivileged user when the local cloud runs as root (:mod:`~.sandbox`);
- a clean environment with Lambda's own variables, the function's variables, the **execution
  role's temporary credentials** and ``AWS_ENDPOINT_URL``;
- the function's **timeout**, counted from the handler's call as on AWS (Init, the imports,
  has its own 10 s); **memory size** (resident memory, watched); on request, **ephemeral
  storage** and **CPU shares** (:mod:`~.aws_behaviour`);
- START / END / REPORT lines (Duration, Billed Duration, Memory Size, Max Memory Used) in
  the function's CloudWatch log group, with AWS's wording for timeouts, out-of-memory and
  Init errors;
- asynchronous events (S3 notifications, ``Invoke`` with ``InvocationType=Event``): the call
  returns at once, the function runs in the background within its reserved concurrency, a
  failed run is retried ``MaximumRetryAttempts`` times, an event older than
  ``MaximumEventAgeInSeconds`` is dropped (when AWS's clock is on), and then it is sent to
  the on-failure destination (an SQS queue);
- every event waiting or running is written to a journal under the state folder until its
  fate is known, so the events a stop cut short can be reported (``control.stop``).

Differences from AWS are listed in ``docs/local_cloud.md``.
"""
from __future__ import annotations

import json
import math
import os
import threading
import time
import uuid
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from helpers.local_cloud import moto_adapter, sandbox
from helpers.local_cloud.aws_behaviour import CURRENT as BEHAVIOUR
from helpers.local_cloud.moto_adapter import FunctionView
from helpers.local_cloud.sandbox import Environments, Limits, Outcome, now_ms

# Concurrency when the function has no reserved concurrency: this machine's cores.
DEFAULT_CONCURRENCY = max(os.cpu_count() or 1, 1)
STOP_GRACE_S = 10.0

_state: dict[str, Any] = {}
_stopping = threading.Event()


class Stopping(Exception):
    """The local cloud is stopping: the event is not run (its journal entry stays)."""


@dataclass
class Invocation:
    """What one run of the function did."""

    request_id: str
    payload: str = ""
    error_type: str | None = None
    duration_ms: float = 0.0
    max_memory_mb: int = 0
    log_lines: list[str] = field(default_factory=list)

    @property
    def errored(self) -> bool:
        return self.error_type is not None


def install(endpoint: str, journal_dir: Path, ca_bundle: Path) -> None:
    """Replace moto's Docker runner with this executor (call in the server process).

    Parameters
    ----------
    endpoint : str
        The local cloud's URL, handed to the function as ``AWS_ENDPOINT_URL``.
    journal_dir : Path
        A private folder for the journal of asynchronous events not yet settled (one
        JSON file per event: what :func:`helpers.local_cloud.control.stop` reports lost).
    ca_bundle : Path
        The local cloud's certificate, handed to the function as ``AWS_CA_BUNDLE``.
    """
    journal_dir.mkdir(mode=0o700, exist_ok=True)
    sandbox.become_subreaper()
    _state.update(endpoint=endpoint, journal=journal_dir, envs=Environments(ca_bundle),
                  threads=set())
    moto_adapter.install_hooks(_invoke_sync, _on_event)


def shutdown() -> None:
    """Stop: end every run in flight, run nothing more, remove every environment.

    Events that were waiting or running keep their journal entries.
    """
    _stopping.set()
    _THROTTLE.wake_all()
    sandbox.stop_all()
    deadline = time.monotonic() + STOP_GRACE_S
    for thread in list(_state.get("threads", ())):
        thread.join(timeout=max(deadline - time.monotonic(), 0))
    sandbox.end_leftovers()
    if "envs" in _state:
        _state["envs"].close()


def environments_root() -> Path:
    """The folder holding every execution environment of this server."""
    return _state["envs"].root


def _invoke_sync(fn: FunctionView, event: Any = None) -> tuple[str, bool, str]:
    """The ``Invoke`` API (synchronous): (payload, errored, logs)."""
    if isinstance(event, (str, bytes)):
        event = json.loads(event or "{}")
    with _THROTTLE.slot(fn):
        result = run(fn, event if event is not None else {})
    return result.payload, result.errored, "\n".join(result.log_lines)


def _on_event(fn: FunctionView, event: dict, source: str) -> None:
    """Asynchronous invocation: journal the event, return at once, run it in the background."""
    if source == "s3" and _moto_extra_put(event):
        return
    queued = _Queued(fn=fn, event=event, source=source)
    queued.record("queued")
    thread = threading.Thread(target=_invoke_async, args=(queued,), daemon=True)
    _state["threads"].add(thread)
    thread.start()


def _moto_extra_put(event: dict) -> bool:
    """True for the ``Put`` event moto sends besides ``CompleteMultipartUpload``.

    AWS sends one event per multipart upload; moto sends both. A multipart ETag ends in
    ``-<parts>``, which a plain PUT's never does.
    """
    record = event["Records"][0]
    return (record["eventName"] == "ObjectCreated:Put"
            and "-" in record["s3"]["object"].get("eTag", ""))


@dataclass
class _Queued:
    """An asynchronous event in Lambda's internal queue, with its journal entry."""

    fn: FunctionView
    event: dict
    source: str
    event_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    received: float = field(default_factory=time.monotonic)
    received_at: str = field(default_factory=lambda: _iso_now())
    attempts: int = 0

    @property
    def age_s(self) -> float:
        return time.monotonic() - self.received

    def record(self, stage: str) -> None:
        """Write (atomically) where the event is: queued, running, waiting to retry."""
        entry = {"event_id": self.event_id, "function": self.fn.name,
                 "function_arn": self.fn.arn, "source": self.source,
                 "received": self.received_at, "attempts": self.attempts, "stage": stage,
                 "event": self.event}
        path = _state["journal"] / f"{self.event_id}.json"
        partial = path.with_suffix(".partial")
        partial.write_text(json.dumps(entry))
        os.replace(partial, path)

    def settle(self) -> None:
        """Its fate is known (succeeded, or sent to the failure destination)."""
        (_state["journal"] / f"{self.event_id}.json").unlink(missing_ok=True)


def _invoke_async(queued: _Queued) -> None:
    """Run an event with AWS's asynchronous semantics: retries, age, failure destination."""
    try:
        _settle_async(queued)
    except Stopping:
        pass  # the journal entry stays: the next start reports the event as lost
    finally:
        _state["threads"].discard(threading.current_thread())


def _settle_async(queued: _Queued) -> None:
    fn = queued.fn
    config = fn.async_config
    attempts = 1 + int(config.get("MaximumRetryAttempts", 2))
    result = None
    for attempt in range(attempts):
        if attempt:
            queued.record("waiting to retry")
            delays = BEHAVIOUR.retry_delays_s()
            _sleep(delays[min(attempt - 1, len(delays) - 1)])
        with _THROTTLE.slot(fn):
            if _too_old(queued, config):
                _send_failure(queued, result, "EventAgeExceeded")
                return
            queued.attempts += 1
            queued.record("running")
            result = run(fn, queued.event)
        if not result.errored:
            queued.settle()
            return
        if _stopping.is_set():
            raise Stopping
    _send_failure(queued, result, "RetriesExhausted")


def _too_old(queued: _Queued, config: dict) -> bool:
    max_age = BEHAVIOUR.max_event_age_s(config)
    return max_age is not None and queued.age_s > max_age


def _sleep(seconds: float) -> None:
    if _stopping.wait(seconds):
        raise Stopping


class _Throttle:
    """At most the function's reserved concurrency (or the core count) runs at once."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._running: dict[str, int] = defaultdict(int)

    @contextmanager
    def slot(self, fn: FunctionView) -> Iterator[None]:
        arn = fn.arn
        with self._cond:
            while self._running[arn] >= _concurrency_cap(fn) and not _stopping.is_set():
                self._cond.wait()
            if _stopping.is_set():
                raise Stopping
            self._running[arn] += 1
        try:
            yield
        finally:
            with self._cond:
                self._running[arn] -= 1
                self._cond.notify_all()

    def wake_all(self) -> None:
        with self._cond:
            self._cond.notify_all()


_THROTTLE = _Throttle()


def _concurrency_cap(fn: FunctionView) -> int:
    reserved = fn.reserved_concurrency
    return DEFAULT_CONCURRENCY if reserved is None else max(reserved, 0)


def run(fn: FunctionView, event: Any) -> Invocation:
    """Run the function once on ``event`` in a fresh environment, and log it like Lambda.

    Parameters
    ----------
    fn : FunctionView
        The function as moto stores it (code, handler, timeout, memory, role, variables).
    event : dict
        The event.

    Returns
    -------
    Invocation
    """
    if _stopping.is_set():
        raise Stopping
    result = Invocation(request_id=str(uuid.uuid4()))
    stream = _log_stream_name(fn)
    envs: Environments = _state["envs"]
    request = {"event": event, "request_id": result.request_id, "timeout": fn.timeout_s}
    run_dir = envs.prepare(result.request_id, fn.code_bytes, request)
    # START is in the log while the run is going, as on AWS (a run in flight is visible)
    _write_logs(fn, stream, [(now_ms(), _start_line(fn, result.request_id))])
    try:
        env = _environment(fn, run_dir, stream, result.request_id)
        started = time.monotonic()
        outcome = sandbox.run_process(envs, run_dir, env, _limits(fn), result.request_id)
        result.duration_ms = (time.monotonic() - started) * 1000
        result.max_memory_mb = outcome.max_rss_mb
    finally:
        envs.remove(run_dir)
    _write_logs(fn, stream, _finish(fn, result, outcome)[1:])  # START is there already
    return result


def _start_line(fn: FunctionView, request_id: str) -> str:
    return f"START RequestId: {request_id} Version: {fn.version}"


def _limits(fn: FunctionView) -> Limits:
    """The run's limits: always timeout and memory; storage and CPU when AWS's are on."""
    return Limits(timeout_s=fn.timeout_s, memory_mb=fn.memory_mb,
                  ephemeral_mb=fn.ephemeral_mb if BEHAVIOUR.ephemeral_storage else None,
                  cpu_vcpus=(fn.memory_mb / sandbox.LAMBDA_MB_PER_VCPU
                             if BEHAVIOUR.cpu_shares else None))


def _finish(fn: FunctionView, result: Invocation, outcome: Outcome) -> list[tuple[int, str]]:
    """Set the payload and error type; return the log events (ms, line) Lambda would write."""
    rid = result.request_id
    lines = [(outcome.start_ms, _start_line(fn, rid)), *outcome.output]
    status = None  # the REPORT line's Status: timeout or error
    message = ""
    if outcome.timed_out:
        result.error_type, status = "Sandbox.Timedout", "timeout"
        message = f"Task timed out after {fn.timeout_s:.2f} seconds"
        lines.append((now_ms(), f"{_iso_now()} {rid} {message}"))
    elif outcome.out_of_memory:
        result.error_type, status = "Runtime.OutOfMemory", "error"
        message = "Runtime exited with error: signal: killed"
        lines.append((now_ms(), f"RequestId: {rid} Error: {message}"))
    elif outcome.storage_used_mb is not None:
        result.error_type, status = "Runtime.ExitError", "error"
        message = (f"Runtime exited with error: ephemeral storage exhausted: /tmp held "
                   f"{outcome.storage_used_mb} MB, more than the function's EphemeralStorage "
                   f"of {fn.ephemeral_mb} MB (on AWS the write fails: [Errno 28] No space "
                   "left on device)")
        lines.append((now_ms(), f"RequestId: {rid} Error: {message}"))
    elif outcome.result is not None:
        result.error_type = outcome.result.get("errorType")
        message = outcome.result.get("errorMessage", "")
        payload = outcome.result.get("payload") if "payload" in outcome.result else {
            k: v for k, v in outcome.result.items() if k not in ("phase", "initMs")}
        result.payload = json.dumps(payload)
        if outcome.result.get("phase") == "init":
            status = "error"
            lines.append(_init_report(outcome.result))
    else:
        result.error_type, status = "Runtime.ExitError", "error"
        why = "the local cloud stopped" if outcome.stopped else f"exit status {outcome.exit_code}"
        message = f"Runtime exited with error: {why}"
        lines.append((now_ms(), f"RequestId: {rid} Error: {message}"))
    if result.errored and not result.payload:
        result.payload = json.dumps({"errorType": result.error_type, "errorMessage": message})
    billed = int(fn.timeout_s * 1000) if outcome.timed_out else math.ceil(result.duration_ms)
    lines.append((now_ms(), f"END RequestId: {rid}"))
    report = (f"REPORT RequestId: {rid}\tDuration: {result.duration_ms:.2f} ms\t"
              f"Billed Duration: {billed} ms\tMemory Size: {fn.memory_mb} MB\t"
              f"Max Memory Used: {result.max_memory_mb} MB\t")
    if status:
        report += f"Status: {status}\tError Type: {_report_error_type(result.error_type)}"
    lines.append((now_ms(), report))
    result.log_lines = [text for _, text in lines]
    return lines


def _init_report(outcome: dict) -> tuple[int, str]:
    """The INIT_REPORT line of a failed Init, as the Lambda service writes it."""
    return (now_ms(), f"INIT_REPORT Init Duration: {outcome.get('initMs', 0.0):.2f} ms\t"
                      f"Phase: invoke\tStatus: error\t"
                      f"Error Type: {_report_error_type(outcome['errorType'])}")


def _report_error_type(error_type: str | None) -> str:
    """The service's error type: the runtime's own (``Runtime.*``, ``Sandbox.*``), else
    ``Runtime.Unknown`` (e.g. an exception raised while importing the handler)."""
    if error_type and error_type.startswith(("Runtime.", "Sandbox.")):
        return error_type
    return "Runtime.Unknown"


def _write_logs(fn: FunctionView, stream: str, events: list[tuple[int, str]]) -> None:
    """Write the invocation's lines to the function's log group, as the Lambda service does."""
    moto_adapter.write_log_events(fn, stream, events)


def _log_stream_name(fn: FunctionView) -> str:
    today = datetime.now(timezone.utc)
    return f"{today:%Y/%m/%d}/[{fn.version}]{uuid.uuid4().hex}"


def _environment(fn: FunctionView, run_dir: sandbox.RunDir, stream: str, rid: str) -> dict:
    """Lambda's environment: its reserved variables, the function's, the role's credentials."""
    creds = moto_adapter.role_credentials(fn, session_name=fn.name)
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "LANG": "en_US.UTF-8",
        "TZ": ":UTC",
        "TMPDIR": str(run_dir.scratch),
        "HOME": str(run_dir.scratch),
        "LAMBDA_TASK_ROOT": str(run_dir.task),
        "LAMBDA_RUNTIME_DIR": str(_state["envs"].runtime_dir),
        "_HANDLER": fn.handler,
        "AWS_EXECUTION_ENV": f"AWS_Lambda_{fn.runtime}",
        "AWS_LAMBDA_FUNCTION_NAME": fn.name,
        "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": str(fn.memory_mb),
        "AWS_LAMBDA_FUNCTION_VERSION": fn.version,
        "AWS_LAMBDA_FUNCTION_TIMEOUT": str(int(fn.timeout_s)),
        "AWS_LAMBDA_LOG_GROUP_NAME": fn.log_group,
        "AWS_LAMBDA_LOG_STREAM_NAME": stream,
        "AWS_LAMBDA_FUNCTION_ARN": fn.arn,
        "AWS_REQUEST_ID": rid,
        "AWS_REGION": fn.region,
        "AWS_DEFAULT_REGION": fn.region,
        "AWS_ENDPOINT_URL": _state["endpoint"],
        "AWS_CA_BUNDLE": str(_state["envs"].ca_bundle),
    }
    env.update(fn.environment)
    env.update(creds)
    env["AWS_REQUEST_ID"] = rid  # marks the run's processes (sandbox.end_leftovers)
    return env


def _send_failure(queued: _Queued, result: Invocation | None, condition: str) -> None:
    """Send a failed (or too old) asynchronous event to its SQS on-failure destination."""
    fn = queued.fn
    destination = (fn.async_config.get("DestinationConfig", {}).get("OnFailure", {})
                   .get("Destination"))
    if destination:
        record = {
            "version": "1.0",
            "timestamp": _iso_now(),
            "requestContext": {"requestId": result.request_id if result else queued.event_id,
                               "functionArn": fn.arn, "condition": condition,
                               "approximateInvokeCount": queued.attempts},
            "requestPayload": queued.event,
        }
        if result is not None:
            record["responseContext"] = {"statusCode": 200, "executedVersion": "$LATEST",
                                         "functionError": "Unhandled"}
            record["responsePayload"] = json.loads(result.payload) if result.payload else None
        moto_adapter.send_message(destination, json.dumps(record))
    queued.settle()


def _iso_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")[:-4] + "Z"
