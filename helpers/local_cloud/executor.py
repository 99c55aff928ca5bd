"""Run the deployed Lambda zip for real inside the local cloud.

moto emulates Lambda's control plane but runs function code only in Docker, which students
rarely have. :func:`install` replaces that runner, in the local cloud's server process, with
one that behaves like the Lambda service:

- the **same zip** that notebook 02 uploads is extracted into a task directory and run by a
  fresh interpreter (``python -I -S``: no site-packages, so the zip must carry its own
  dependencies; boto3 is provided, as the Lambda runtime provides it);
- a clean environment with Lambda's own variables, the function's variables, the **execution
  role's temporary credentials** and ``AWS_ENDPOINT_URL``;
- the function's **timeout**, counted from the handler's call as on AWS (Init, the imports,
  has its own 10 s), the process group is then killed; and **memory size** (enforced by
  watching resident memory; ``setrlimit`` breaks numpy's import);
- START / END / REPORT lines (Duration, Billed Duration, Memory Size, Max Memory Used) in
  the function's CloudWatch log group, with AWS's wording for timeouts and out-of-memory;
- S3-triggered invocations are asynchronous: the upload returns at once, the function runs
  in the background within its reserved concurrency, a failed run is retried
  ``MaximumRetryAttempts`` times and then sent to the on-failure destination (an SQS queue).

Differences from AWS are listed in the README ("Local cloud vs AWS").
"""
from __future__ import annotations

import io
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import zipfile
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import import_module
from pathlib import Path
from typing import Any, Iterator

import psutil

from helpers.local_cloud import moto_adapter
from helpers.local_cloud.moto_adapter import FunctionView

BOOTSTRAP = Path(__file__).with_name("bootstrap.py")
# What the Lambda Python runtime provides besides the standard library.
RUNTIME_PACKAGES = ("boto3", "botocore", "s3transfer", "jmespath", "dateutil", "urllib3", "six")
# Concurrency when the function has no reserved concurrency: this machine's cores.
DEFAULT_CONCURRENCY = max(os.cpu_count() or 1, 1)
POLL_S = 0.01
# As on AWS, the Init phase (importing the handler) may take up to 10 s; the function's
# timeout runs from the handler's call (a slower Init is retried within the timeout).
INIT_LIMIT_S = 10.0
RETRY_DELAYS_S = (1.0, 2.0)  # AWS waits about 1 and 2 minutes; locally we do not.

_state: dict[str, Any] = {}


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


def install(endpoint: str, work_dir: Path, ca_bundle: Path) -> None:
    """Replace moto's Docker runner with this executor (call in the server process).

    Parameters
    ----------
    endpoint : str
        The local cloud's URL, handed to the function as ``AWS_ENDPOINT_URL``.
    work_dir : Path
        Where task directories (extracted zips) and the runtime directory go.
    ca_bundle : Path
        The local cloud's certificate, handed to the function as ``AWS_CA_BUNDLE``.
    """
    work_dir.mkdir(parents=True, exist_ok=True)
    _state.update(endpoint=endpoint, work_dir=work_dir, ca_bundle=ca_bundle,
                  runtime_dir=_runtime_dir(work_dir))
    moto_adapter.install_hooks(_invoke_sync, _invoke_from_s3)


def _invoke_sync(fn: FunctionView, event: Any = None) -> tuple[str, bool, str]:
    """The ``Invoke`` API (synchronous): (payload, errored, logs)."""
    with _THROTTLE.slot(fn):
        result = run(fn, event if event is not None else {})
    return result.payload, result.errored, "\n".join(result.log_lines)


def _invoke_from_s3(fn: FunctionView, event_body: dict) -> None:
    """S3 notifications are asynchronous on AWS: queue the event and return at once."""
    if _moto_extra_put(event_body):
        return
    threading.Thread(target=_invoke_async, args=(fn, event_body), daemon=True).start()


def _moto_extra_put(event: dict) -> bool:
    """True for the ``Put`` event moto sends besides ``CompleteMultipartUpload``.

    AWS sends one event per multipart upload; moto sends both. A multipart ETag ends in
    ``-<parts>``, which a plain PUT's never does.
    """
    record = event["Records"][0]
    return (record["eventName"] == "ObjectCreated:Put"
            and "-" in record["s3"]["object"].get("eTag", ""))


def _invoke_async(fn: FunctionView, event: dict) -> None:
    """Run an event with AWS's asynchronous semantics: retries, then the failure destination."""
    config = fn.async_config
    attempts = 1 + int(config.get("MaximumRetryAttempts", 2))
    for attempt in range(attempts):
        with _THROTTLE.slot(fn):
            result = run(fn, event)
        if not result.errored:
            return
        if attempt + 1 < attempts:
            time.sleep(RETRY_DELAYS_S[min(attempt, len(RETRY_DELAYS_S) - 1)])
    destination = config.get("DestinationConfig", {}).get("OnFailure", {}).get("Destination")
    if destination:
        _send_failure(fn, destination, event, result, attempts)


