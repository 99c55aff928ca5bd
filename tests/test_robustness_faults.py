"""Faults: the function killed (timeout, out of memory), S3 failing for a while or for good,
events delivered twice, and the local cloud stopped between notebooks. Nothing is lost and
the user is told.

Pipeline level, as in ``test_robustness_inputs.py``. Transient S3 errors come from a small
HTTP proxy on 127.0.0.1 in front of the local cloud (the function reaches S3 through it via
its ``AWS_ENDPOINT_URL``); it fails chosen requests and records every attempt.
"""
from __future__ import annotations

import gzip
import http.client
import json
import os
import signal
import ssl
import subprocess
import sys
import textwrap
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import quote, unquote, unquote_plus, urlparse

import pytest

from helpers import local_cloud
from pipeline_fixtures import (deploy_pipeline, input_state, large_run_bytes, nifti_bytes,
                               phantom_run, remove_trigger, wait_until)

pytestmark = pytest.mark.slow  # the local cloud (see pyproject's markers)

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "host"}
ERRORS = {500: ("InternalError", "We encountered an internal error. Please try again."),
          503: ("ServiceUnavailable", "Please reduce your request rate.")}


class FlakyS3:
    """An HTTP proxy in front of the local cloud that fails chosen requests, and logs all.

    ``fail(path_part, times)`` makes the next ``times`` requests whose path contains
    ``path_part`` (``times=None``: all of them) get an S3-style 500/503 error instead of
    being forwarded.
    """

    def __init__(self, upstream: str, ca_file: Path):
        target = urlparse(upstream)
        self._upstream = (target.hostname, target.port)
        self._ssl = ssl.create_default_context(cafile=str(ca_file))
        self._rules: list[dict] = []
        self._lock = threading.Lock()
        self.requests: list[dict] = []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive and 100-continue, as botocore expects

            def log_message(self, *args):
                pass

            def _any(self):
                proxy._handle(self)

            do_GET = do_PUT = do_HEAD = do_POST = do_DELETE = _any

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def fail(self, path_part: str, times: int | None, *, status: int = 503,
             method: str | None = None) -> None:
        with self._lock:
            self._rules.append({"part": quote(path_part), "left": times, "status": status,
                                "method": method})

    def attempts(self, path_part: str, method: str | None = None) -> list[dict]:
        """Logged requests whose path contains ``path_part`` (in arrival order)."""
        return [r for r in self.requests if path_part in r["path"]
                and (method is None or r["method"] == method)]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _injected_status(self, method: str, path: str) -> int | None:
        with self._lock:
            for rule in self._rules:
                if rule["part"] in path and rule["method"] in (None, method) and \
                        (rule["left"] is None or rule["left"] > 0):
                    if rule["left"] is not None:
                        rule["left"] -= 1
                    return rule["status"]
        return None

    def _handle(self, req: BaseHTTPRequestHandler) -> None:
        body = _read_body(req)
        status = self._injected_status(req.command, req.path)
        if status is None:
            status, headers, payload = self._forward(req, body)
        else:
            code, message = ERRORS[status]
            payload = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
                       f'<Message>{message}</Message><RequestId>flaky</RequestId></Error>').encode()
            headers = [("Content-Type", "application/xml"), ("Content-Length", str(len(payload)))]
        with self._lock:
            self.requests.append({"time": time.monotonic(), "method": req.command,
                                  "path": unquote(req.path), "status": status,
                                  "sdk_request": req.headers.get("amz-sdk-request", ""),
                                  "invocation_id": req.headers.get("amz-sdk-invocation-id")})
        req.send_response(status)
        for name, value in headers:
            req.send_header(name, value)
        req.end_headers()
        if req.command != "HEAD":
            req.wfile.write(payload)

    def _forward(self, req, body: bytes):
        conn = http.client.HTTPSConnection(*self._upstream, context=self._ssl, timeout=60)
        try:
            headers = {k: v for k, v in req.headers.items() if k.lower() not in HOP_BY_HOP
                       and k.lower() != "expect"}
            headers["Content-Length"] = str(len(body))
            headers["Host"] = req.headers["Host"]  # signed by the client: keep it
            conn.request(req.command, req.path, body=body, headers=headers)
            response = conn.getresponse()
            payload = response.read()
            out = [(k, v) for k, v in response.getheaders() if k.lower() not in HOP_BY_HOP]
            length = response.getheader("Content-Length") if req.command == "HEAD" else None
            out.append(("Content-Length", length or str(len(payload))))
            return response.status, out, payload
        finally:
            conn.close()


