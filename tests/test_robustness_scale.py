"""Runs sized against the function, and the TR, through the deployed function (local cloud).

- A run that cannot fit the function's memory, /tmp or remaining time gets a permanent error
  record naming the limit and the setting that fixes it, from its header alone: nothing is
  downloaded, the function's memory stays at the interpreter's.
- The TR comes from the run's sidecar, inherited from the dataset-level task json, else the
  header; the output sidecar says which; a TR in milliseconds is refused.
- A multiband-size run (100 x 100 x 72 x 300, int16) goes through a function sized for it
  with ``FunctionSpec.sized_for``.
"""
from __future__ import annotations

import gzip
import json

import nibabel as nib
import numpy as np
import pytest

from helpers.cloud.deploy import FunctionSpec
from pipeline_fixtures import PLAIN, deploy_pipeline, nifti_bytes, phantom_run
from scale_runs import write_head_run

pytestmark = pytest.mark.slow  # the local cloud (see pyproject's markers)

# 160 MB (0.09 vCPU), 60 s, 512 MB of /tmp: a small grid fits, these do not
SMALL_FUNCTION = dict(memory_mb=160, timeout_s=60, ephemeral_mb=512)


def _zeros_run(shape, n_volumes) -> bytes:
    """A valid int16 run of zeros: its header claims the full size, its upload is tiny."""
    header = nib.Nifti1Header()
    header.set_data_shape((*shape, n_volumes))
    header.set_data_dtype(np.int16)
    header.set_zooms((2.0, 2.0, 2.0, 0.8))
    header.set_sform(np.diag([2.0, 2.0, 2.0, 1.0]), code=1)
    raw = header.binaryblock + b"\0" * 4 + bytes(int(np.prod(shape)) * n_volumes * 2)
    return gzip.compress(raw, compresslevel=1, mtime=0)


TOO_LARGE = {  # key -> (body, the setting the error must name)
    "raw/sub-big_task-rest_bold.nii.gz": (_zeros_run((100, 100, 72), 20), "MemorySize"),
    "raw/sub-long_task-rest_bold.nii.gz": (_zeros_run((64, 64, 32), 320), "EphemeralStorage"),
    "raw/sub-slow_task-rest_bold.nii.gz": (_zeros_run((64, 64, 32), 80), "Timeout"),
}
GOOD = nifti_bytes(phantom_run(seed=3))  # header TR 2.0 s
SIDECARS = {"raw/task-rest_bold.json": {"RepetitionTime": 1.5, "TaskName": "rest"},
            "raw/sub-02/func/sub-02_task-rest_bold.json": {"RepetitionTime": 0.8},
            "raw/sub-03/func/sub-03_task-ms_bold.json": {"RepetitionTime": 2000}}
TR_RUNS = {"raw/sub-01/func/sub-01_task-rest_bold.nii.gz": (1.5, "sidecar"),  # inherited
           "raw/sub-02/func/sub-02_task-rest_bold.nii.gz": (0.8, "sidecar"),  # its own wins
           "raw/sub-04_task-flat_bold.nii.gz": (2.0, "header")}               # no sidecar
MS_RUN = "raw/sub-03/func/sub-03_task-ms_bold.nii.gz"


@pytest.fixture(scope="module")
def small(cloud):
    pipeline = deploy_pipeline("scale", max_concurrency=2, **SMALL_FUNCTION)
    for key, document in SIDECARS.items():  # sidecars first, as notebook 03 uploads
        pipeline.upload(key, json.dumps(document).encode())
    for key, (body, _) in TOO_LARGE.items():
        pipeline.upload(key, body)
    for key in [*TR_RUNS, MS_RUN]:
        pipeline.upload(key, GOOD)
    keys = [*TOO_LARGE, *TR_RUNS, MS_RUN]
    pipeline.settle(keys, timeout=240)
    return pipeline


@pytest.mark.parametrize("key", list(TOO_LARGE))
def test_a_run_that_cannot_fit_names_the_setting_before_any_download(small, key):
    setting = TOO_LARGE[key][1]
    record = small.record(key, "error")
    assert record["permanent"] is True and record["error_type"] == "RunTooLarge"
    assert f"({setting})" in record["error"] and "the header claims" in record["error"]
    assert f"Raise {setting}" in record["action"]
    assert small.outputs(key).keys() == {small.out_key(key, "error")}
    run, = small.runs(key)
    assert run["error_type"] is None  # a clear record, not a crash
    assert run["max_memory_mb"] < SMALL_FUNCTION["memory_mb"]
    assert key not in small.failed_keys()  # permanent: not retried


@pytest.mark.parametrize("key", list(TR_RUNS))
def test_the_tr_comes_from_the_sidecar_then_the_header(small, key):
    tr, source = TR_RUNS[key]
    sidecar = json.loads(small.read(small.out_key(key, "preproc_json")))
    assert sidecar["RepetitionTime"] == tr
    assert sidecar["RepetitionTimeSource"]["Source"] == source
    if source == "sidecar":  # the header's 2.0 s disagrees, and the sidecar says so
        assert sidecar["RepetitionTimeSource"]["Header"] == 2.0
        assert "2 s" in sidecar["RepetitionTimeSource"]["Note"]
    assert small.record(key, "done")["repetition_time_s"] == tr


def test_a_tr_in_milliseconds_is_refused(small):
    record = small.record(MS_RUN, "error")
    assert "looks like milliseconds" in record["error"] and record["permanent"] is True
    assert "RepetitionTime" in record["action"]


def test_a_multiband_size_run_goes_through_a_function_sized_for_it(cloud, tmp_path):
    """100 x 100 x 72 x 300 int16 (864 MB as float32): the sized function processes it,
    and its memory stays at the model's, far below the run's size."""
    shape, n_volumes = (100, 100, 72), 300
    spec = FunctionSpec.sized_for(shape, n_volumes, max_concurrency=1)
    pipeline = deploy_pipeline("multiband", spec=spec)
    src = tmp_path / "sub-01_task-rest_bold.nii.gz"
    write_head_run(src, shape, n_volumes)
    key = "raw/sub-mb/func/sub-mb_task-rest_bold.nii.gz"
    pipeline.upload(key, src.read_bytes())
    pipeline.settle([key], timeout=spec.timeout_s + 120)
    done = pipeline.record(key, "done")
    assert done["n_volumes"] == n_volumes
    assert pipeline.outputs(key).keys() == pipeline.expected_outputs(key, normalised=True)
    run, = pipeline.runs(key)
    float32_mb = np.prod(shape) * n_volumes * 4 / 2**20
    assert run["memory_mb"] == spec.memory_mb and run["error_type"] is None
    assert run["max_memory_mb"] < 0.5 * float32_mb
    lines = pipeline.handler_lines(key)
    fits, = [line for line in lines if line["message"] == "fits"]
    assert fits["needs_memory_mb"] >= done["peak_memory_mb"]
    print(f"\nmultiband run {shape} x {n_volumes} at {spec.memory_mb} MB: "
          f"{run['duration_ms'] / 1000:.0f} s (model {fits['needs_s']} s), max memory "
          f"{run['max_memory_mb']} MB (engine {done['peak_memory_mb']:.0f}, model "
          f"{fits['needs_memory_mb']}), /tmp model {fits['needs_tmp_mb']} MB of "
          f"{spec.ephemeral_mb}")
