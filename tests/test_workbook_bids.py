"""The series on a second BIDS dataset: 2 subjects x 2 sessions x 2 runs, where one subject's
file names leave out the session, so the same file name repeats in another folder. Notebook
03 uploads it with its folders kept; every run gets exactly one result of its own, and the
output bucket is a BIDS derivatives dataset that the validator and pybids read."""
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import pytest

from fmri_preproc.contract import TEMPLATE
from helpers.analysis.simulate import simulate_run
from private_cloud import ROOT, private_cloud, sandbox_env

pytestmark = pytest.mark.slow  # notebooks on a local cloud of their own (see pyproject)


def _runs() -> dict[str, nib.Nifti1Image]:
    """relative path -> image: sub-01 named as BIDS wants, sub-02 without ses- in its names."""
    runs, seed = {}, 0
    for subject, with_session in (("01", True), ("02", False)):
        for ses in (1, 2):
            for run in (1, 2):
                ses_part = f"_ses-{ses}" if with_session else ""
                name = f"sub-{subject}{ses_part}_task-rest_run-{run}_bold.nii.gz"
                seed += 1
                img = simulate_run(shape=(24, 24, 14), n_volumes=40, seed=seed).img
                runs[f"sub-{subject}/ses-{ses}/func/{name}"] = img
    return runs


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    """Notebooks 00-02, 03 on the second dataset, then 05; the output bucket read before cleanup."""
    sandbox = tmp_path_factory.mktemp("bids2")
    dataset = sandbox / "other_study"
    for relative, img in _runs().items():
        path = dataset / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        nib.save(img, path)
        path.with_name(path.name.replace(".nii.gz", ".json")).write_text(
            json.dumps({"RepetitionTime": 2.0, "TaskName": "rest"}))
    (dataset / "dataset_description.json").write_text(
        json.dumps({"Name": "second study", "BIDSVersion": "1.10.0"}))
    (dataset / "sub-01" / "anat").mkdir()
    (dataset / "sub-01" / "anat" / "sub-01_T1w.nii.gz").write_bytes(b"")  # listed, not processed
    overrides = sandbox / "overrides.yaml"
    overrides.write_text(f"03_upload_and_process:\n  bids_dir: {dataset}\n")

    def notebooks(*only):
        done = subprocess.run([sys.executable, "ci/run_workbook.py", "--ci", "--only", *only,
                               "--parameters", str(overrides), "--build-dir",
                               str(sandbox / "build")], cwd=ROOT, env=sandbox_env(sandbox),
                              capture_output=True, text=True, timeout=1200)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    notebooks("00", "01", "02", "03")  # 02 runs the engine on a run of 00 first
    from helpers.cloud.clients import client
    from helpers.cloud.settings import Settings
    from helpers.cloud.transfer import download_prefix

    with private_cloud(sandbox, start=False):
        cfg = Settings(**json.loads((sandbox / "build" / "workbook-local.json").read_text()))
        download_prefix(cfg.output_bucket, cfg.output_prefix, sandbox / "derivatives")
        inputs = [o["Key"] for o in client("s3").list_objects_v2(
            Bucket=cfg.input_bucket)["Contents"]]
        notebooks("05")  # before leaving the block, which stops the local cloud
    status = json.loads((sandbox / "build" / "results" / "processing_status.json").read_text())
    return {"sandbox": sandbox, "dataset": dataset, "status": status["inputs"],
            "inputs": inputs, "derivatives": sandbox / "derivatives"}


def test_every_run_has_exactly_one_result_of_its_own(series):
    rows = series["status"]
    assert len(rows) == 8 and {r["status"] for r in rows} == {"processed"}
    assert len({r["run"] for r in rows}) == 8  # the repeated file names did not collide
    preproc = sorted(series["derivatives"].rglob("*_desc-preproc_bold.nii.gz"))
    mni = [p for p in preproc if f"_space-{TEMPLATE}_" in p.name]
    done = sorted(series["derivatives"].rglob("*_done.json"))
    assert len(done) == 8 and len(mni) == 8 and len(preproc) == 16  # native and MNI each
    for marker in done:  # each result names its own input
        source = json.loads(marker.read_text())["source"]
        assert marker.parent.relative_to(series["derivatives"]).as_posix() in source


def test_the_dataset_was_uploaded_with_its_folders(series):
    keys = set(series["inputs"])
    assert "raw/sub-02/ses-2/func/sub-02_task-rest_run-1_bold.nii.gz" in keys
    assert "raw/sub-02/ses-2/func/sub-02_task-rest_run-1_bold.json" in keys  # sidecars too
    assert "raw/dataset_description.json" in keys
    assert not any(k.endswith("_T1w.nii.gz") for k in keys)  # listed as skipped instead


def test_derivatives_are_a_bids_dataset_the_ecosystem_reads(series):
    derivatives = series["derivatives"]
    description = json.loads((derivatives / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative"
    assert description["GeneratedBy"][0]["Name"] == "fmri_preproc"
    import bids

    layout = bids.BIDSLayout(series["dataset"], derivatives=str(derivatives), validate=False)
    from bids.layout import Query

    for space in (Query.NONE, TEMPLATE):  # the native run and its MNI copy, eight of each
        found = layout.get(desc="preproc", suffix="bold", extension=".nii.gz",
                           scope="derivatives", space=space)
        assert len(found) == 8, space
    validator = Path(sys.executable).parent / "bids-validator-deno"
    report = subprocess.run([str(validator), str(derivatives), "--format", "json"],
                            capture_output=True, text=True, timeout=300)
    issues = json.loads(report.stdout)["issues"]["issues"]
    errors = [i for i in issues if i.get("severity") == "error"]
    assert not errors, errors[:5]
