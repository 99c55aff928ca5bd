"""Start, find and stop the local cloud: an emulated AWS (moto) in a background process.

It speaks HTTPS with a self-signed certificate made on first start (``AWS_CA_BUNDLE`` points
boto3 at it), so bucket policies that deny plain HTTP behave as on AWS. It takes only
requests signed with the workbook's own access key (random, made on first start) or with
credentials it issued itself (:mod:`helpers.local_cloud.auth`): other users of a shared
machine can reach 127.0.0.1, but not the workbook's cloud.

It runs in its own process so that its state (buckets, role, function, logs) outlives each
notebook's kernel: notebook 01 starts it, notebooks 02-04 find it through a small state file,
and notebook 05 stops it. Inside that process (:func:`serve`),
:mod:`helpers.local_cloud.executor` replaces moto's Docker-based Lambda runner, so uploads
really run the deployed zip.

Everything lives in the state folder ``build/local_cloud/`` (mode 0700):

- ``credentials.json`` (0600): the workbook's own access key;
- ``cert.pem`` and ``key.pem`` (0600): the TLS certificate and its private key;
- ``state.json``: endpoint and process id of the running server; ``server.log``;
- ``pending_events/``: the server's journal of asynchronous events not yet settled;
- ``lost_events.json``: events that a stop (or a crash) left unrun, reported by the next
  start (``ensure_running()["lost_events"]``), then kept as ``lost_events.reported.json``.

Run ``python -m helpers.local_cloud {start,status,stop}`` from a shell to manage it by hand.
"""
from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import ssl
import string
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import psutil

from helpers.cloud.clients import use_local_cloud
from helpers.cloud.settings import BUILD_DIR, DEFAULT_REGION, PROJECT_ROOT
from helpers.local_cloud import moto_adapter
from helpers.local_cloud.aws_behaviour import ENV_PREFIX
from helpers.local_cloud.aws_behaviour import ROUTE as AWS_BEHAVIOUR_ROUTE

STATE_DIR = BUILD_DIR / "local_cloud"
STATE_FILE = STATE_DIR / "state.json"
CERT_FILE = STATE_DIR / "cert.pem"
KEY_FILE = STATE_DIR / "key.pem"
CREDENTIALS_FILE = STATE_DIR / "credentials.json"
SERVER_LOG = STATE_DIR / "server.log"
JOURNAL_DIR = STATE_DIR / "pending_events"
LOST_EVENTS_FILE = STATE_DIR / "lost_events.json"
REPORTED_LOST_EVENTS_FILE = STATE_DIR / "lost_events.reported.json"
ENVIRONMENTS_FILE = STATE_DIR / "environments_dir"
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 20.0
ADMIN_SERVICE = "local-cloud"  # the credential scope's service of administrative requests
# The server's whole environment comes from here: nothing else of the caller's shell
# (AWS keys, tokens, other secrets) reaches it or the functions it runs.
SERVER_ENV_NAMES = ("PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR",
                    "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
KEY_ALPHABET = string.ascii_uppercase + "234567"


class LocalCloudMissing(RuntimeError):
    """Raised when a notebook needs resources that the local cloud no longer has."""


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
        The state: ``endpoint``, ``pid``, ``started`` (Unix time), ``restarted`` (True
        when a previous local cloud had stopped and this call started a new, empty one:
        resources made by earlier notebooks are gone) and ``lost_events``: when this call
        started it, the asynchronous events the previous one accepted but did not finish
        (each with ``function``, ``received``, ``attempts``, ``stage``, ``event``), else [].
    """
    state = find()
    if state is None:
        had_one = STATE_FILE.exists()
        state = _start()
        state["restarted"] = had_one
    else:
        state.update(restarted=False, lost_events=[])
    use_local_cloud(state["endpoint"], DEFAULT_REGION, ca_bundle=CERT_FILE,
                    credentials=own_key())
    return state


def own_key(state_dir: Path = STATE_DIR) -> dict[str, str]:
    """The workbook's own access key (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``).

    Parameters
    ----------
    state_dir : Path
        The local cloud's state folder (default: this workbook's).
    """
    return json.loads((state_dir / CREDENTIALS_FILE.name).read_text())


def _start() -> dict:
    _prepare_state_dir()
    _ensure_certificate()
    _ensure_own_key()
    _remove_old_environments()
    lost = _report_lost_events()
    port = _free_port()
    endpoint = f"https://127.0.0.1:{port}"
    with open(SERVER_LOG, "ab") as log:
        # A new session: the server outlives the kernel that started it.
        proc = subprocess.Popen(
            [sys.executable, "-m", "helpers.local_cloud", "serve", "--port", str(port)],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, cwd=PROJECT_ROOT, env=server_environment())
    deadline = time.monotonic() + START_TIMEOUT_S
    while not _is_up(endpoint):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"the local cloud did not start; see {SERVER_LOG}")
        time.sleep(0.1)
    state = {"endpoint": endpoint, "pid": proc.pid, "started": time.time()}
    _write_private(STATE_FILE, json.dumps(state))
    return {**state, "lost_events": lost}


def server_environment(env: dict[str, str] | None = None) -> dict[str, str]:
    """The server's environment: a few harmless variables of ``env``, nothing secret.

    ``LOCAL_CLOUD_*`` settings (:mod:`helpers.local_cloud.aws_behaviour`) pass through.
    """
    env = os.environ if env is None else env
    clean = {name: env[name] for name in SERVER_ENV_NAMES if name in env}
    clean.update({name: value for name, value in env.items() if name.startswith(ENV_PREFIX)})
    clean["WORKBOOK_BUILD_DIR"] = str(BUILD_DIR)  # the same state folder
    return clean


def _prepare_state_dir() -> None:
    """The state folder, private to its owner (also tightening one made by older versions)."""
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    STATE_DIR.chmod(0o700)
    for private in (KEY_FILE, CREDENTIALS_FILE, STATE_FILE):
        if private.exists():
            private.chmod(0o600)


def _write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read, atomically (never visible half-written)."""
    partial = path.with_name(f".{path.name}.partial")
    partial.unlink(missing_ok=True)
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.replace(partial, path)


