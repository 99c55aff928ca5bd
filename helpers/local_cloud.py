"""The local cloud: an emulated AWS (moto) in a background process on 127.0.0.1.

It runs in its own process so that its state (buckets, role, function, logs) outlives each
notebook's kernel: notebook 01 starts it, notebooks 02-04 find it through a small state file
under ``build/``, and notebook 05 stops it. Inside that process, :mod:`helpers.lambda_executor`
replaces moto's Docker-based Lambda runner, so uploads really run the deployed zip.

Run ``python -m helpers.local_cloud {start,status,stop}`` from a shell to manage it by hand.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from helpers.clients import use_local_cloud
from helpers.settings import BUILD_DIR, DEFAULT_REGION

STATE_DIR = BUILD_DIR / "local_cloud"
STATE_FILE = STATE_DIR / "state.json"
SERVER_LOG = STATE_DIR / "server.log"
START_TIMEOUT_S = 30.0


class LocalCloudMissing(RuntimeError):
    """Raised when a notebook needs resources that the local cloud no longer has."""


def _is_up(endpoint: str) -> bool:
    try:
        with urllib.request.urlopen(f"{endpoint}/moto-api/data.json", timeout=2):
            return True
    except OSError:
        return False


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def find() -> dict | None:
    """The running local cloud's state (``endpoint``, ``pid``, ``started``), or None."""
    if not STATE_FILE.exists():
        return None
    state = json.loads(STATE_FILE.read_text())
    return state if _is_up(state["endpoint"]) else None


def ensure_running() -> dict:
    """Find the local cloud, or start it; point this process's boto3 clients at it.

    Returns
    -------
    dict
        The state: ``endpoint``, ``pid``, ``started`` (Unix time) and ``restarted``
        (True when a previous local cloud had stopped and this call started a new, empty
        one: resources made by earlier notebooks are gone).
    """
    state = find()
    if state is None:
        had_one = STATE_FILE.exists()
        state = _start()
        state["restarted"] = had_one
    else:
        state["restarted"] = False
    use_local_cloud(state["endpoint"], DEFAULT_REGION)
    return state


def _start() -> dict:
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    with open(SERVER_LOG, "ab") as log:
        # A new session: the server outlives the kernel that started it.
        proc = subprocess.Popen(
            [sys.executable, "-m", "helpers.local_cloud", "serve", "--port", str(port)],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, cwd=Path(__file__).resolve().parents[1])
    deadline = time.monotonic() + START_TIMEOUT_S
    while not _is_up(endpoint):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"the local cloud did not start; see {SERVER_LOG}")
        time.sleep(0.1)
    state = {"endpoint": endpoint, "pid": proc.pid, "started": time.time()}
    STATE_FILE.write_text(json.dumps(state))
    return state


def stop() -> bool:
    """Stop the local cloud (all its resources vanish). Returns True if one was running."""
    state = find()
    if state is None:
        STATE_FILE.unlink(missing_ok=True)
        return False
    try:
        os.killpg(state["pid"], signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + 10
    while _is_up(state["endpoint"]) and time.monotonic() < deadline:
        time.sleep(0.1)
    STATE_FILE.unlink(missing_ok=True)
    return True


def enable_iam_enforcement(endpoint: str) -> None:
    """Make the local cloud check every request against IAM policies, as AWS does.

    moto accepts any request by default. With enforcement on, the execution role's
    least-privilege policy is really checked for S3 (see README, "Local cloud vs AWS").
    """
    request = urllib.request.Request(f"{endpoint}/moto-api/reset-auth", data=b"0",
                                     method="POST")
    with urllib.request.urlopen(request, timeout=5):
        pass


def _serve(port: int) -> None:
    """Entry point of the server process: hook the Lambda executor in, then serve."""
    from moto import server

    from helpers import lambda_executor

    os.environ.setdefault("MOTO_PORT", str(port))
    lambda_executor.install(f"http://127.0.0.1:{port}", STATE_DIR / "tasks")
    server.main(["--host", "127.0.0.1", "--port", str(port)])


def _main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m helpers.local_cloud")
    parser.add_argument("command", choices=["start", "status", "stop", "serve"])
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "serve":
        _serve(args.port)
    elif args.command == "start":
        print(ensure_running()["endpoint"])
    elif args.command == "status":
        state = find()
        print(f"running at {state['endpoint']}" if state else "not running")
    else:
        print("stopped" if stop() else "was not running")
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
