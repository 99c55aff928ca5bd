"""Both course builds run on the local cloud with the CI parameters: the instructor build
through papermill (ci/run_workbook.py --course instructor), where every check must say Right;
the student build through nbval (``pytest --nbval-lax``), which executes each notebook and
fails on any cell error, so a check that raises on a student's empty answer is caught."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import nbformat
import papermill
import pytest
import yaml

from helpers.course import build

pytestmark = pytest.mark.slow  # the local cloud, the whole series

ROOT = Path(__file__).resolve().parents[1]


def _sandbox_env(sandbox: Path) -> dict:
    env = {**os.environ, "WORKBOOK_BUILD_DIR": str(sandbox / "build"),
           "WORKBOOK_DATA_DIR": str(sandbox / "data")}
    env.pop("PYTEST_CURRENT_TEST", None)
    return env


def _stop_local_cloud(env: dict) -> None:
    subprocess.run([sys.executable, "-m", "helpers.local_cloud", "stop"], cwd=ROOT, env=env,
                   capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def instructor_run(tmp_path_factory):
    sandbox = tmp_path_factory.mktemp("instructor")
    env = _sandbox_env(sandbox)
    try:
        done = subprocess.run([sys.executable, "ci/run_workbook.py", "--ci", "--course",
                               "instructor", "--build-dir", str(sandbox / "build")],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    finally:
        _stop_local_cloud(env)
    print(done.stdout[-3000:], done.stderr[-3000:])
    assert done.returncode == 0, done.stderr[-3000:]
    return sandbox / "build" / "notebooks"


def _check_outputs(path: Path) -> list[str]:
    """The Feedback each check cell displayed (its markdown form)."""
    texts = []
    for cell in nbformat.read(path, as_version=4).cells:
        if cell.cell_type == "code" and ".check_" in cell.source:
            texts += [o["data"]["text/markdown"] for o in cell.outputs
                      if "text/markdown" in o.get("data", {})]
    return texts


def test_instructor_build_every_check_says_right(instructor_run):
    executed = sorted(instructor_run.glob("*.ipynb"))
    assert [p.name for p in executed] == [p.name for p in build.source_notebooks()]
    n_checks = 0
    for path in executed:
        n_solutions = sum("solution" in c.metadata.get("tags", [])
                          for c in nbformat.read(path, as_version=4).cells)
        feedback = _check_outputs(path)
        assert len(feedback) >= n_solutions, path.name
        assert all("**Right**" in text for text in feedback), (path.name, feedback)
        n_checks += len(feedback)
    assert n_checks >= 15


def test_student_build_runs_under_nbval(tmp_path):
    """The student notebooks, CI parameters injected by papermill (not executed by it), are
    executed in order by nbval; any cell error fails the test."""
    sandbox = tmp_path
    student = build.build_course(sandbox / "course")["student"]
    assert not any("solution" in c.metadata.get("tags", [])
                   for p in student for c in nbformat.read(p, as_version=4).cells)
    params = yaml.safe_load((ROOT / "ci" / "parameters.yaml").read_text())
    prepared = sandbox / "prepared"
    prepared.mkdir()
    for path in student:
        papermill.execute_notebook(str(path), str(prepared / path.name),
                                   parameters=params.get(path.stem) or {}, prepare_only=True,
                                   kernel_name="python3")
    env = _sandbox_env(sandbox)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--nbval-lax",
             "--nbval-cell-timeout=900", "--rootdir", str(prepared), "-o", "addopts=",
             *[str(prepared / p.name) for p in student]],
            cwd=ROOT / "notebooks", env=env, capture_output=True, text=True, timeout=1500)
    finally:
        _stop_local_cloud(env)
    print(done.stdout[-4000:], done.stderr[-2000:])
    assert done.returncode == 0, done.stdout[-4000:]
    assert " passed" in done.stdout and " failed" not in done.stdout