def _read_body(req: BaseHTTPRequestHandler) -> bytes:
    if req.headers.get("Transfer-Encoding", "").lower() == "chunked":
        chunks = []
        while True:
            size = int(req.rfile.readline().split(b";")[0], 16)
            if size == 0:
                while req.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return b"".join(chunks)
            chunks.append(req.rfile.read(size))
            req.rfile.readline()
    return req.rfile.read(int(req.headers.get("Content-Length", 0)))


def attempt_numbers(requests: list[dict]) -> list[int]:
    """The ``attempt=N`` of botocore's ``amz-sdk-request`` header of each request."""
    return [int(r["sdk_request"].split("attempt=")[1].split(";")[0]) for r in requests]


# ------------------------------------------------------------------------------------------
# Scenarios: all deployed and started at once (each test waits for its own)

GOOD_BYTES = nifti_bytes(phantom_run(seed=3))
SLOW = "raw/slow_bold.nii.gz"
BIG = "raw/big_bold.nii.gz"
TRANSIENT = "raw/s3-transient_bold.nii.gz"
PERMANENT = "raw/s3-permanent_bold.nii.gz"
TWICE_EVENT = "raw/event-twice_bold.nii.gz"
TWICE_UPLOAD = "raw/upload-twice_bold.nii.gz"


@pytest.fixture(scope="module")
def proxy(cloud):
    flaky = FlakyS3(cloud["endpoint"], local_cloud.CERT_FILE)
    yield flaky
    flaky.close()


@pytest.fixture(scope="module")
def killed(cloud):
    """A 1 s timeout and a 128 MB function, each given a run that needs more: 64x64x32x100,
    and 128x128x64x20 (the engine's memory grows with the volume, not the run's length).

    ``size_check`` off: the handler would refuse both runs from their headers (too slow for
    1 s, too large for 128 MB); here the function must really be killed.
    """
    body, big_body = large_run_bytes(), large_run_bytes(shape=(128, 128, 64), n_volumes=20)
    slow = deploy_pipeline("timeout", timeout_s=1, memory_mb=1024, max_concurrency=1,
                           retry_attempts=1, size_check=False)
    small = deploy_pipeline("oom", timeout_s=60, memory_mb=128, max_concurrency=1,
                            retry_attempts=1, size_check=False)
    etags = {SLOW: slow.upload(SLOW, body), BIG: small.upload(BIG, big_body)}
    yield {"timeout": slow, "oom": small, "body": body, "big_body": big_body, "etags": etags}
    remove_trigger(slow)
    remove_trigger(small)


@pytest.fixture(scope="module")
def through_proxy(proxy):
    """The real function reaching S3 through the flaky proxy."""
    pipeline = deploy_pipeline("faults", max_concurrency=2, retry_attempts=1,
                               route_s3_through=proxy.url)
    proxy.fail(f"/{pipeline.cfg.input_bucket}/{TRANSIENT}", 2)            # GET/HEAD input
    proxy.fail("s3-transient_desc-preproc_bold.nii.gz", 1, status=500)    # PUT an output
    proxy.fail(f"/{pipeline.cfg.input_bucket}/{PERMANENT}", None)         # S3 never answers
    etags = {key: pipeline.upload(key, GOOD_BYTES)
             for key in (TRANSIENT, PERMANENT, TWICE_EVENT, TWICE_UPLOAD)}
    pipeline.upload(TWICE_UPLOAD, GOOD_BYTES)  # the same file, uploaded again at once
    yield pipeline, etags
    remove_trigger(pipeline)


@pytest.fixture(scope="module", autouse=True)
def _start_every_scenario_first(killed, through_proxy):
    """Both fixtures set up before the first test: the scenarios run side by side."""