class _Throttle:
    """At most the function's reserved concurrency (or the core count) runs at once."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._running: dict[str, int] = defaultdict(int)

    @contextmanager
    def slot(self, fn: FunctionView) -> Iterator[None]:
        arn = fn.arn
        with self._cond:
            while self._running[arn] >= _concurrency_cap(fn):
                self._cond.wait()
            self._running[arn] += 1
        try:
            yield
        finally:
            with self._cond:
                self._running[arn] -= 1
                self._cond.notify_all()


_THROTTLE = _Throttle()


def _concurrency_cap(fn: FunctionView) -> int:
    reserved = fn.reserved_concurrency
    return DEFAULT_CONCURRENCY if reserved is None else max(reserved, 0)


def run(fn: FunctionView, event: Any) -> Invocation:
    """Run the function once on ``event`` in a fresh interpreter, and log it like Lambda.

    Parameters
    ----------
    fn : FunctionView
        The function as moto stores it (code, handler, timeout, memory, role, variables).
    event : dict or str
        The event; a JSON string is decoded first.

    Returns
    -------
    Invocation
    """
    if isinstance(event, (str, bytes)):
        event = json.loads(event or "{}")
    result = Invocation(request_id=str(uuid.uuid4()))
    stream = _log_stream_name(fn)
    control = Path(tempfile.mkdtemp(prefix="lambda-control-"))
    scratch = Path(tempfile.mkdtemp(prefix="lambda-tmp-"))  # the function's /tmp
    try:
        task_root = _task_root(fn)
        env = _environment(fn, task_root, scratch, stream, result.request_id)
        (control / "event.json").write_text(json.dumps(
            {"event": event, "request_id": result.request_id, "timeout": fn.timeout_s}))
        started = time.monotonic()
        output, status = _run_process(fn, env, task_root, control)
        result.duration_ms = (time.monotonic() - started) * 1000
        result.max_memory_mb = status["max_rss_mb"]
        events = _finish(fn, result, control, output, status)
    finally:
        shutil.rmtree(control, ignore_errors=True)
        shutil.rmtree(scratch, ignore_errors=True)
    _write_logs(fn, stream, events)
    return result


def _run_process(fn: FunctionView, env: dict, task_root: Path, control: Path) -> tuple[list, dict]:
    """Start the bootstrap, enforce timeout and memory, collect output lines with times."""
    proc = subprocess.Popen(
        [sys.executable, "-I", "-S", "-u", str(BOOTSTRAP), str(control)], cwd=task_root, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        start_new_session=True)
    output: list[tuple[int, str]] = []
    reader = threading.Thread(target=_read_lines, args=(proc.stdout, output), daemon=True)
    reader.start()
    limit_bytes = fn.memory_mb * 1024 * 1024
    init_deadline = time.monotonic() + INIT_LIMIT_S
    deadline = None  # set when the bootstrap has imported the handler and calls it
    status = {"timed_out": False, "out_of_memory": False, "max_rss_mb": 0,
              "start_ms": _now_ms()}
    peak = 0
    while True:
        pid, wait_status = os.waitpid(proc.pid, os.WNOHANG)
        if pid:
            status["exit_code"] = os.waitstatus_to_exitcode(wait_status)
            proc.returncode = status["exit_code"]
            break
        peak = max(peak, _tree_rss(proc.pid))
        if deadline is None and (control / "invoked").exists():
            deadline = time.monotonic() + fn.timeout_s
        if peak > limit_bytes:
            status["out_of_memory"] = True
        elif time.monotonic() > (deadline or init_deadline + fn.timeout_s):
            status["timed_out"] = True
        if status["out_of_memory"] or status["timed_out"]:
            _kill_group(proc.pid)
        time.sleep(POLL_S)
    reader.join(timeout=5)
    status["max_rss_mb"] = math.ceil(peak / 2**20)
    if status["out_of_memory"]:
        status["max_rss_mb"] = min(status["max_rss_mb"], fn.memory_mb)
    return output, status


def _read_lines(stream: Any, out: list) -> None:
    for raw in iter(stream.readline, b""):
        out.append((_now_ms(), raw.decode("utf-8", "replace").rstrip("\n")))
    stream.close()


def _tree_rss(pid: int) -> int:
    """Peak resident memory of a process plus its children's current, in bytes (0 once gone).

    On Linux the kernel's high-water mark (VmHWM) catches peaks between two polls.
    (``ru_maxrss`` from wait4 would not do: it counts the server's memory copied at fork.)
    """
    try:
        proc = psutil.Process(pid)
        own = proc.memory_info().rss
        try:
            with open(f"/proc/{pid}/status") as status:
                hwm = next(line for line in status if line.startswith("VmHWM:"))
            own = max(own, int(hwm.split()[1]) * 1024)
        except (OSError, StopIteration):
            pass  # not Linux: polled RSS only
        return own + sum(p.memory_info().rss for p in proc.children(recursive=True))
    except psutil.Error:
        return 0


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _finish(fn: FunctionView, result: Invocation, control: Path, output: list,
            status: dict) -> list[tuple[int, str]]:
    """Set the payload and error type; return the log events (ms, line) Lambda would write."""
    rid = result.request_id
    lines = [(status["start_ms"], f"START RequestId: {rid} Version: {fn.version}"), *output]
    outcome_file = control / "result.json"
    if status["timed_out"]:
        result.error_type = "Sandbox.Timedout"
        message = f"Task timed out after {fn.timeout_s:.2f} seconds"
        lines.append((_now_ms(), f"{_iso_now()} {rid} {message}"))
    elif status["out_of_memory"]:
        result.error_type = "Runtime.OutOfMemory"
        message = "Runtime exited with error: signal: killed"
        lines.append((_now_ms(), f"RequestId: {rid} Error: {message}"))
    elif outcome_file.exists():
        outcome = json.loads(outcome_file.read_text())
        result.error_type = outcome.get("errorType")
        message = outcome.get("errorMessage", "")
        result.payload = json.dumps(outcome["payload"] if "payload" in outcome else outcome)
    else:
        result.error_type = "Runtime.ExitError"
        message = f"Runtime exited with error: exit status {status.get('exit_code')}"
        lines.append((_now_ms(), f"RequestId: {rid} Error: {message}"))
    if result.errored and not result.payload:
        result.payload = json.dumps({"errorType": result.error_type, "errorMessage": message})
    billed = math.ceil(result.duration_ms)
    if status["timed_out"]:
        billed = int(fn.timeout_s * 1000)
    lines.append((_now_ms(), f"END RequestId: {rid}"))
    report = (f"REPORT RequestId: {rid}\tDuration: {result.duration_ms:.2f} ms\t"
              f"Billed Duration: {billed} ms\tMemory Size: {fn.memory_mb} MB\t"
              f"Max Memory Used: {result.max_memory_mb} MB\t")
    if status["timed_out"] or status["out_of_memory"]:
        report += f"Status: {'timeout' if status['timed_out'] else 'error'}\t"
        report += f"Error Type: {result.error_type}"
    lines.append((_now_ms(), report))
    result.log_lines = [text for _, text in lines]
    return lines


def _write_logs(fn: FunctionView, stream: str, events: list[tuple[int, str]]) -> None:
    """Write the invocation's lines to the function's log group, as the Lambda service does."""
    moto_adapter.write_log_events(fn, stream, events)


def _log_stream_name(fn: FunctionView) -> str:
    today = datetime.now(timezone.utc)
    return f"{today:%Y/%m/%d}/[{fn.version}]{uuid.uuid4().hex}"


def _environment(fn: FunctionView, task_root: Path, scratch: Path, stream: str, rid: str) -> dict:
    """Lambda's environment: its reserved variables, the function's, the role's credentials."""
    creds = moto_adapter.role_credentials(fn, session_name=fn.name)
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "LANG": "en_US.UTF-8",
        "TZ": ":UTC",
        "TMPDIR": str(scratch),
        "HOME": str(scratch),
        "LAMBDA_TASK_ROOT": str(task_root),
        "LAMBDA_RUNTIME_DIR": str(_state["runtime_dir"]),
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
        "AWS_CA_BUNDLE": str(_state["ca_bundle"]),
    }
    env.update(fn.environment)
    env.update(creds)
    return env