def _ensure_own_key() -> None:
    """The workbook's own random access key (made once, kept with the certificate)."""
    if CREDENTIALS_FILE.exists():
        return
    key_id = "AKIA" + "".join(secrets.choice(KEY_ALPHABET) for _ in range(16))
    _write_private(CREDENTIALS_FILE, json.dumps({"AWS_ACCESS_KEY_ID": key_id,
                                                 "AWS_SECRET_ACCESS_KEY": secrets.token_urlsafe(30)}))


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
    _write_private(KEY_FILE, key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()).decode())
    CERT_FILE.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop() -> bool:
    """Stop the local cloud (all its resources vanish). Returns True if one was running.

    The server ends every run in flight and removes their folders before it exits; the
    asynchronous events it had not finished go to ``lost_events.json`` in the state
    folder, which the next start reports.
    """
    state = find()
    if state is not None:
        _end_server(state["pid"])
    STATE_FILE.unlink(missing_ok=True)
    if STATE_DIR.exists():
        _collect_lost_events()
    return state is not None


def _end_server(pid: int) -> None:
    """SIGTERM (the server cleans up), then SIGKILL if it is still there after a while."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while _alive(pid):
        if time.monotonic() > deadline:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            break
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _collect_lost_events() -> list[dict]:
    """Move the journal's entries (events never settled) into ``lost_events.json``."""
    if not JOURNAL_DIR.exists():
        return []
    entries, paths = [], sorted(JOURNAL_DIR.glob("*.json"))
    for path in paths:
        try:
            entries.append(json.loads(path.read_text()))
        except ValueError:
            pass  # written half-way when the server was killed
    if entries:
        earlier = json.loads(LOST_EVENTS_FILE.read_text()) if LOST_EVENTS_FILE.exists() else []
        stopped = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        lost = earlier + [{**e, "lost_at": stopped} for e in
                          sorted(entries, key=lambda e: e["received"])]
        _write_private(LOST_EVENTS_FILE, json.dumps(lost, indent=1))
    for path in [*paths, *JOURNAL_DIR.glob("*.partial")]:
        path.unlink(missing_ok=True)
    return entries


def _report_lost_events() -> list[dict]:
    """The events the previous local cloud did not run (once: then kept as reported)."""
    _collect_lost_events()  # after a crash, nobody has collected them yet
    if not LOST_EVENTS_FILE.exists():
        return []
    lost = json.loads(LOST_EVENTS_FILE.read_text())
    os.replace(LOST_EVENTS_FILE, REPORTED_LOST_EVENTS_FILE)
    return lost


def _remove_old_environments() -> None:
    """The execution environments a killed server could not remove."""
    if ENVIRONMENTS_FILE.exists():
        from helpers.local_cloud.sandbox import remove_tree

        remove_tree(Path(ENVIRONMENTS_FILE.read_text().strip()))
        ENVIRONMENTS_FILE.unlink()


