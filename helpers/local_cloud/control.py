"""Start, find and stop the local cloud: an emulated AWS (moto) in a background process.

It speaks HTTPS with a self-signed certificate made on first start (``AWS_CA_BUNDLE`` points
boto3 at it), so bucket policies that deny plain HTTP behave as on AWS.

It runs in its own process so that its state (buckets, role, function, logs) outlives each
notebook's kernel: notebook 01 starts it, notebooks 02-04 find it through a small state file
under ``build/``, and notebook 05 stops it. Inside that process (:func:`serve`),
:mod:`helpers.local_cloud.executor` replaces moto's Docker-based Lambda runner, so uploads
really run the deployed zip.

Run ``python -m helpers.local_cloud {start,status,stop}`` from a shell to manage it by hand.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from helpers.cloud.clients import use_local_cloud
from helpers.cloud.settings import BUILD_DIR, DEFAULT_REGION, PROJECT_ROOT
from helpers.local_cloud import moto_adapter

STATE_DIR = BUILD_DIR / "local_cloud"
STATE_FILE = STATE_DIR / "state.json"
CERT_FILE = STATE_DIR / "cert.pem"
KEY_FILE = STATE_DIR / "key.pem"
SERVER_LOG = STATE_DIR / "server.log"
START_TIMEOUT_S = 30.0


class LocalCloudMissing(RuntimeError):
    """Raised when a notebook needs resources that the local cloud no longer has."""


def _is_up(endpoint: str) -> bool:
    context = ssl.create_default_context(cafile=str(CERT_FILE)) if CERT_FILE.exists() else None
    try:
        with urllib.request.urlopen(f"{endpoint}{moto_adapter.HEALTH_PATH}", timeout=2,
                                    context=context):
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
    use_local_cloud(state["endpoint"], DEFAULT_REGION, ca_bundle=CERT_FILE)
    return state


def _start() -> dict:
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    _ensure_certificate()
    port = _free_port()
    endpoint = f"https://127.0.0.1:{port}"
    with open(SERVER_LOG, "ab") as log:
        # A new session: the server outlives the kernel that started it.
        proc = subprocess.Popen(
            [sys.executable, "-m", "helpers.local_cloud", "serve", "--port", str(port)],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, cwd=PROJECT_ROOT,
            env={**os.environ, "WORKBOOK_BUILD_DIR": str(BUILD_DIR)})  # same state dir
    deadline = time.monotonic() + START_TIMEOUT_S
    while not _is_up(endpoint):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"the local cloud did not start; see {SERVER_LOG}")
        time.sleep(0.1)
    state = {"endpoint": endpoint, "pid": proc.pid, "started": time.time()}
    STATE_FILE.write_text(json.dumps(state))
    return state


def _ensure_certificate() -> None:
    """A self-signed certificate for 127.0.0.1, valid ten years (made once)."""
    if CERT_FILE.exists() and KEY_FILE.exists():
        return
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fmri-workbook local cloud")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=3650))
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    KEY_FILE.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    CERT_FILE.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


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


def set_iam_enforcement(endpoint: str, on: bool = True, *, ca_bundle: Path = CERT_FILE) -> None:
    """Make the local cloud check every request against IAM policies, as AWS does (or not).

    moto accepts any request by default. With enforcement on, the execution role's
    least-privilege policy is really checked for S3 (see README, "Local cloud vs AWS").

    Parameters
    ----------
    endpoint : str
        The local cloud's URL.
    on : bool
        True: check every request; False: allow everything again.
    ca_bundle : Path
        That local cloud's certificate.
    """
    # The body must arrive raw: urllib's default form content type would make the server
    # parse it as a form and see an empty body. moto counts requests before enforcing:
    # "0" enforces from the next one, "inf" never.
    request = urllib.request.Request(f"{endpoint}{moto_adapter.IAM_ENFORCEMENT_PATH}",
                                     data=b"0" if on else b"inf", method="POST",
                                     headers={"Content-Type": "text/plain"})
    context = ssl.create_default_context(cafile=str(ca_bundle))
    with urllib.request.urlopen(request, timeout=5, context=context):
        pass


def serve(port: int) -> None:
    """Entry point of the server process: hook the Lambda executor in, then serve."""
    from helpers.local_cloud import executor

    os.environ.setdefault("MOTO_PORT", str(port))
    executor.install(f"https://127.0.0.1:{port}", STATE_DIR / "tasks", CERT_FILE)
    moto_adapter.serve("127.0.0.1", port, cert=str(CERT_FILE), key=str(KEY_FILE))
