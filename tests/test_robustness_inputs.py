"""Whatever a user uploads, the pipeline answers with a complete result or a clear error record.

Pipeline level: real uploads to the local cloud, the real deployment zip deployed as notebook
02 deploys it (with ``MAX_INPUT_MB=1``), and only what a user can see afterwards: objects in
the output bucket, the function's logs, the status table and the failure queue. The engine's
own checks are tested in ``test_engine_inputs.py``.
"""
from __future__ import annotations

import gzip
import io
import json
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

import fmri_preproc
from fmri_preproc.contract import MOTION_PARAMS
from pipeline_fixtures import (N_VOLUMES, PLAIN, SHAPE, centred_affine, deploy_pipeline,
                               input_state, load_nifti, nifti_bytes, phantom_motion,
                               phantom_run, remove_trigger)

pytestmark = pytest.mark.slow  # the local cloud (see pyproject's markers)

MAX_INPUT_MB = 1
GOOD = phantom_run(seed=1)


def _billions_of_voxels() -> bytes:
    """A valid header claiming 2000 x 2000 x 1000 x 1000 float32 values, and 4 kB of data."""
    header = nib.Nifti1Header()
    header.set_data_shape((2000, 2000, 1000, 1000))
    header.set_data_dtype(np.float32)
    header.set_sform(PLAIN, code=1)
    return gzip.compress(header.binaryblock + b"\0" * 4 + b"\0" * 4096, mtime=0)


