"""The command line: a BIDS derivatives run with fMRIPrep names; exit code 2 with a readable
error."""

import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from fmri_preproc import run_from_key


def _run(*args):
    return subprocess.run([sys.executable, "-m", "fmri_preproc", *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def _small_run(path):
    rng = np.random.default_rng(0)
    ijk = np.indices((16, 16, 10)).astype(np.float32)
    base = 500 + 300 * np.exp(-((ijk[0] - 8) ** 2 + (ijk[1] - 7) ** 2 + (ijk[2] - 5) ** 2) / 20)
    data = base[..., None] + rng.normal(scale=3, size=(16, 16, 10, 6))
    img = nib.Nifti1Image(data.astype(np.float32), np.diag([3.0, 3.0, 4.0, 1.0]))
    img.header.set_xyzt_units("mm", "sec")
    img.header["pixdim"][4] = 2.0
    img.to_filename(path)
    return path


@pytest.mark.parametrize("stem", ["sub-02_task-rest", "sub-03_ses-b_task-rest_run-2"])
def test_cli_writes_a_bids_derivatives_run(tmp_path, stem):
    src = _small_run(tmp_path / f"{stem}_bold.nii.gz")
    out = tmp_path / "derivatives"
    proc = _run(src, "--out", out, "--fwhm", "5")
    assert proc.returncode == 0, proc.stderr
    run = run_from_key(src.name)
    folder = out / run.folder
    assert folder.relative_to(out).parts[0] == stem.split("_")[0]
    written = sorted(p.name for p in folder.iterdir())  # and no temporary files left behind
    assert written == sorted(run.filename(kind) for kind in (
        "preproc_bold", "preproc_json", "smoothed_bold", "smoothed_json", "boldref",
        "brain_mask", "confounds", "confounds_json"))
    summary = json.loads(proc.stdout)
    assert summary["run"] == run.id and summary["n_volumes"] == 6
    assert summary["peak_memory_mb"] > 0
    preproc = json.loads((folder / run.filename("preproc_json")).read_text())
    smoothed = json.loads((folder / run.filename("smoothed_json")).read_text())
    assert preproc["SmoothingFWHM"] == 0 and smoothed["SmoothingFWHM"] == 5.0
    assert preproc["RepetitionTime"] == 2.0
    assert {"fmri_preproc", "numpy", "nibabel"} <= set(preproc["Software"])
    header = (folder / run.filename("confounds")).read_text().splitlines()[0].split("\t")
    for col in ("trans_x", "rot_z", "framewise_displacement", "dvars", "std_dvars",
                "rot_z_derivative1_power2"):
        assert col in header
    described = json.loads((folder / run.filename("confounds_json")).read_text())
    # every column described; the JSON also lists aCompCor's dropped components (fMRIPrep)
    assert set(header) <= set(described) and described["trans_x"]["Units"] == "mm"
    assert all(k.startswith("dropped_") for k in set(described) - set(header))
    unsmoothed = np.asarray(nib.load(folder / run.filename("preproc_bold")).dataobj)
    blurred = np.asarray(nib.load(folder / run.filename("smoothed_bold")).dataobj)
    assert unsmoothed.shape == blurred.shape == (16, 16, 10, 6)
    # smoothing lowers the spatial variance of every volume
    assert np.all(blurred.std(axis=(0, 1, 2)) < unsmoothed.std(axis=(0, 1, 2)))
    ref = nib.load(folder / run.filename("boldref"))
    mask = nib.load(folder / run.filename("brain_mask"))
    assert ref.shape == mask.shape == (16, 16, 10)
    np.testing.assert_array_equal(np.asarray(ref.dataobj),
                                  unsmoothed[..., summary["reference_volume"]])
    assert set(np.unique(np.asarray(mask.dataobj))) <= {0, 1} and np.asarray(mask.dataobj).any()


def test_cli_bad_input_exit_code_2(tmp_path):
    bad = tmp_path / "broken_bold.nii.gz"
    bad.write_bytes(b"\x00" * 100)
    proc = _run(bad, "--out", tmp_path / "out")
    assert proc.returncode == 2
    assert "error:" in proc.stderr and "what to do:" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_cli_refuses_a_name_it_cannot_name_outputs_from(tmp_path):
    src = _small_run(tmp_path / "scan.nii.gz")
    proc = _run(src, "--out", tmp_path / "out")
    assert proc.returncode == 2 and "sub-01_task-rest_bold.nii.gz" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_cli_bad_arguments(tmp_path):
    assert _run(tmp_path / "x.nii.gz").returncode == 2  # --out missing
    assert _run(tmp_path / "x.nii.gz", "--out", tmp_path, "--fwhm", "-1").returncode == 2
