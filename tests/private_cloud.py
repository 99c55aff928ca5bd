"""A local cloud of a test module's own, in a sandbox of its own.

IAM enforcement is global to a local cloud's server, and notebooks keep their workbook id
under the build folder, so tests that turn enforcement on or run notebooks must not share
the session's ``cloud``. :func:`private_cloud` starts a separate server (with
``python -m helpers.local_cloud``, as a student would) and points this process's boto3
clients at it only while the ``with`` block runs; afterwards the environment is restored
and the server stopped.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import boto3

from helpers.local_cloud.control import own_key

ROOT = Path(__file__).resolve().parents[1]
POINTING = ("AWS_ENDPOINT_URL", "AWS_CA_BUNDLE", "AWS_DEFAULT_REGION", "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


def sandbox_env(sandbox: Path) -> dict[str, str]:
    """The environment of a subprocess (notebooks, CLI) that should use ``sandbox``."""
    env = {**os.environ, "WORKBOOK_BUILD_DIR": str(sandbox / "build"),
           "WORKBOOK_DATA_DIR": str(sandbox / "data")}
    for name in ("PYTEST_CURRENT_TEST", "CI", *POINTING):
        env.pop(name, None)
    return env


def run_module(sandbox: Path, *args: str, env: dict | None = None,
               timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``python -m <args>`` from the project root with the sandbox's environment."""
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT,
                          env={**sandbox_env(sandbox), **(env or {})},
                          capture_output=True, text=True, timeout=timeout)


def cloud_state(sandbox: Path) -> dict:
    """The sandbox's local cloud state: ``endpoint`` and ``pid``."""
    return json.loads((state_dir(sandbox) / "state.json").read_text())


def state_dir(sandbox: Path) -> Path:
    """The sandbox's local cloud state folder (its key, certificate, state, journal)."""
    return sandbox / "build" / "local_cloud"


@contextmanager
def private_cloud(sandbox: Path, *, start: bool = True) -> Iterator[dict]:
    """Point this process's boto3 clients at the sandbox's local cloud; stop it afterwards.

    Parameters
    ----------
    sandbox : Path
        Holds ``build/`` (workbook id, local cloud state and certificate) and ``data/``.
    start : bool
        Start the local cloud here; False when a notebook run has started it already.

    Yields
    ------
    dict
        ``endpoint``, ``pid``, ``ca_bundle`` and ``state_dir``.
    """
    saved = {name: os.environ.get(name) for name in POINTING}
    try:
        if start:
            done = run_module(sandbox, "helpers.local_cloud", "start", timeout=60)
            assert done.returncode == 0, done.stderr
        state = cloud_state(sandbox)
        state["state_dir"] = state_dir(sandbox)
        state["ca_bundle"] = str(state["state_dir"] / "cert.pem")
        os.environ.pop("AWS_SESSION_TOKEN", None)
        os.environ.update(own_key(state["state_dir"]), AWS_ENDPOINT_URL=state["endpoint"],
                          AWS_CA_BUNDLE=state["ca_bundle"], AWS_DEFAULT_REGION="us-east-1")
        boto3.DEFAULT_SESSION = None  # boto3 caches the credentials it found first
        yield state
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        boto3.DEFAULT_SESSION = None
        run_module(sandbox, "helpers.local_cloud", "stop", timeout=60)
