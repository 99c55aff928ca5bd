"""Stopping the local cloud leaves nothing behind: runs in flight end, their folders go, and
the events it could not run are recorded and reported by the next start."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from conftest import make_zip
from helpers.cloud.clients import client
from helpers.cloud.iam import lambda_trust_policy
from pipeline_fixtures import wait_until
from private_cloud import ROOT, private_cloud, run_module, sandbox_env, state_dir

SLEEPER = '''
import subprocess, time
def lambda_handler(event, context):
    subprocess.Popen(["sleep", "303"])
    time.sleep(120)
'''


def _deploy_sleeper() -> str:
    role = client("iam").create_role(RoleName="stop-role",
                                     AssumeRolePolicyDocument=json.dumps(lambda_trust_policy()))
    lam = client("lambda")
    lam.create_function(FunctionName="sleeper", Runtime="python3.11", Role=role["Role"]["Arn"],
                        Handler="app.lambda_handler", Code={"ZipFile": make_zip({"app.py": SLEEPER})},
                        Timeout=200, MemorySize=128)
    lam.put_function_concurrency(FunctionName="sleeper", ReservedConcurrentExecutions=1)
    return "sleeper"


def _journal(sandbox: Path) -> list[dict]:
    entries = []
    for path in (state_dir(sandbox) / "pending_events").glob("*.json"):
        try:
            entries.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            pass  # replaced while we read
    return entries


def _runs_left(environments: Path) -> list[psutil.Process]:
    """Processes of the function (its bootstrap, its ``sleep 303``) still running."""
    found = []
    for process in psutil.process_iter(["cmdline", "status"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if process.info["status"] != psutil.STATUS_ZOMBIE and (
                str(environments) in cmdline or cmdline == "sleep 303"):
            found.append(process)
    return found


def _start_again(sandbox: Path) -> list[dict]:
    """Start the sandbox's local cloud as a notebook does; the lost events it reports."""
    script = ("import json\nfrom helpers import local_cloud\n"
              "print(json.dumps(local_cloud.ensure_running()['lost_events']))")
    done = subprocess.run([sys.executable, "-c", script], env=sandbox_env(sandbox), cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def _send_events_and_wait_for_a_run(sandbox: Path, count: int) -> Path:
    name = _deploy_sleeper()
    for n in range(count):
        client("lambda").invoke(FunctionName=name, InvocationType="Event",
                                Payload=json.dumps({"n": n}))
    assert wait_until(lambda: any(e["stage"] == "running" for e in _journal(sandbox)),
                      timeout=60)
    assert wait_until(lambda: any(" ".join(p.info["cmdline"] or []) == "sleep 303"
                                  for p in psutil.process_iter(["cmdline"])), timeout=30)
    return Path((state_dir(sandbox) / "environments_dir").read_text())


@pytest.mark.slow
def test_stop_ends_runs_removes_folders_and_records_lost_events(tmp_path):
    with private_cloud(tmp_path):
        environments = _send_events_and_wait_for_a_run(tmp_path, count=3)
        assert environments.exists()
        stopped = run_module(tmp_path, "helpers.local_cloud", "stop", timeout=60)
        assert stopped.stdout.strip() == "stopped"
        assert _runs_left(environments) == []
        assert not environments.exists()
        lost_file = state_dir(tmp_path) / "lost_events.json"
        lost = json.loads(lost_file.read_text())
        assert sorted(e["event"]["n"] for e in lost) == [0, 1, 2]
        assert sorted(e["stage"] for e in lost) == ["queued", "queued", "running"]
        assert all(e["function"] == "sleeper" for e in lost)
        # The next start reports them once, and keeps the record.
        reported = _start_again(tmp_path)
        assert sorted(e["event"]["n"] for e in reported) == [0, 1, 2]
        assert not lost_file.exists()
        assert (state_dir(tmp_path) / "lost_events.reported.json").exists()
        assert _start_again(tmp_path) == []  # running already: nothing new to report


@pytest.mark.slow
def test_a_killed_server_takes_its_runs_along_and_the_next_start_reports_them(tmp_path):
    with private_cloud(tmp_path) as state:
        environments = _send_events_and_wait_for_a_run(tmp_path, count=1)
        os.killpg(state["pid"], signal.SIGKILL)  # no chance to clean up
        # The cmdline captured while listing: a process may turn zombie after that.
        bootstraps = lambda: [p for p in _runs_left(environments)  # noqa: E731
                              if str(environments) in " ".join(p.info["cmdline"] or [])]
        assert wait_until(lambda: not bootstraps(), timeout=30)
        reported = _start_again(tmp_path)
        assert [(e["event"], e["stage"]) for e in reported] == [({"n": 0}, "running")]
        assert not environments.exists()  # removed by the next start
        for leftover in _runs_left(environments):  # the run's own child, orphaned by SIGKILL
            leftover.kill()