def admin_request(endpoint: str, path: str, *, method: str = "GET", body: bytes = b"",
                  state_dir: Path = STATE_DIR, timeout: float = 5) -> bytes:
    """A request to the local cloud's administrative API, signed with the workbook's key.

    Parameters
    ----------
    endpoint : str
        The local cloud's URL.
    path : str
        e.g. ``/moto-api/config`` or ``/local-cloud/aws-behaviour``.
    method : str
    body : bytes
        Sent raw (``Content-Type: text/plain``).
    state_dir : Path
        That local cloud's state folder (its key and certificate).
    timeout : float
        Seconds.

    Returns
    -------
    bytes
        The response body. HTTP errors raise ``urllib.error.HTTPError``.
    """
    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    key = own_key(state_dir)
    # The body must arrive raw: urllib's default form content type would make the server
    # parse it as a form and see an empty body.
    signed = AWSRequest(method=method, url=f"{endpoint}{path}", data=body,
                        headers={"Content-Type": "text/plain"})
    SigV4Auth(Credentials(key["AWS_ACCESS_KEY_ID"], key["AWS_SECRET_ACCESS_KEY"]),
              ADMIN_SERVICE, DEFAULT_REGION).add_auth(signed)
    request = urllib.request.Request(f"{endpoint}{path}", data=body if body else None,
                                     method=method, headers=dict(signed.headers.items()))
    context = ssl.create_default_context(cafile=str(state_dir / CERT_FILE.name))
    with urllib.request.urlopen(request, timeout=timeout, context=context) as response:
        return response.read()


def _is_up(endpoint: str, state_dir: Path = STATE_DIR) -> bool:
    try:
        admin_request(endpoint, moto_adapter.HEALTH_PATH, state_dir=state_dir, timeout=2)
        return True
    except (OSError, ValueError):  # refused, not up yet, or no key/certificate
        return False


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
        That local cloud's certificate (its key is beside it, in its state folder).
    """
    # moto counts requests before enforcing: "0" enforces from the next one, "inf" never.
    admin_request(endpoint, moto_adapter.IAM_ENFORCEMENT_PATH, method="POST",
                  body=b"0" if on else b"inf", state_dir=Path(ca_bundle).parent)


def set_aws_behaviour(endpoint: str | None = None, *, state_dir: Path = STATE_DIR,
                      **changes: Any) -> dict:
    """Make the running local cloud show (or stop showing) AWS behaviour it forgives.

    Parameters
    ----------
    endpoint : str, optional
        The local cloud's URL (default: this workbook's running one).
    state_dir : Path
        That local cloud's state folder.
    **changes
        Settings of :class:`helpers.local_cloud.aws_behaviour.AwsBehaviour`, e.g.
        ``async_time_scale=0.01``, ``deletion_delay_s=60``, ``cpu_shares=True``,
        ``ephemeral_storage=True``.

    Returns
    -------
    dict
        All settings now in force.
    """
    if endpoint is None:
        state = find()
        if state is None:
            raise LocalCloudMissing("the local cloud is not running: start it first "
                                    "(python -m helpers.local_cloud start)")
        endpoint = state["endpoint"]
    method = "POST" if changes else "GET"
    try:
        answer = admin_request(endpoint, AWS_BEHAVIOUR_ROUTE, method=method,
                               body=json.dumps(changes).encode() if changes else b"",
                               state_dir=state_dir)
    except urllib.error.HTTPError as exc:
        raise ValueError(json.loads(exc.read()).get("error", str(exc))) from None
    return json.loads(answer)


def serve(port: int) -> None:
    """Entry point of the server process: executor, AWS behaviour, authentication, serve."""
    from helpers.local_cloud import auth, aws_behaviour, executor

    aws_behaviour.CURRENT.update(aws_behaviour.environment_settings())
    endpoint = f"https://127.0.0.1:{port}"
    os.environ.setdefault("MOTO_PORT", str(port))
    moto_adapter.keep_s3_objects_on_disk()  # memory bounded however much a study stores
    executor.install(endpoint, JOURNAL_DIR, CERT_FILE)
    ENVIRONMENTS_FILE.write_text(str(executor.environments_root()))
    moto_adapter.delay_deletions(lambda: aws_behaviour.CURRENT.deletion_delay_s)
    app = auth.AuthMiddleware(moto_adapter.moto_app(), own_key(), moto_adapter.issued_secret,
                              admin_prefixes=(moto_adapter.ADMIN_PREFIX,),
                              routes={aws_behaviour.ROUTE: aws_behaviour.route})

    def stop_serving(signum: int, _frame: Any) -> None:
        executor.shutdown()
        ENVIRONMENTS_FILE.unlink(missing_ok=True)
        sys.stdout.flush()
        os._exit(0)

    signal.signal(signal.SIGTERM, stop_serving)
    signal.signal(signal.SIGINT, stop_serving)
    moto_adapter.serve("127.0.0.1", port, app, cert=str(CERT_FILE), key=str(KEY_FILE))