# ------------------------------------------------------------------------------------------
# Timeout and out of memory: the logs say it as AWS does; the status table shows it


def test_timeout_is_logged_as_aws_does_and_shown_in_the_status_table(killed):
    pipeline = killed["timeout"]
    pipeline.settle([SLOW], timeout=120)
    runs = pipeline.runs(SLOW)
    assert len(runs) == 2  # the first attempt and MaximumRetryAttempts=1
    assert all(r["error_type"] == "Sandbox.Timedout" for r in runs)
    assert all(r["error"] == "Task timed out after 1.00 seconds" for r in runs)
    assert all(r["billed_ms"] == 1000 for r in runs)
    reports = [m for m in pipeline.log_messages() if m.startswith("REPORT")]
    assert len(reports) == 2 and all("Status: timeout" in m for m in reports)
    row = pipeline.status([SLOW]).iloc[0]
    assert row["status"] == "failed"
    assert "Task timed out after 1.00 seconds" in row["reason"]
    _assert_sent_to_failure_queue(pipeline, SLOW, attempts=2)
    assert pipeline.outputs(SLOW) == {}  # nothing half-written is visible
    assert input_state(pipeline, SLOW) == (killed["etags"][SLOW], killed["body"])


def test_out_of_memory_is_logged_as_aws_does_and_shown_in_the_status_table(killed):
    pipeline = killed["oom"]
    pipeline.settle([BIG], timeout=120)
    runs = pipeline.runs(BIG)
    assert len(runs) == 2
    assert all(r["error_type"] == "Runtime.OutOfMemory" for r in runs)
    assert all(r["max_memory_mb"] == r["memory_mb"] == 128 for r in runs)
    assert all(r["error"].endswith("Error: Runtime exited with error: signal: killed")
               for r in runs)
    row = pipeline.status([BIG]).iloc[0]
    assert row["status"] == "failed" and row["max_memory_mb"] == 128
    assert "out of memory" in row["reason"] and "128 MB" in row["reason"]
    _assert_sent_to_failure_queue(pipeline, BIG, attempts=2)
    assert pipeline.outputs(BIG) == {}
    assert input_state(pipeline, BIG) == (killed["etags"][BIG], killed["big_body"])


def _assert_sent_to_failure_queue(pipeline, key, attempts):
    events = [e for e in pipeline.failed_events()
              if [unquote_plus(r["s3"]["object"]["key"]) for r in e["requestPayload"]["Records"]]
              == [key]]
    assert len(events) == 1
    assert events[0]["requestContext"]["condition"] == "RetriesExhausted"
    assert events[0]["requestContext"]["approximateInvokeCount"] == attempts


# ------------------------------------------------------------------------------------------
# S3 failing: retried with backoff; a permanent failure is recorded


def test_transient_s3_errors_are_retried_and_the_run_completes(through_proxy, proxy):
    pipeline, etags = through_proxy
    pipeline.settle([TRANSIENT], timeout=120)
    assert set(pipeline.outputs(TRANSIENT)) == pipeline.expected_outputs(TRANSIENT)
    assert pipeline.status([TRANSIENT]).iloc[0]["status"] == "processed"
    # One invocation: the SDK retried inside it (standard mode) ...
    assert len(pipeline.runs(TRANSIENT)) == 1
    reads = proxy.attempts(f"/{pipeline.cfg.input_bucket}/{TRANSIENT}")
    # the first read is the header's (a ranged GET: 206), then the download (200)
    assert [r["status"] for r in reads[:4]] == [503, 503, 206, 200]
    assert attempt_numbers(reads[:3]) == [1, 2, 3]
    # The handler's Config(retry_attempts={"max_attempts": 5}): 5 retries, 6 attempts in all.
    assert all("max=6" in r["sdk_request"] for r in reads)
    assert len({r["invocation_id"] for r in reads[:3]}) == 1  # one call, three attempts
    writes = proxy.attempts("s3-transient_desc-preproc_bold.nii.gz", "PUT")
    assert [r["status"] for r in writes] == [500, 200] and attempt_numbers(writes) == [1, 2]
    delays = [round(b["time"] - a["time"], 3) for a, b in zip(reads, reads[1:3])]
    print(f"\ntransient S3 errors: retried after {delays} s (jittered exponential backoff)")
    assert input_state(pipeline, TRANSIENT)[0] == etags[TRANSIENT]


