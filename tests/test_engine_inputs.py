"""Bad inputs raise InputError (what went wrong, likely cause, what to do); unusual but
valid inputs (int16 with scaling, oblique, LPS, a few NaNs) are processed correctly."""

import gzip
import hashlib

import nibabel as nib
import numpy as np
import pytest

from fmri_preproc import (
    InputError,
    affine_to_params,
    check_input,
    load_run,
    params_to_affine,
    preprocess,
)
from fmri_preproc.contract import MOTION_PARAMS
from phantom import moving_blobs

SHAPE = (20, 20, 12)


def phantom_run(affine, motion, dtype=np.float32):
    """Smooth blobs in world mm; volume t shows the reference moved by motion[t]."""
    centres = np.random.default_rng(3).uniform(-20, 20, size=(12, 3)) * [1, 1, 0.5]
    data = moving_blobs(SHAPE, affine, motion, centres, head_mm=[30, 30, 20], head_amp=600,
                        blob_sigma_mm=6.0)
    return data.astype(dtype)


def centred(lin):
    aff = np.eye(4)
    aff[:3, :3] = lin
    aff[:3, 3] = -lin @ ((np.array(SHAPE) - 1) / 2)
    return aff


PLAIN = centred(np.diag([3.5, 3.5, 4.0]))
MOTION = np.array([[0, 0, 0, 0, 0, 0], [0.4, -0.3, 0.2, 0.006, -0.004, 0.005],
                   [0.8, -0.5, 0.4, 0.012, -0.008, 0.01], [1.0, -0.2, 0.6, 0.015, -0.01, 0.02],
                   [0.6, 0.1, 0.3, 0.01, -0.006, 0.012]])


def save(tmp_path, data, affine=PLAIN, name="sub-01_task-rest_bold.nii.gz"):
    path = tmp_path / name
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


def good_run(tmp_path, **kw):
    return save(tmp_path, phantom_run(PLAIN, MOTION), **kw)


def assert_input_error(path, match, **kw):
    with pytest.raises(InputError, match=match) as info:
        check_input(path, **kw) if kw.get("max_bytes") else load_run(path)
    err = info.value
    assert isinstance(err, ValueError)
    assert err.cause and err.action
    assert set(err.to_dict()) == {"error", "cause", "action"}
    return err


def test_empty_file(tmp_path):
    path = tmp_path / "empty_bold.nii.gz"
    path.write_bytes(b"")
    assert_input_error(path, "empty")


def test_not_gzip_despite_extension(tmp_path):
    plain = save(tmp_path, phantom_run(PLAIN, MOTION), name="run.nii")
    fake = tmp_path / "fake_bold.nii.gz"
    fake.write_bytes(plain.read_bytes())
    assert_input_error(fake, "not gzip")


def test_gzip_named_nii(tmp_path):
    path = good_run(tmp_path)
    renamed = tmp_path / "renamed.nii"
    renamed.write_bytes(path.read_bytes())
    assert_input_error(renamed, "gzip-compressed but named .nii")


@pytest.mark.parametrize("name", ["run.nii.gz", "run.nii"])
def test_truncated(tmp_path, name):
    path = good_run(tmp_path, name=name)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    err = assert_input_error(path, "could not be read")
    assert "truncated" in err.cause