def _rgb() -> bytes:
    rgb = np.zeros(GOOD.shape, dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    rgb["R"] = np.clip(GOOD / 5, 0, 255).astype("u1")
    return nifti_bytes(rgb)


def _mostly_nonfinite() -> bytes:
    data = GOOD.copy()
    data.reshape(-1)[::2] = np.nan
    data.reshape(-1)[1::4] = np.inf
    return nifti_bytes(data)


def _noise_over_limit() -> bytes:
    """A valid run of incompressible noise: about 1.2 MB, over the 1 MB limit."""
    noise = np.random.default_rng(2).normal(1000, 50, size=(32, 32, 16, 20))
    return nifti_bytes(noise.astype(np.float32))


_rng = np.random.default_rng(7)
# case -> (bytes, words the error record must contain)
BAD = {
    "not-gzip": (nifti_bytes(GOOD, compress=False), "not gzip-compressed"),
    "truncated": (nifti_bytes(GOOD)[:40_000], "could not be read"),
    "random-bytes": (_rng.bytes(40_000), "not gzip-compressed"),
    "random-bytes-gzipped": (gzip.compress(_rng.bytes(40_000), mtime=0),
                             "could not be read as NIfTI"),
    "single-3d-volume": (nifti_bytes(GOOD[..., 0]), "3D image"),
    "one-volume": (nifti_bytes(GOOD[..., :1]), "1 volume(s)"),
    "billions-of-voxels": (_billions_of_voxels(), "the header claims"),
    "complex": (nifti_bytes(GOOD.astype(np.complex64)), "complex64 values"),
    "rgb": (_rgb(), "real-valued intensities are needed"),
    "mostly-nan-inf": (_mostly_nonfinite(), "NaN or infinite"),
    "all-zero": (nifti_bytes(np.zeros_like(GOOD)), "constant"),
    "empty": (b"", "empty"),
    "over-size-limit": (_noise_over_limit(), f"over this function's limit of {MAX_INPUT_MB} MB"),
}

_rotation = fmri_preproc.params_to_affine([0, 0, 0, 0.25, -0.15, 0.3], np.eye(4), (1, 1, 1))
AFFINES = {"oblique": centred_affine(_rotation[:3, :3] @ np.diag([3.5, 3.5, 4.0])),
           "lps": centred_affine(np.diag([-3.5, -3.5, 4.0]))}
NONFINITE = [(3, 4, 2, 5), (8, 8, 4, 9), (10, 2, 6, 15)]  # voxels set to NaN, +Inf, -Inf


def _with_a_few_nonfinite() -> bytes:
    data = GOOD.copy()
    for value, index in zip((np.nan, np.inf, -np.inf), NONFINITE):
        data[index] = value
    return nifti_bytes(data)


# case -> (bytes, affine): valid but unusual inputs, processed like any other
GOOD_CASES = {
    "plain": (nifti_bytes(GOOD), PLAIN),
    "int16-scaled": (nifti_bytes(np.round((GOOD - 100) / 0.5).astype(np.int16), slope=0.5,
                                 inter=100.0), PLAIN),
    "oblique": (nifti_bytes(phantom_run(affine=AFFINES["oblique"], seed=1), AFFINES["oblique"]),
                AFFINES["oblique"]),
    "lps": (nifti_bytes(phantom_run(affine=AFFINES["lps"], seed=1), AFFINES["lps"]),
            AFFINES["lps"]),
    "a-few-nan-inf": (_with_a_few_nonfinite(), PLAIN),
    "sub 07 é+ü": (nifti_bytes(GOOD), PLAIN),  # spaces, '+' and non-ASCII in the key
}

# Keys the trigger must never pass to the function (prefix raw/, suffix _bold.nii.gz).
OUTSIDE = ["other/outside-prefix_bold.nii.gz", "outside-prefix-root_bold.nii.gz",
           "raw/outside-suffix_bold.nii", "raw/outside-suffix_T1w.nii.gz",
           "raw/outside-suffix_bold.nii.gz.txt"]


def key_of(case: str) -> str:
    return f"raw/{case}_bold.nii.gz"


@pytest.fixture(scope="module")
def uploaded(cloud):
    """Upload every case at once (outside keys first), then wait until each has an answer."""
    pipeline = deploy_pipeline("inputs", max_input_mb=MAX_INPUT_MB, max_concurrency=2)
    bodies = {key: b"" for key in OUTSIDE}
    bodies.update({key_of(case): body for case, (body, _) in BAD.items()})
    bodies.update({key_of(case): body for case, (body, _) in GOOD_CASES.items()})
    bodies[OUTSIDE[0]] = nifti_bytes(GOOD)  # a valid run: only its key is wrong
    etags = {key: pipeline.upload(key, body) for key, body in bodies.items()}
    inside = [key_of(case) for case in [*BAD, *GOOD_CASES]]
    pipeline.settle(inside, timeout=240)
    yield pipeline, bodies, etags
    remove_trigger(pipeline)


def _assert_untouched(pipeline, key, bodies, etags):
    etag, body = input_state(pipeline, key)
    assert etag == etags[key] and body == bodies[key], "the input was modified"


# ------------------------------------------------------------------------------------------
# Bad inputs: an error record, a log line, one invocation, nothing else


@pytest.mark.parametrize("case", BAD)
def test_bad_input_gets_a_readable_error_record(uploaded, case):
    pipeline, _, _ = uploaded
    key = key_of(case)
    record = pipeline.record(key, "error")
    assert BAD[case][1] in record["error"]
    assert record["cause"] and record["action"]  # likely cause, what to do
    assert record["error_type"] == "InputError" and record["permanent"] is True
    assert record["source"] == f"s3://{pipeline.cfg.input_bucket}/{key}"
    # The function's log says the same, in one JSON line at level ERROR.
    failed = [line for line in pipeline.handler_lines(key) if line["message"] == "failed"]
    assert len(failed) == 1 and failed[0]["level"] == "ERROR"
    assert BAD[case][1] in failed[0]["error"] and failed[0]["permanent"] is True
    # Notebook 03's status table shows it as failed, with the reason.
    row = pipeline.status([key]).iloc[0]
    assert row["status"] == "failed" and BAD[case][1] in row["reason"]


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_not_retried_and_leaves_nothing_else(uploaded, case):
    pipeline, bodies, etags = uploaded
    key = key_of(case)
    # Exactly one invocation, which ended normally: Lambda has nothing to retry.
    runs = pipeline.runs(key)
    assert len(runs) == 1
    assert runs[0]["error_type"] is None
    assert key not in pipeline.failed_keys()
    # No partial output, no completion marker: only the error record.
    assert set(pipeline.outputs(key)) == {pipeline.out_key(key, "error")}
    _assert_untouched(pipeline, key, bodies, etags)


def test_huge_header_is_rejected_before_any_allocation(uploaded):
    pipeline, _, _ = uploaded
    run, = pipeline.runs(key_of("billions-of-voxels"))
    # 4e12 float32 values would be 16 TB; the run stayed at the interpreter's own size.
    assert run["error_type"] is None and run["max_memory_mb"] < run["memory_mb"]


def test_size_limit_is_checked_before_download(uploaded):
    """The handler's own check (from the event's size) answers, not the engine's."""
    pipeline, _, _ = uploaded
    record = pipeline.record(key_of("over-size-limit"), "error")
    assert "MAX_INPUT_MB" in record["action"]


# ------------------------------------------------------------------------------------------
# Valid but unusual inputs: processed, and processed correctly


def _engine_result(body: bytes, name: str) -> dict:
    """The engine run locally on the same bytes: what the cloud should have produced."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_bytes(body)
        result = fmri_preproc.preprocess(path, Path(tmp) / "out", fwhm=6.0)
        img = nib.load(result.outputs["smoothed_bold"])
        return {"affine": img.affine, "data": np.asarray(img.dataobj, dtype=np.float32),
                "confounds": pd.read_csv(result.outputs["confounds"], sep="\t")}


@pytest.mark.parametrize("case", GOOD_CASES)
def test_unusual_but_valid_input_is_processed_correctly(uploaded, case):
    pipeline, bodies, etags = uploaded
    key = key_of(case)
    body, affine = GOOD_CASES[case]
    assert set(pipeline.outputs(key)) == pipeline.expected_outputs(key)  # no error record
    assert len(pipeline.runs(key)) == 1
    assert pipeline.status([key]).iloc[0]["status"] == "processed"
    _assert_untouched(pipeline, key, bodies, etags)
    # The cloud's result is the engine's result on the same file ...
    img, data = load_nifti(pipeline.read(pipeline.out_key(key, "smoothed_bold")))
    confounds = pd.read_csv(io.BytesIO(pipeline.read(pipeline.out_key(key, "confounds"))),
                            sep="\t")
    local = _engine_result(body, key.split("/")[-1])
    assert np.allclose(data, local["data"], rtol=1e-5, atol=1e-3)
    pd.testing.assert_frame_equal(confounds, local["confounds"], rtol=1e-5, atol=1e-6)
    # ... in the input's own space (orientation kept) ...
    assert np.allclose(img.affine, affine, atol=1e-4)
    assert nib.aff2axcodes(img.affine) == nib.aff2axcodes(affine)
    assert data.shape == (*SHAPE, N_VOLUMES) and len(confounds) == N_VOLUMES
    # ... with the true motion found, whatever the orientation. A 16x16x8 run limits the
    # precision (about 0.1 mm, 0.4 degrees here); test_engine_inputs.py checks it closely.
    found = confounds[list(MOTION_PARAMS)].to_numpy()
    error = np.abs(found - phantom_motion(seed=1))
    assert error[:, :3].max() < 0.5 and np.degrees(error[:, 3:].max()) < 1.0


def test_int16_scaling_is_applied(uploaded):
    """Intensities come out in the scaled units (slope 0.5, intercept 100), not raw integers."""
    pipeline, _, _ = uploaded
    _, scaled = load_nifti(pipeline.read(pipeline.out_key(key_of("int16-scaled"), "preproc_bold")))
    _, plain = load_nifti(pipeline.read(pipeline.out_key(key_of("plain"), "preproc_bold")))
    # The reference volume is neither resliced nor smoothed: the same as the float32 run's
    # within the quantisation step (0.5), where the raw integers would be about twice as large.
    ref = N_VOLUMES // 2
    assert np.abs(scaled[..., ref] - plain[..., ref]).max() < 0.5
    assert pipeline.record(key_of("int16-scaled"), "done")["n_volumes"] == N_VOLUMES


def test_a_few_nonfinite_values_are_zeroed_and_counted(uploaded):
    pipeline, _, _ = uploaded
    key = key_of("a-few-nan-inf")
    assert pipeline.record(key, "done")["n_nonfinite"] == len(NONFINITE)
    sidecar = json.loads(pipeline.read(pipeline.out_key(key, "preproc_json")))
    assert sidecar["NonFiniteValuesSetToZero"] == len(NONFINITE)
    _, data = load_nifti(pipeline.read(pipeline.out_key(key, "preproc_bold")))
    assert np.isfinite(data).all()


def test_key_with_spaces_and_non_ascii_keeps_its_name(uploaded):
    """S3 URL-encodes keys in events ('+' for space, %2B for '+'); outputs use the real name."""
    pipeline, _, _ = uploaded
    key = key_of("sub 07 é+ü")
    assert "derivatives/sub 07 é+ü_done.json" in pipeline.outputs(key)  # the contract's name
    assert pipeline.record(key, "done")["source"].endswith("raw/sub 07 é+ü_bold.nii.gz")
    assert [line["key"] for line in pipeline.handler_lines(key)][:1] == [key]


# ------------------------------------------------------------------------------------------
# Outside the trigger's prefix or suffix: never processed


@pytest.mark.parametrize("key", OUTSIDE)
def test_key_outside_the_trigger_is_never_processed(uploaded, key):
    pipeline, bodies, etags = uploaded
    # Uploaded before every other case, which have all been answered since.
    assert pipeline.runs(key) == [] and pipeline.handler_lines(key) == []
    assert pipeline.outputs(key) == {}
    _assert_untouched(pipeline, key, bodies, etags)


def test_handler_skips_a_key_outside_its_prefix_if_invoked_anyway(uploaded):
    """A second line of defence (e.g. a trigger misconfigured by hand): nothing is written."""
    pipeline, _, _ = uploaded
    key = "other/invoked-directly_bold.nii.gz"
    payload = pipeline.invoke(pipeline.event(key, 1000))
    result, = payload["results"]
    assert result["status"] == "skipped" and "outside the input prefix" in result["reason"]
    assert pipeline.outputs(key) == {}