def test_completion_marker_is_written_last(through_proxy, proxy):
    pipeline, _ = through_proxy
    pipeline.settle([TRANSIENT], timeout=120)
    puts = [unquote(r["path"]).split("?")[0].removeprefix(f"/{pipeline.cfg.output_bucket}/")
            for r in proxy.attempts("/s3-transient_", "PUT") if r["status"] == 200]
    done = pipeline.out_key(TRANSIENT, "done")
    assert puts[-1] == done and set(puts) == pipeline.expected_outputs(TRANSIENT)
    assert len(puts) == len(set(puts))  # each written once


def test_permanent_s3_failure_is_recorded_after_retries(through_proxy, proxy):
    pipeline, etags = through_proxy
    pipeline.settle([PERMANENT], timeout=120)
    assert wait_for_runs(pipeline, PERMANENT, 2)  # the first attempt and one Lambda retry
    assert wait_until(lambda: pipeline.failed_events(), timeout=30)
    runs = pipeline.runs(PERMANENT)
    assert len(runs) == 2 and all(r["error"].startswith("ClientError: ") for r in runs)
    # Each invocation: one call, 6 attempts (1 + 5 retries, standard mode), each one a 503.
    reads = proxy.attempts(f"/{pipeline.cfg.input_bucket}/{PERMANENT}")
    calls: dict[str, list[dict]] = {}
    for r in reads:
        calls.setdefault(r["invocation_id"], []).append(r)
    assert len(calls) == 2
    assert all(attempt_numbers(c) == [1, 2, 3, 4, 5, 6] for c in calls.values())
    assert {r["status"] for r in reads} == {503}
    # The user sees an error record, the failed status and the failure queue's message.
    record = pipeline.record(PERMANENT, "error")
    assert record["error_type"] == "ClientError" and record["permanent"] is False
    assert "503" in record["error"] or "ServiceUnavailable" in record["error"]
    assert "S3 kept failing" in record["cause"] and "Lambda retries" in record["action"]
    assert set(pipeline.outputs(PERMANENT)) == {pipeline.out_key(PERMANENT, "error")}
    row = pipeline.status([PERMANENT]).iloc[0]
    assert row["status"] == "failed" and row["reason"].startswith(record["error"])
    assert "RetriesExhausted" in row["reason"]
    _assert_sent_to_failure_queue(pipeline, PERMANENT, attempts=2)
    assert input_state(pipeline, PERMANENT)[0] == etags[PERMANENT]


# ------------------------------------------------------------------------------------------
# The same event twice, the same file twice: the same result, no duplicates


def _result(pipeline, key) -> dict:
    """The result's keys, with the content of the deterministic outputs (the image
    uncompressed: the gzip header holds the engine's temporary file name)."""
    objects = pipeline.outputs(key)
    data = {"bold": gzip.decompress(pipeline.read(pipeline.out_key(key, "preproc_bold"))),
            "confounds": pipeline.read(pipeline.out_key(key, "confounds"))}
    return {"keys": set(objects), "data": data}


