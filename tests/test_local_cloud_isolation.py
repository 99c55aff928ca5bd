"""The function's process is fenced in as on Lambda: it cannot read the server's secrets or
write its own code, gets a fresh code folder each time, and leaves no process behind."""
from __future__ import annotations

import json
import os

import psutil
import pytest

from helpers import local_cloud
from helpers.cloud.clients import client
from helpers.local_cloud import control

AS_ROOT = os.geteuid() == 0

PROBE = '''
import json, os, subprocess, sys, tempfile, threading, time

def _try(action):
    try:
        action()
        return "allowed"
    except Exception as exc:
        return type(exc).__name__

def lambda_handler(event, context):
    task = os.environ["LAMBDA_TASK_ROOT"]
    out = {"uid": os.getuid(), "task_root": task,
           "imported_planted": _try(lambda: __import__("planted")),
           "server_environ": _try(lambda: open(f"/proc/{os.getppid()}/environ").read()),
           "write_code": _try(lambda: open(os.path.join(task, "planted.py"), "w").write("X=1")),
           "tmp": _try(lambda: open(os.path.join(tempfile.gettempdir(), "f"), "w").write("x"))}
    for name in event.get("private", []):
        out[name] = _try(lambda: open(name).read())
    return out
'''

LEAVER = '''
import os, subprocess, threading, time

def lambda_handler(event, context):
    child = subprocess.Popen(["sleep", "301"])
    # A daemon that double-forks into a session of its own, escaping the process group.
    daemon = subprocess.Popen(["sh", "-c", "setsid sleep 302 & echo $!"],
                              stdout=subprocess.PIPE, text=True)
    escaped = int(daemon.stdout.readline())
    threading.Thread(target=time.sleep, args=(300,)).start()  # not a daemon thread
    return {"pids": [child.pid, escaped]}
'''


def _invoke(name, event):
    response = client("lambda").invoke(FunctionName=name, Payload=json.dumps(event))
    return response.get("FunctionError"), json.loads(response["Payload"].read())


def test_function_cannot_read_server_secrets_nor_write_its_code(deploy):
    name = deploy({"app.py": PROBE})
    private = [str(control.CREDENTIALS_FILE), str(control.KEY_FILE)]
    error, first = _invoke(name, {"private": private})
    assert error is None, first
    assert first["tmp"] == "allowed"  # /tmp is the function's own
    assert first["write_code"] == "PermissionError"  # /var/task is read-only
    assert first["imported_planted"] != "allowed"
    if AS_ROOT:  # as root, permission bits do not bind: the function runs as nobody
        assert first["uid"] == 65534
        assert first["server_environ"] == "PermissionError"
        assert all(first[path] == "PermissionError" for path in private)
    _, second = _invoke(name, {})
    assert second["task_root"] != first["task_root"]  # a fresh code folder each time
    assert not os.path.exists(first["task_root"])  # and the old one removed


def test_leftover_processes_end_with_the_invocation(deploy):
    name = deploy({"app.py": LEAVER}, timeout=30)
    error, payload = _invoke(name, {})
    assert error is None, payload
    for pid in payload["pids"]:
        assert not _running(pid), f"process {pid} outlived its invocation"
    report = [e["message"] for e in client("logs").filter_log_events(
        logGroupName=f"/aws/lambda/{name}")["events"] if e["message"].startswith("REPORT")][-1]
    duration_ms = float(report.split("Duration: ")[1].split(" ms")[0])
    assert duration_ms < 30_000  # the handler's return ended it, not the timeout


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.slow
def test_the_real_zip_imports_numpy_and_nibabel_and_boto3(cloud, role_arn):
    """The workbook's own zip (numpy + nibabel) and the runtime's boto3 import as the
    function's user."""
    from pipeline_fixtures import lambda_zip

    app = ("import numpy, nibabel, boto3, tempfile, os\n"
           "def probe(event, context):\n"
           "    path = os.path.join(tempfile.gettempdir(), 'x.nii.gz')\n"
           "    nibabel.save(nibabel.Nifti1Image(numpy.zeros((2, 2, 2), 'float32'),"
           " numpy.eye(4)), path)\n"
           "    return {'uid': os.getuid(), 'numpy': numpy.__version__,"
           " 'shape': list(nibabel.load(path).shape), 'boto3': boto3.__version__}\n")
    import io
    import zipfile
    buffer = io.BytesIO(lambda_zip())
    with zipfile.ZipFile(buffer, "a") as archive:
        archive.writestr("probe.py", app)
    lam = client("lambda")
    lam.create_function(FunctionName="real-zip-probe", Runtime="python3.11", Role=role_arn,
                        Handler="probe.probe", Code={"ZipFile": buffer.getvalue()},
                        Timeout=60, MemorySize=512)
    try:
        error, payload = _invoke("real-zip-probe", {})
    finally:
        lam.delete_function(FunctionName="real-zip-probe")
    assert error is None, payload
    assert payload["shape"] == [2, 2, 2] and payload["numpy"].startswith("2.")
    if AS_ROOT:
        assert payload["uid"] == 65534
    assert local_cloud.find() is not None
