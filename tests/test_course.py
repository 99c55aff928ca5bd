"""The course: every exercise check says Right to the worked answer and Not yet to a wrong
or missing one; the student build has no solutions, the instructor build keeps them."""
from __future__ import annotations

import re
from pathlib import Path

import nbformat
import numpy as np
import pytest

from fmri_preproc import params_to_affine, reslice_volume
from fmri_preproc.contract import INPUT_SUFFIX
from fmri_preproc.smoothing import fwhm_to_sigma
from helpers.analysis.simulate import slice_timing
from helpers.course import build, nb00, nb01, nb02, nb03, nb04b, nb05

ROOT = Path(__file__).resolve().parents[1]
OWNED = ["00", "01", "02", "03", "04", "04b", "05"]


def _tags(cell):
    return cell.metadata.get("tags", [])


# --- the checks: both answers -------------------------------------------------------------

def test_nb00_checks():
    fd = np.random.default_rng(0).gamma(2.0, 0.08, 5000)
    truth = 100 * (fd > 0.5).mean()
    assert nb00.check_censored_percent(truth + 0.5, fd) and not nb00.check_censored_percent(truth + 3, fd)
    assert not nb00.check_censored_percent(None, fd)
    right = slice_timing(16, 2.0, "sequential")[1]
    assert nb00.check_sequential_slice_time(right, 16, 2.0)
    assert not nb00.check_sequential_slice_time(slice_timing(16, 2.0, "interleaved")[1], 16, 2.0)
    assert nb00.check_bold_name(f"sub-01_task-rest{INPUT_SUFFIX}")
    for wrong in ("sub01_rest_bold.nii", "sub-01_task-rest_bold.nii", None):
        assert not nb00.check_bold_name(wrong)