def _task_root(fn: FunctionView) -> Path:
    """The zip extracted once per code version, like Lambda's /var/task (read-only)."""
    root = _state["work_dir"] / fn.code_sha256.replace("/", "_").replace("+", "-")
    if not root.exists():
        partial = Path(tempfile.mkdtemp(dir=_state["work_dir"], prefix="extracting-"))
        with zipfile.ZipFile(io.BytesIO(fn.code_bytes)) as archive:
            archive.extractall(partial)
        try:
            partial.rename(root)
        except OSError:  # another invocation extracted it first
            shutil.rmtree(partial, ignore_errors=True)
    return root


def _runtime_dir(work_dir: Path) -> Path:
    """A directory holding what the Lambda runtime provides (boto3 and its dependencies)."""
    runtime = work_dir / "runtime"
    runtime.mkdir(exist_ok=True)
    for name in RUNTIME_PACKAGES:
        module = import_module(name)
        source = Path(module.__file__)
        source = source.parent if source.name == "__init__.py" else source
        link = runtime / source.name
        if not link.exists():
            link.symlink_to(source)
    return runtime


def _send_failure(fn: FunctionView, destination: str, event: dict, result: Invocation,
                  attempts: int) -> None:
    """Send a failed asynchronous invocation to its SQS on-failure destination."""
    record = {
        "version": "1.0",
        "timestamp": _iso_now(),
        "requestContext": {"requestId": result.request_id, "functionArn": fn.arn,
                           "condition": "RetriesExhausted", "approximateInvokeCount": attempts},
        "requestPayload": event,
        "responseContext": {"statusCode": 200, "executedVersion": "$LATEST",
                            "functionError": "Unhandled"},
        "responsePayload": json.loads(result.payload) if result.payload else None,
    }
    moto_adapter.send_message(destination, json.dumps(record))


def _now_ms() -> int:
    return int(time.time() * 1000)


def _iso_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")[:-4] + "Z"
