"""What a run needs, from its header alone (fmri_preproc.resources), and a function sized for
it (FunctionSpec.sized_for): the limits named, and the model checked against the engine."""
import gzip
import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from fmri_preproc import resources
from fmri_preproc.resources import RunShape, RunTooLarge, check_fits, largest_run, needs
from helpers.cloud.deploy import FunctionSpec
from scale_runs import write_head_run

MULTIBAND = RunShape((100, 100, 72), 600)
ROOMY = dict(memory_mb=10240, tmp_free_mb=1e9, remaining_s=1e9)


def test_shape_from_the_first_bytes_of_a_gzip_stream(tmp_path):
    path = tmp_path / "sub-01_task-rest_bold.nii.gz"
    write_head_run(path, (20, 18, 12), 9)
    start = path.read_bytes()[:resources.HEADER_BYTES // 64]  # 1 kB of a cut-off stream
    assert resources.shape_from_header_bytes(start) == RunShape((20, 18, 12), 9, 2)


@pytest.mark.parametrize("body", [b"\x1f\x8b" + bytes(400), bytes(400),
                                  gzip.compress(nib.Nifti1Image(np.zeros((5, 5, 5)),
                                                                np.eye(4)).to_bytes())])
def test_no_4d_nifti_header_is_a_value_error(body):
    with pytest.raises(ValueError):
        resources.shape_from_header_bytes(body)


def test_memory_depends_on_the_grid_not_the_length():
    short, long = needs(RunShape((100, 100, 72), 150)), needs(MULTIBAND)
    assert short.memory_mb == long.memory_mb
    assert long.tmp_mb > 3.5 * short.tmp_mb and long.seconds > 3 * short.seconds
    # half a vCPU below 1,769 MB: the computing takes twice as long (not the transfers);
    # above: no faster (one thread)
    assert needs(MULTIBAND, memory_mb=884).seconds > 1.5 * long.seconds
    assert needs(MULTIBAND, memory_mb=3538).seconds == long.seconds


@pytest.mark.parametrize("limit, setting", [
    (dict(memory_mb=128), "MemorySize"),
    (dict(tmp_free_mb=512), "EphemeralStorage"),
    (dict(remaining_s=120), "Timeout")])
def test_a_run_that_does_not_fit_names_the_limit_and_the_setting(limit, setting):
    with pytest.raises(RunTooLarge) as caught:
        check_fits(MULTIBAND, name="sub-01_task-rest_bold.nii.gz", **{**ROOMY, **limit})
    error = caught.value
    assert error.limit == setting and f"({setting})" in error.message
    assert "100x100x72x600" in error.message and "the header claims" in error.message
    assert f"Raise {setting}" in error.action and "FunctionSpec.sized_for" in error.action


def test_runs_no_lambda_can_take_are_told_to_split():
    huge = RunShape((100, 100, 72), 3000)
    for limit in (dict(tmp_free_mb=10240), dict(remaining_s=900, memory_mb=1769)):
        with pytest.raises(RunTooLarge) as caught:
            check_fits(huge, name="x_bold.nii.gz", **{**ROOMY, **limit})
        assert "split the run" in caught.value.action
    with pytest.raises(ValueError, match="Split"):
        FunctionSpec.sized_for((100, 100, 72), 3000)


@pytest.mark.parametrize("memory_mb", [512, 1769, 3008])
def test_largest_run_is_the_limit_of_check_fits(memory_mb):
    n = largest_run((100, 100, 72), memory_mb, compressed_ratio=1.0)
    assert n > 0
    fits = dict(name="x_bold.nii.gz", memory_mb=memory_mb, tmp_free_mb=10240, remaining_s=900)
    check_fits(RunShape((100, 100, 72), n), **fits)
    with pytest.raises(RunTooLarge):
        check_fits(RunShape((100, 100, 72), n + 1), **fits)


def test_nothing_fits_in_128_mb():
    assert largest_run((64, 64, 32), 128) == 0


def test_sized_spec_fits_its_run_and_not_a_larger_one():
    spec = FunctionSpec.sized_for((100, 100, 72), 600, max_concurrency=10)
    assert spec.max_concurrency == 10 and spec.memory_mb >= resources.LAMBDA_MB_PER_VCPU
    limits = dict(name="x_bold.nii.gz", memory_mb=spec.memory_mb,
                  tmp_free_mb=spec.ephemeral_mb, remaining_s=spec.timeout_s)
    check_fits(MULTIBAND, **limits)
    with pytest.raises(RunTooLarge, match="EphemeralStorage"):
        check_fits(RunShape((100, 100, 72), 1000), **limits)
    lean = FunctionSpec.sized_for((100, 100, 72), 600, cpu_memory_mb=128)
    assert lean.memory_mb < spec.memory_mb and lean.timeout_s <= 900
    check_fits(MULTIBAND, name="x_bold.nii.gz", memory_mb=lean.memory_mb,
               tmp_free_mb=lean.ephemeral_mb, remaining_s=lean.timeout_s)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM is Linux's")
def test_model_covers_the_engines_own_peak(tmp_path):
    """The engine in a fresh interpreter, with boto3 imported as in the function."""
    src = tmp_path / "sub-01_task-rest_bold.nii.gz"
    write_head_run(src, (80, 80, 40), 12)
    code = ("import boto3, json, sys, fmri_preproc; "
            "print(json.dumps(fmri_preproc.preprocess(sys.argv[1], sys.argv[2]).summary))")
    done = subprocess.run([sys.executable, "-c", code, str(src), str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    peak = json.loads(done.stdout)["peak_memory_mb"]
    predicted = needs(RunShape((80, 80, 40), 12)).memory_mb
    assert peak < predicted < 2 * peak
