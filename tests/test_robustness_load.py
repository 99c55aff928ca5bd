"""Load: 20 runs uploaded at once to a function capped at 3 concurrent copies. Every input
ends with exactly one result or one error record, the cap holds, nothing is lost; and the
status table notebook 03 saves has the documented shape.

Run with ``pytest -s`` to see the wall time and the peak concurrency.
"""
from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from helpers.cloud.logs import peak_concurrency
from helpers.cloud.status import STATUS_COLUMNS, write_status
from pipeline_fixtures import deploy_pipeline, nifti_bytes, phantom_run, remove_trigger

pytestmark = pytest.mark.slow  # the local cloud (see pyproject's markers)

N_RUNS = 20
CAP = 3
BAD = {"raw/load-18-empty_bold.nii.gz": b"",
       "raw/load-19-not-gzip_bold.nii.gz": nifti_bytes(phantom_run(seed=19), compress=False)}


@pytest.fixture(scope="module")
def load(cloud):
    pipeline = deploy_pipeline("load", max_concurrency=CAP, retry_attempts=1)
    bodies = {f"raw/load-{i:02d}_bold.nii.gz": nifti_bytes(phantom_run(seed=i))
              for i in range(N_RUNS - len(BAD))}
    bodies.update(BAD)
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=8) as pool:  # all at once, as a parallel upload does
        list(pool.map(lambda item: pipeline.upload(*item), bodies.items()))
    keys = sorted(bodies)
    pipeline.settle(keys, timeout=300)
    wall_s = time.monotonic() - started
    runs = pipeline.runs()
    peak = peak_concurrency(runs)
    median_s = sorted(r["duration_ms"] for r in runs)[len(runs) // 2] / 1000
    print(f"\nload: {N_RUNS} runs (16x16x8x20) uploaded at once, reserved concurrency {CAP}: "
          f"all answered in {wall_s:.1f} s; peak concurrency from the logs {peak}; "
          f"median invocation {median_s:.1f} s")
    yield pipeline, keys, runs, peak
    remove_trigger(pipeline)


def test_every_input_ends_with_exactly_one_result_or_error(load):
    pipeline, keys, _, _ = load
    for key in keys:
        objects = set(pipeline.outputs(key))
        if key in BAD:
            assert objects == {pipeline.out_key(key, "error")}, key
        else:
            assert objects == pipeline.expected_outputs(key), key
    table = pipeline.status(keys)
    assert (table["status"] == "processed").sum() == N_RUNS - len(BAD)
    assert set(table.loc[table["status"] == "failed", "key"]) == set(BAD)


def test_nothing_lost_and_nothing_run_twice(load):
    pipeline, keys, runs, _ = load
    assert sorted(r["key"] for r in runs) == keys  # one invocation per upload
    assert all(r["error"] is None for r in runs if r["key"] not in BAD)
    assert pipeline.failed_events() == []          # no event gave up on


def test_reserved_concurrency_is_never_exceeded(load):
    _, _, _, peak = load
    assert 1 <= peak <= CAP


def test_status_table_is_saved_with_the_documented_shape(load, tmp_path):
    pipeline, keys, _, _ = load
    path = write_status(pipeline.status(keys), tmp_path / "results" / "processing_status.json")
    saved = json.loads(path.read_text())
    assert list(saved) == ["inputs"] and len(saved["inputs"]) == N_RUNS
    assert [row["key"] for row in saved["inputs"]] == keys
    for row in saved["inputs"]:
        assert list(row) == STATUS_COLUMNS
        assert row["status"] in ("processed", "failed") and row["attempts"] == 1
        assert row["run"] == pipeline.run(row["key"]).id
        assert isinstance(row["duration_s"], float) and isinstance(row["max_memory_mb"], int)
        assert (row["reason"] != "") == (row["key"] in BAD)