def test_same_event_delivered_twice_gives_the_same_result(through_proxy):
    pipeline, _ = through_proxy
    pipeline.settle([TWICE_EVENT], timeout=120)
    first = _result(pipeline, TWICE_EVENT)
    assert first["keys"] == pipeline.expected_outputs(TWICE_EVENT)
    # Asynchronous delivery is at-least-once: the same event again, twice at the same time.
    event = pipeline.event(TWICE_EVENT, len(GOOD_BYTES))
    payloads = []
    threads = [threading.Thread(target=lambda: payloads.append(pipeline.invoke(event)))
               for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert payloads == [{"results": [{"key": TWICE_EVENT, "status": "processed"}]}] * 2
    assert _result(pipeline, TWICE_EVENT) == first  # same keys, byte-identical outputs
    assert len(pipeline.runs(TWICE_EVENT)) == 3
    assert pipeline.status([TWICE_EVENT]).iloc[0]["status"] == "processed"


def test_same_file_uploaded_twice_gives_the_same_result(through_proxy):
    pipeline, _ = through_proxy
    pipeline.settle([TWICE_UPLOAD], timeout=120)
    assert wait_for_runs(pipeline, TWICE_UPLOAD, 2)
    result = _result(pipeline, TWICE_UPLOAD)
    assert result["keys"] == pipeline.expected_outputs(TWICE_UPLOAD)  # no duplicates
    # The same bytes as the other run of the same data under another name.
    pipeline.settle([TWICE_EVENT], timeout=120)
    other = _result(pipeline, TWICE_EVENT)["data"]
    assert result["data"] == other
    assert all(r["error_type"] is None for r in pipeline.runs(TWICE_UPLOAD))


def wait_for_runs(pipeline, key, n, timeout=120):
    return wait_until(lambda: len(pipeline.runs(key)) >= n, timeout=timeout, poll=0.5)


# ------------------------------------------------------------------------------------------
# The local cloud stopped between notebooks

SESSION_SCRIPT = textwrap.dedent('''
    import json, os, signal, time
    from helpers import local_cloud
    from helpers.cloud.clients import client
    from helpers.cloud.iam import lambda_trust_policy
    from helpers.cloud.session import MissingResources, open_session

    def notebook_01(cfg):
        for bucket in (cfg.input_bucket, cfg.output_bucket):
            client("s3").create_bucket(Bucket=bucket)
        client("iam").create_role(RoleName=cfg.role_name,
                                  AssumeRolePolicyDocument=json.dumps(lambda_trust_policy()))

    def notebook_03():
        try:
            open_session("local", needs=("buckets", "role", "function"))
            return "opened"
        except MissingResources as exc:
            return str(exc)

    out = {}
    cfg = open_session("local")
    notebook_01(cfg)
    # 1. Stopped cleanly (notebook 05, or `python -m helpers.local_cloud stop`).
    local_cloud.stop()
    out["stopped"] = notebook_03()
    # 2. Killed without notice (machine restarted, kernel crash): its state file stays.
    notebook_01(cfg)
    pid = local_cloud.find()["pid"]
    os.killpg(pid, signal.SIGKILL)
    while local_cloud.find():
        time.sleep(0.1)
    out["killed"] = notebook_03()
    # 3. Notebook 01 re-run, but not 02: the function is missing.
    notebook_01(cfg)
    out["no_function"] = notebook_03()
    local_cloud.stop()
    print("RESULT " + json.dumps(out))
''')


def test_stopped_local_cloud_names_the_notebook_to_rerun(tmp_path):
    """In a process of its own with its own build folder: the session's cloud is not touched."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("AWS_") and k != "PYTEST_CURRENT_TEST"}
    env.update(WORKBOOK_BUILD_DIR=str(tmp_path / "build"), WORKBOOK_DATA_DIR=str(tmp_path / "data"))
    try:
        done = subprocess.run([sys.executable, "-c", SESSION_SCRIPT], env=env, timeout=180,
                              capture_output=True, text=True, cwd=Path(__file__).parents[1])
    finally:
        _stop_own_cloud(tmp_path / "build" / "local_cloud" / "state.json")
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.split("RESULT ", 1)[1])
    for case in ("stopped", "killed"):
        assert out[case].startswith("This notebook needs the buckets, role, function made by "
                                    "01_create_buckets_and_role, 02_package_and_deploy_lambda")
        assert "Re-run 01_create_buckets_and_role and the notebooks after it" in out[case]
    assert "The local cloud had stopped, so a new, empty one was started." in done.stdout
    assert out["no_function"].startswith("This notebook needs the function made by "
                                         "02_package_and_deploy_lambda")
    assert "Re-run 02_package_and_deploy_lambda" in out["no_function"]


def _stop_own_cloud(state_file: Path) -> None:
    """If the script failed half-way, stop the local cloud it started (by its own pid)."""
    if state_file.exists():
        pid = json.loads(state_file.read_text())["pid"]
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
