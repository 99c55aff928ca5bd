"""The whole series, run with papermill on its own local cloud, as `make workbook` does
(with the small CI parameters)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

pytestmark = pytest.mark.slow  # the local cloud (see pyproject's markers)

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted(p.name for p in (ROOT / "notebooks").glob("[0-9][0-9]*_*.ipynb"))


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    """Run ci/run_workbook.py --ci in a sandbox of its own; return its build folder."""
    sandbox = tmp_path_factory.mktemp("series")
    env = {**os.environ, "WORKBOOK_BUILD_DIR": str(sandbox / "build"),
           "WORKBOOK_DATA_DIR": str(sandbox / "data")}
    env.pop("PYTEST_CURRENT_TEST", None)
    done = subprocess.run([sys.executable, "ci/run_workbook.py", "--ci", "--build-dir",
                           str(sandbox / "build")], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=1200)
    print(done.stdout[-3000:], done.stderr[-3000:])
    assert done.returncode == 0, done.stderr[-3000:]
    return sandbox / "build"


def test_seven_notebooks_in_order():
    assert [n.split("_")[0] for n in NOTEBOOKS] == ["00", "01", "02", "03", "04", "04b", "05"]


def test_every_notebook_executed_without_errors(series):
    for name in NOTEBOOKS:
        nb = nbformat.read(series / "notebooks" / name, as_version=4)
        outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
        assert not [o for o in outputs if o.output_type == "error"], name
        assert all(c.get("execution_count") for c in nb.cells if c.cell_type == "code"), name
        assert (series / "html" / name.replace(".ipynb", ".html")).stat().st_size > 10_000


def test_every_run_was_processed(series):
    inputs = json.loads((series / "results" / "processing_status.json").read_text())["inputs"]
    assert inputs and {i["status"] for i in inputs} == {"processed"}
    assert all(i["max_memory_mb"] and i["duration_s"] for i in inputs)


def test_cleanup_left_nothing_and_costed_the_run(series):
    report = json.loads((series / "results" / "cleanup_report.json").read_text())
    assert report["remaining"] == []
    items = {item["item"]: item for item in report["cost_items"]}
    assert items["Lambda compute"]["quantity"] > 0
    assert report["cost_usd"] == pytest.approx(items["Total"]["cost_usd"])
    assert not (series / "local_cloud" / "state.json").exists()  # the local cloud was stopped


def test_connectivity_summary_compares_raw_and_preprocessed(series):
    summary = json.loads((series / "results" / "connectivity_summary.json").read_text())
    for measure in ("ari", "matrix_error", "qcfc"):
        assert set(summary["group"][measure]) == {"raw", "preproc"}


def test_data_driven_parcels_are_learned_on_other_subjects(series, tmp_path):
    """Notebook 04 again on the series' derivatives, without the simulation's labels: the
    parcellation is learned on half the subjects and the analysis uses the other half."""
    data_dir = series.parent / "data"
    env = {**os.environ, "WORKBOOK_BUILD_DIR": str(tmp_path / "build"),
           "WORKBOOK_DATA_DIR": str(data_dir)}
    env.pop("PYTEST_CURRENT_TEST", None)
    out = tmp_path / "04.ipynb"
    done = subprocess.run([sys.executable, "-m", "papermill", "--cwd", "notebooks",
                           "notebooks/04_connectivity_analysis.ipynb", str(out), "-p",
                           "download", "False", "-p", "atlas", "data-driven", "-p",
                           "n_parcels", "12", "-p", "use_widgets", "False"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    text = "".join(o.get("text", "") for c in nbformat.read(out, as_version=4).cells
                   if c.cell_type == "code" for o in c.outputs)
    n_subjects = len(list((data_dir / "raw").glob("sub-*")))
    learn, analyse = n_subjects // 2, n_subjects - n_subjects // 2
    assert f"on {learn} subjects, analysing the other {analyse}" in text
    summary = json.loads((tmp_path / "build" / "results" / "connectivity_summary.json")
                         .read_text())
    assert summary["parameters"]["atlas"] == "data-driven"
    assert 2 <= summary["parameters"]["n_regions"] <= 12
    assert summary["parameters"]["strategy_subjects"] <= analyse


def test_notebooks_are_committed_clean():
    for name in NOTEBOOKS:
        nb = nbformat.read(ROOT / "notebooks" / name, as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert not any(c.outputs or c.execution_count for c in code), f"{name}: strip outputs"
        assert sum("parameters" in c.metadata.get("tags", []) for c in code) == 1, name
        assert nb.cells[0].cell_type == "markdown", f"{name}: open with what it does"
