"""The pipeline's outputs in MNI space (fmri_preproc.normalize.write_mni_outputs via preprocess):
written when normalisation succeeds, left out with a warning when it cannot."""
import json
import shutil

import nibabel as nib
import numpy as np
import pytest

from fmri_preproc import preprocess
from fmri_preproc.contract import OUTPUTS, TEMPLATE, Sidecar, dataset_files, run_from_key
from fmri_preproc.normalize import (MNI_KINDS, PARTIAL_COVERAGE, TemplateResampler, _FixedTrilinear,
                                    load_template, read_itk_affine)
from helpers.analysis.simulate import run_bids_validator, simulate_run
from scale_runs import write_head_run

NATIVE_KINDS = {"preproc_bold", "preproc_json", "smoothed_bold", "smoothed_json", "boldref",
                "brain_mask", "confounds", "confounds_json"}


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.sum(a & b) / (np.sum(a) + np.sum(b))


@pytest.fixture(scope="module")
def processed(tmp_path_factory):
    """A short simulated run placed in native space by a known 12-parameter transform."""
    folder = tmp_path_factory.mktemp("mni")
    run = simulate_run(shape=(64, 64, 32), n_volumes=12, tr=2.0, seed=3, native_space=True)
    path = folder / "sub-01_task-rest_bold.nii.gz"
    run.img.to_filename(path)
    return preprocess(path, folder / "out"), path


def test_every_mni_output_is_written_with_the_native_ones(processed):
    result, _ = processed
    assert set(result.outputs) == NATIVE_KINDS | set(MNI_KINDS)
    assert set(MNI_KINDS) <= OUTPUTS.keys()
    coverage = json.loads(result.outputs["mni_preproc_json"].read_text())["Normalization"][
        "Coverage"]
    # warned exactly when the field of view misses part of the template brain
    assert len(result.summary["warnings"]) == (coverage < PARTIAL_COVERAGE)
    assert all("field of view holds" in w for w in result.summary["warnings"])
    assert not [p for p in result.outputs["preproc_bold"].parent.iterdir()
                if p.name.startswith(".")]  # no temporaries left


def test_mni_series_is_on_the_template_grid_with_the_run_tr(processed):
    result, _ = processed
    img = nib.load(result.outputs["mni_preproc_bold"])
    template = load_template()
    assert img.shape == (*template.grid_shape, 12)
    np.testing.assert_allclose(img.affine, template.grid_affine)
    assert int(img.header["sform_code"]) == 4  # NIfTI "MNI_152"
    assert img.header.get_zooms()[3] == pytest.approx(2.0)
    data = np.asarray(img.dataobj[..., 5])
    assert np.isfinite(data).all() and data[_full(template.brain)].mean() > 0


def _full(mask):
    template = load_template()
    full = np.zeros(template.grid_shape, dtype=bool)
    full[template.crop] = mask
    return full


def test_mni_mask_overlaps_the_template_brain(processed):
    result, _ = processed
    mask = np.asarray(nib.load(result.outputs["mni_brain_mask"]).dataobj) > 0
    assert dice(mask, _full(load_template().brain)) >= 0.85


def test_sidecar_and_transform_agree(processed):
    result, source = processed
    sidecar = json.loads(result.outputs["mni_preproc_json"].read_text())
    assert sidecar[Sidecar.REPETITION_TIME] == 2.0
    assert sidecar["SpatialReference"] == TEMPLATE
    assert result.outputs["preproc_bold"].name in sidecar[Sidecar.SOURCES]
    matrix = read_itk_affine(result.outputs["xfm_to_mni"])
    np.testing.assert_allclose(matrix, sidecar["Normalization"]["MatrixTemplateToBoldref"],
                               atol=1e-7)
    assert result.outputs["normalization_figure"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    mask_sidecar = json.loads(result.outputs["mni_brain_mask_json"].read_text())
    assert mask_sidecar["Type"] == "Brain" and mask_sidecar["Resolution"].startswith("2 mm")
    assert result.outputs["brain_mask"].name in mask_sidecar[Sidecar.SOURCES]


def test_outputs_laid_out_as_the_function_does_are_valid_bids(processed, tmp_path):
    """The BIDS validator finds no error in a run's native and MNI outputs, placed where the
    function puts them (with sessions: the figures folder is then two levels down)."""
    result, _ = processed
    run = run_from_key("sub-01/ses-1/func/sub-01_ses-1_task-rest_bold.nii.gz")
    root = tmp_path / "derivatives"
    for kind, path in result.outputs.items():
        target = root / run.path(kind)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target)
    for name, text in dataset_files("0.1.0").items():  # as the handler writes them
        (root / name).write_text(text)
    issues = run_bids_validator(root)["issues"]["issues"]
    errors = [i for i in issues if i.get("severity") == "error"]
    assert not errors, errors[:5]


def test_fixed_sampler_equals_the_resampler():
    rng = np.random.default_rng(0)
    volume = rng.normal(size=(40, 44, 30)).astype(np.float32)
    affine = np.diag([4.0, 4.0, 4.5, 1.0])
    affine[:3, 3] = [-80, -100, -60]
    resampler = TemplateResampler(affine, np.eye(4))
    sampler = _FixedTrilinear(volume.shape, resampler._coords(None))
    expected = resampler.volume(volume).reshape(-1, order="F")[resampler._index]
    values = np.zeros(resampler._index.size, np.float32)
    values[sampler.inside] = sampler(volume.ravel(order="F"))
    np.testing.assert_allclose(values, expected, rtol=1e-5, atol=1e-5)


def test_a_run_that_cannot_be_normalised_keeps_its_native_outputs(tmp_path):
    """A field of view far smaller than a brain: processed, native only, and told why (a
    note, not a warning: the run itself is fine)."""
    path = tmp_path / "sub-01_task-rest_bold.nii.gz"
    write_head_run(path, (16, 16, 8), 12)  # a synthetic head of 16 x 16 x 8 voxels
    result = preprocess(path, tmp_path / "out")
    assert set(result.outputs) == NATIVE_KINDS
    assert result.summary["warnings"] == []
    assert result.summary["normalization"].startswith("not attempted: the field of view (16 ml)")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == \
        sorted(p.name for p in result.outputs.values())