def test_iam_evaluator_and_policy_fix():
    bucket = "arn:aws:s3:::in"
    run, other = f"{bucket}/raw/sub-01/func/a_bold.nii.gz", "arn:aws:s3:::out/x"
    fixed = {"Statement": [{"Effect": "Allow", "Action": "s3:GetObject", "Resource": f"{bucket}/raw/*"}]}
    bucket_only = {"Statement": [{"Effect": "Allow", "Action": "s3:GetObject", "Resource": bucket}]}
    everything = {"Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
    denied = {"Statement": fixed["Statement"] + [{"Effect": "Deny", "Action": "s3:*", "Resource": run}]}
    assert nb01.allows(fixed, "S3:GetObject", run) and not nb01.allows(fixed, "s3:PutObject", run)
    assert not nb01.allows(denied, "s3:GetObject", run)
    assert nb01.check_policy_fix(fixed, object_arn=run, other_arn=other)
    for wrong in (bucket_only, everything, denied, None):
        assert not nb01.check_policy_fix(wrong, object_arn=run, other_arn=other)


class _S3:
    def get_bucket_lifecycle_configuration(self, Bucket):
        return {"Rules": [{"Expiration": {"Days": 7}}]}


def test_nb01_read_back_checks():
    assert nb01.check_denied_transport("HTTP") and not nb01.check_denied_transport("https")
    assert nb01.check_expiry_days(7, _S3(), "b") and not nb01.check_expiry_days(30, _S3(), "b")


def _phantom():
    """A smooth blob with structure (a head-like volume) on 4 mm voxels."""
    grid = np.mgrid[:24, :24, :16].astype(float)
    centre = np.array([12, 11, 8])[:, None, None, None]
    r = np.sqrt((((grid - centre) * np.array([1, 1.2, 1.5])[:, None, None, None]) ** 2).sum(0))
    volume = 100 * (r < 9) + 40 * np.sin(grid[0] / 2.0) * (r < 9)
    return volume, np.diag([4.0, 4.0, 4.0, 1.0])


def test_nb02_checks():
    volume, affine = _phantom()
    sigma = fwhm_to_sigma(6.0, affine)[0]
    assert nb02.check_sigma_voxels(6.0 / 2.3548 / 4.0, 6.0, affine)
    assert not nb02.check_sigma_voxels(6.0 / 4.0, 6.0, affine) and sigma < 6.0 / 4.0
    shifted = reslice_volume(volume, affine, params_to_affine([4.0, 0, 0, 0, 0, 0], affine, volume.shape))
    assert nb02.check_undo_shift([-4.0, 0, 0, 0, 0, 0], shifted, volume, affine)
    assert not nb02.check_undo_shift([4.0, 0, 0, 0, 0, 0], shifted, volume, affine)
    assert not nb02.check_undo_shift([0.0] * 6, shifted, volume, affine)


def _notification(prefix, suffix):
    return {"LambdaFunctionConfigurations": [{"Filter": {"Key": {"FilterRules": [
        {"Name": "prefix", "Value": prefix}, {"Name": "suffix", "Value": suffix}]}}}]}


def test_nb02_trigger_filter():
    assert nb02.check_trigger_filter(_notification("raw/", INPUT_SUFFIX), "raw/")
    assert not nb02.check_trigger_filter(_notification("raw/", ".json"), "raw/")
    assert not nb02.check_trigger_filter(_notification("", INPUT_SUFFIX), "raw/")
    assert not nb02.check_trigger_filter(None, "raw/")


def test_nb03_checks():
    records = {"key": ["raw/a_bold.nii.gz", "raw/b_bold.nii.gz", None]}
    assert nb03.check_invocations(2, 2, records) and not nb03.check_invocations(3, 2, records)
    assert not nb03.check_invocations(3, 3, records)  # a run that has not been invoked yet
    assert nb03.check_gb_seconds(2.0 * 1769 / 1024, 2000, 1769)
    assert not nb03.check_gb_seconds(2.0 * 300 / 1024, 2000, 1769)  # memory used, not configured
    line = "An error occurred (AccessDenied) when calling the GetObject operation: denied"
    assert nb03.check_denied_action("s3:GetObject", line)
    assert not nb03.check_denied_action("s3:PutObject", line) and not nb03.check_denied_action(None, line)


def test_nb05_checks():
    good = ["stop new runs", "delete function", "delete log group", "delete objects",
            "delete bucket", "delete role policy", "delete role"]
    assert nb05.check_deletion_order(good)
    assert not nb05.check_deletion_order(list(reversed(good)))
    assert not nb05.check_deletion_order(good[:-1])
    swapped = good.copy()
    swapped[1], swapped[2] = swapped[2], swapped[1]  # the log group before the function
    assert not nb05.check_deletion_order(swapped)
    assert nb05.check_scaled_cost(0.5, 0.002, 4) and not nb05.check_scaled_cost(0.002, 0.002, 4)
    assert nb05.check_memory_ratio(1.0) and not nb05.check_memory_ratio(2.0)


# --- the notebooks and the builds ---------------------------------------------------------

def test_owned_notebooks_have_objectives_and_exercises():
    for prefix in OWNED:
        (path,) = [p for p in build.source_notebooks() if p.name.startswith(prefix + "_")]
        cells = nbformat.read(path, as_version=4).cells
        objectives = next(c for c in cells[:3] if "After this notebook you can" in c.source)
        n_objectives = sum(bool(re.match(r"\d+\. ", line)) for line in objectives.source.splitlines())
        assert 3 <= n_objectives <= 5, path.name
        solutions = [k for k, c in enumerate(cells) if "solution" in _tags(c)]
        assert len(solutions) >= 3, path.name
        for k in solutions:  # the worked solution comes just before its check
            assert f"nb{prefix}.check_" in cells[k + 1].source, (path.name, k)


def test_builds_strip_and_keep_solutions(tmp_path):
    written = build.build_course(tmp_path)
    sources = build.source_notebooks()
    assert [p.name for p in written["student"]] == [p.name for p in sources]  # by glob
    for source, student, instructor in zip(sources, written["student"], written["instructor"]):
        src = nbformat.read(source, as_version=4).cells
        stu = nbformat.read(student, as_version=4).cells
        ins = nbformat.read(instructor, as_version=4).cells
        n_solutions = sum("solution" in _tags(c) for c in src)
        assert not any("solution" in _tags(c) for c in stu)
        assert sum("solution" in _tags(c) for c in ins) == n_solutions
        assert len(stu) == len(src) - n_solutions and len(ins) == len(src) + n_solutions
        assert sum("parameters" in _tags(c) for c in stu) == 1


def test_build_picks_up_a_new_notebook(tmp_path):
    folder = tmp_path / "notebooks"
    folder.mkdir()
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x = 1", metadata={"tags": ["solution"]})])
    for name in ("04_a.ipynb", "04b_real_scans.ipynb", "notes.ipynb"):
        nbformat.write(nb, folder / name)
    assert [p.name for p in build.source_notebooks(folder)] == ["04_a.ipynb", "04b_real_scans.ipynb"]
    with pytest.raises(ValueError, match="version"):
        build.build_notebook(folder / "04_a.ipynb", "teacher")


def test_nb04b_checks(tmp_path):
    import nibabel as nib
    import numpy as np

    run = tmp_path / "sub-x_task-t_bold.nii.gz"
    img = nib.Nifti1Image(np.zeros((4, 4, 4, 6), np.int16), np.eye(4))
    img.header.set_xyzt_units("mm", "sec")
    img.header["pixdim"][4] = 1.79355
    img.to_filename(run)
    assert nb04b.check_tr_prediction(1.79355, "header", run=run)  # no sidecar: the header's
    run.with_name("sub-x_task-t_bold.json").write_text('{"RepetitionTime": 2.5}')
    assert nb04b.check_tr_prediction(2.5, "sidecar", run=run)
    assert not nb04b.check_tr_prediction(1.79355, "header", run=run)
    assert not nb04b.check_tr_prediction(None, None, run=run)
    assert nb04b.check_space_fix(
        "sub-01_task-rest_space-MNI152NLin2009aSym_res-2_desc-preproc_bold.nii.gz")
    assert not nb04b.check_space_fix("sub-01_task-rest_desc-preproc_bold.nii.gz")
    matrix = np.array([[1, .5, .1], [.5, 1, .2], [.1, .2, 1]])
    networks = ["vis", "vis", "dmn"]
    assert nb04b.check_network_contrast(0.5 - 0.15, matrix=matrix, networks=networks)
    assert not nb04b.check_network_contrast(0.5, matrix=matrix, networks=networks)
    assert not nb04b.check_network_contrast(None, matrix=matrix, networks=networks)