def test_random_bytes(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "noise_bold.nii.gz"
    path.write_bytes(rng.bytes(5000))
    assert_input_error(path, "not gzip")
    gz = tmp_path / "noise2_bold.nii.gz"
    gz.write_bytes(gzip.compress(rng.bytes(5000)))
    assert_input_error(gz, "could not be read as NIfTI")


def test_not_nifti_name(tmp_path):
    path = tmp_path / "run.txt"
    path.write_text("hello")
    assert_input_error(path, "not named .nii")


def test_3d_image(tmp_path):
    path = save(tmp_path, phantom_run(PLAIN, MOTION[:1])[..., 0])
    assert_input_error(path, "3D image")


@pytest.mark.parametrize("n", [1, 3])
def test_too_few_volumes(tmp_path, n):
    path = save(tmp_path, phantom_run(PLAIN, MOTION[:n]))
    assert_input_error(path, f"has {n} volume")


def test_header_claiming_billions_of_voxels_rejected_before_allocation(tmp_path):
    hdr = nib.Nifti1Header()
    hdr.set_data_shape((4000, 4000, 4000, 1000))
    hdr.set_data_dtype(np.float32)
    hdr["vox_offset"] = 352
    path = tmp_path / "huge_bold.nii"
    path.write_bytes(hdr.binaryblock + b"\x00" * 4 + b"\x00" * 1000)
    assert_input_error(path, "claims")


def test_complex_data(tmp_path):
    data = phantom_run(PLAIN, MOTION).astype(np.complex64)
    path = save(tmp_path, data)
    assert_input_error(path, "complex64")


def test_rgb_data(tmp_path):
    rgb = np.dtype([("R", "u1"), ("G", "u1"), ("B", "u1")])
    data = np.zeros((*SHAPE, 5), dtype=rgb)
    img = nib.Nifti1Image(data, PLAIN)
    path = tmp_path / "rgb_bold.nii.gz"
    img.to_filename(path)
    assert_input_error(path, "real-valued")


def test_file_over_max_bytes(tmp_path):
    path = good_run(tmp_path)
    err = assert_input_error(path, "over the", max_bytes=1000)
    assert "limit" in str(err)
    check_input(path, max_bytes=path.stat().st_size)  # at the limit: fine


def test_mostly_nan_rejected(tmp_path):
    data = phantom_run(PLAIN, MOTION)
    data[:, :15] = np.nan
    assert_input_error(save(tmp_path, data), "NaN or infinite")


def test_constant_run_rejected(tmp_path):
    path = save(tmp_path, np.zeros((*SHAPE, 5), dtype=np.float32))
    with pytest.raises(InputError, match="constant"):
        preprocess(path, tmp_path / "out")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_bad_input_writes_nothing_and_keeps_input(tmp_path):
    path = tmp_path / "bad_bold.nii.gz"
    path.write_bytes(b"not a nifti")
    with pytest.raises(InputError):
        preprocess(path, tmp_path / "out")
    assert path.read_bytes() == b"not a nifti"
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_some_nans_set_to_zero_and_recorded(tmp_path):
    data = phantom_run(PLAIN, MOTION)
    data[0, 0, 0, 1] = np.nan
    data[1, 0, 0, 2] = np.inf
    loaded, _, n_bad = load_run(save(tmp_path, data))
    assert n_bad == 2 and np.all(np.isfinite(loaded)) and loaded[0, 0, 0, 1] == 0
    result = preprocess(save(tmp_path, data), tmp_path / "out")
    assert result.summary["n_nonfinite"] == 2
    assert '"NonFiniteValuesSetToZero": 2' in result.outputs["preproc_json"].read_text()


def test_int16_with_scaling(tmp_path):
    data = phantom_run(PLAIN, MOTION)
    img = nib.Nifti1Image(np.round(data * 10).astype(np.int16), PLAIN)
    img.header.set_slope_inter(0.1, 50.0)
    path = tmp_path / "int_bold.nii.gz"
    img.to_filename(path)
    loaded, info, _ = load_run(path)
    assert info.dtype == "int16" and loaded.dtype == np.float32
    assert np.allclose(loaded, np.round(data * 10) * 0.1 + 50.0, atol=1e-3)
    _check_processed(path, PLAIN, tmp_path)


def _check_processed(path, affine, tmp_path):
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    result = preprocess(path, tmp_path / "out", reference="first")
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest  # input untouched
    rows = [line.split("\t") for line in result.outputs["confounds"].read_text().splitlines()]
    cols = {name: i for i, name in enumerate(rows[0])}
    est = np.array([[float(r[cols[n]]) for n in MOTION_PARAMS] for r in rows[1:]])
    assert np.allclose(est[:, :3], MOTION[:, :3], atol=0.03)
    assert np.allclose(est[:, 3:], MOTION[:, 3:], atol=5e-4)
    out = nib.load(result.outputs["preproc_bold"])
    assert np.allclose(out.affine, affine, atol=1e-4)
    assert out.shape == (*SHAPE, len(MOTION)) and out.get_data_dtype() == np.float32


@pytest.mark.parametrize("kind", ["oblique", "lps"])
def test_oblique_and_lps_processed_correctly(tmp_path, kind):
    if kind == "lps":
        affine = centred(np.diag([-3.5, -3.5, 4.0]))
    else:
        rot = params_to_affine([0, 0, 0, 0.25, -0.15, 0.3], np.eye(4), (1, 1, 1))[:3, :3]
        affine = centred(rot @ np.diag([3.5, 3.5, 4.0]))
    path = save(tmp_path, phantom_run(affine, MOTION), affine=affine)
    _check_processed(path, affine, tmp_path)
    # parameters are world-space: identical meaning whatever the affine
    assert affine_to_params(params_to_affine(MOTION[3], affine, SHAPE), affine, SHAPE) == \
        pytest.approx(MOTION[3])
