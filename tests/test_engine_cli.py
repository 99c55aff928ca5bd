"""The command line: output names and files, exit code 2 with a readable error."""

import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from fmri_preproc import output_name


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


@pytest.mark.parametrize("name, expected", [
    ("sub-01_task-rest_bold.nii.gz", "sub-01_task-rest"),
    ("sub-01_task-rest_run-2_bold.nii", "sub-01_task-rest_run-2"),
    ("scan.nii.gz", "scan"),
    ("scan.nii", "scan"),
    ("my scan ü.nii.gz", "my scan ü"),
])
def test_output_name(name, expected):
    assert output_name(f"/some/dir/{name}") == expected


@pytest.mark.parametrize("stem", ["sub-02_task-rest", "sub 03 ü_task-rest"])
def test_cli_writes_the_three_outputs(tmp_path, stem):
    src = _small_run(tmp_path / f"{stem}_bold.nii.gz")
    out = tmp_path / "derivatives"
    proc = _run(src, "--out", out, "--fwhm", "5")
    assert proc.returncode == 0, proc.stderr
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        f"{stem}_desc-confounds_timeseries.tsv",
        f"{stem}_desc-preproc_bold.json",
        f"{stem}_desc-preproc_bold.nii.gz",
    ]  # and no temporary files left behind
    summary = json.loads(proc.stdout)
    assert summary["n_volumes"] == 6 and summary["peak_memory_mb"] > 0
    sidecar = json.loads((out / names[1]).read_text())
    assert sidecar["SmoothingFWHM"] == 5.0 and sidecar["RepetitionTime"] == 2.0
    assert {"fmri_preproc", "numpy", "nibabel"} <= set(sidecar["Software"])
    header = (out / names[0]).read_text().splitlines()[0].split("\t")
    for col in ("trans_x", "rot_z", "framewise_displacement", "dvars", "std_dvars",
                "rot_z_derivative1_power2"):
        assert col in header
    img = nib.load(out / names[2])
    assert img.shape == (16, 16, 10, 6) and img.header.get_zooms()[3] == 2.0


def test_cli_bad_input_exit_code_2(tmp_path):
    bad = tmp_path / "broken_bold.nii.gz"
    bad.write_bytes(b"\x00" * 100)
    proc = _run(bad, "--out", tmp_path / "out")
    assert proc.returncode == 2
    assert "error:" in proc.stderr and "what to do:" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_cli_bad_arguments(tmp_path):
    assert _run(tmp_path / "x.nii.gz").returncode == 2  # --out missing
    assert _run(tmp_path / "x.nii.gz", "--out", tmp_path, "--fwhm", "-1").returncode == 2
