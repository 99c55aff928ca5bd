"""One current state per input: the latest upload wins, records never contradict each other,
permanent conditions are not retried, and inputs with the same file name never collide.

Pipeline level, as the other ``test_robustness_*`` modules: the real zip deployed as notebook
02 deploys it, and only what a user sees afterwards (objects, logs, status, failure queue).
"""
from __future__ import annotations

import time

import pytest

from helpers.cloud.clients import client
from pipeline_fixtures import (N_VOLUMES, deploy_pipeline, load_nifti, nifti_bytes,
                               phantom_run, remove_trigger, wait_until)

pytestmark = pytest.mark.slow  # the local cloud (see pyproject's markers)

GOOD = nifti_bytes(phantom_run(seed=3))
SLOW = nifti_bytes(phantom_run(shape=(40, 40, 20), n_volumes=150, seed=4))  # ~10 s to process
LONG_NAME = "sub-01_task-" + "a" * 220 + "_bold.nii.gz"  # 240 bytes: a valid S3 key segment


@pytest.fixture(scope="module")
def pipeline(cloud):
    deployed = deploy_pipeline("state", max_concurrency=3, retry_attempts=1)
    yield deployed
    remove_trigger(deployed)


def _volumes(pipeline, key) -> int:
    _, data = load_nifti(pipeline.read(pipeline.out_key(key, "preproc_bold")))
    return data.shape[3]


def test_the_latest_upload_wins_even_when_an_older_run_finishes_last(pipeline):
    key = "raw/sub-01/func/sub-01_task-race_bold.nii.gz"
    pipeline.upload(key, SLOW)
    time.sleep(1.5)  # the slow run is under way (its log lines appear only when it ends)
    newer = pipeline.upload(key, GOOD).strip('"')
    pipeline.settle([key], timeout=180)
    assert wait_until(lambda: len(pipeline.runs(key)) == 2, timeout=120)
    marker = pipeline.record(key, "done")
    assert marker["etag"] == newer and marker["n_volumes"] == N_VOLUMES
    assert _volumes(pipeline, key) == N_VOLUMES  # the outputs are the newer upload's too
    superseded = [line for line in pipeline.handler_lines(key)
                  if line["message"] == "superseded"]
    assert len(superseded) == 1 and superseded[0]["etag"] != newer
    assert pipeline.status([key]).iloc[0]["status"] == "processed"


def test_a_bad_upload_over_a_good_one_leaves_only_its_error(pipeline):
    key = "raw/sub-02/func/sub-02_task-rest_bold.nii.gz"
    pipeline.upload(key, GOOD)
    pipeline.settle([key])
    assert pipeline.status([key]).iloc[0]["status"] == "processed"
    pipeline.upload(key, b"")
    assert wait_until(lambda: pipeline.status([key]).iloc[0]["status"] == "failed", timeout=60)
    assert set(pipeline.outputs(key)) == {pipeline.out_key(key, "error")}  # no stale result
    assert "empty" in pipeline.status([key]).iloc[0]["reason"]


def test_a_fixed_upload_over_a_failed_one_removes_the_error(pipeline):
    key = "raw/sub-03/func/sub-03_task-rest_bold.nii.gz"
    pipeline.upload(key, b"not a nifti file")
    assert wait_until(lambda: pipeline.status([key]).iloc[0]["status"] == "failed", timeout=60)
    pipeline.upload(key, GOOD)
    assert wait_until(lambda: pipeline.status([key]).iloc[0]["status"] == "processed",
                      timeout=60)
    assert wait_until(lambda: set(pipeline.outputs(key)) == pipeline.expected_outputs(key),
                      timeout=10)  # the error record is gone


def test_a_deleted_input_is_a_permanent_error_and_not_retried(pipeline):
    """An event for an object deleted right after its upload (HeadObject/GetObject 404)."""
    key = "raw/sub-04/func/sub-04_task-rest_bold.nii.gz"
    event = pipeline.event(key, len(GOOD))
    event["Records"][0]["s3"]["object"]["eTag"] = "0" * 32
    payload = pipeline.invoke(event)
    assert payload["results"][0]["status"] == "failed"
    record = pipeline.record(key, "error")
    assert record["permanent"] is True and "gone" in record["error"]
    assert "Upload the run again" in record["action"]


def test_an_archived_input_is_a_permanent_error(pipeline):
    key = "raw/sub-05/func/sub-05_task-rest_bold.nii.gz"
    client("s3").put_object(Bucket=pipeline.cfg.input_bucket, Key=key, Body=GOOD,
                            StorageClass="GLACIER")
    assert wait_until(lambda: pipeline.status([key]).iloc[0]["status"] == "failed", timeout=60)
    record = pipeline.record(key, "error")
    assert record["permanent"] is True and "archive" in record["cause"]
    assert len(pipeline.runs(key)) == 1 and key not in pipeline.failed_keys()


def test_a_long_file_name_is_processed(pipeline):
    """Local file names never depend on the key: a 240-byte name is fine."""
    key = f"raw/sub-01/func/{LONG_NAME}"
    pipeline.upload(key, GOOD)
    pipeline.settle([key])
    assert pipeline.status([key]).iloc[0]["status"] == "processed"
    assert set(pipeline.outputs(key)) == pipeline.expected_outputs(key)


def test_same_named_files_in_other_folders_and_sessions_never_collide(pipeline):
    keys = ["raw/siteA/sub-06_task-rest_bold.nii.gz", "raw/siteB/sub-06_task-rest_bold.nii.gz",
            *[f"raw/sub-07/ses-{s}/func/sub-07_ses-{s}_task-rest_run-{r}_bold.nii.gz"
              for s in (1, 2) for r in (1, 2)]]
    bodies = {key: nifti_bytes(phantom_run(seed=10 + k)) for k, key in enumerate(keys)}
    etags = {key: pipeline.upload(key, body).strip('"') for key, body in bodies.items()}
    assert len(set(etags.values())) == len(keys)
    pipeline.settle(keys, timeout=180)
    table = pipeline.status(keys)
    assert list(table["status"]) == ["processed"] * len(keys)
    assert table["run"].nunique() == len(keys)
    for key in keys:  # each result is its own input's
        marker = pipeline.record(key, "done")
        assert marker["source"].endswith(key) and marker["etag"] == etags[key]
