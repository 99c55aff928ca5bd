"""A real scan, which no simulator made, end to end through the local cloud: the studyforrest
run (Philips 3 T, 80 x 80 x 35 x 156, oblique, int16 scaled, TR misrecorded by the
converter) is uploaded as notebook 04b uploads it, the deployed function processes it, and
its MNI-space outputs give a connectome whose networks show."""
from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from scipy.spatial.distance import cdist

from fmri_preproc.normalize import load_template
from helpers.analysis import atlas
from helpers.cloud.deploy import FunctionSpec
from pipeline_fixtures import deploy_pipeline

pytestmark = pytest.mark.slow  # the local cloud and a real run

KEY = "raw/sub-forrest/func/sub-forrest_task-oneback_bold.nii.gz"
STATED_TR_S = 2.0  # the scanner's and the paper's; dcm2niix wrote 1.79355 (see its README)


@pytest.fixture(scope="module")
def processed(cloud, real_run, tmp_path_factory):
    """The run and its converter's sidecar (with the TR stated) through the function as
    notebook 02 deploys it (FunctionSpec's defaults: sized for this very run); the outputs
    downloaded."""
    spec = FunctionSpec()
    pipeline = deploy_pipeline("realscan", spec=spec)
    sidecar = json.loads(real_run.with_name(real_run.name.replace(".nii.gz", ".json"))
                         .read_text())
    pipeline.upload(KEY.replace(".nii.gz", ".json"),
                    json.dumps({**sidecar, "RepetitionTime": STATED_TR_S}).encode())
    pipeline.upload(KEY, real_run.read_bytes())
    pipeline.settle([KEY], timeout=spec.timeout_s + 120)
    folder = tmp_path_factory.mktemp("realscan")
    run = pipeline.run(KEY)
    files = {}
    for kind in ("preproc_bold", "preproc_json", "mni_preproc_bold", "mni_preproc_json",
                 "mni_brain_mask", "confounds", "confounds_json"):  # load_confounds reads both
        files[kind] = folder / run.filename(kind)
        files[kind].write_bytes(pipeline.read(pipeline.out_key(KEY, kind)))
    return {"pipeline": pipeline, "spec": spec, "files": files}


def test_every_output_is_written_with_the_stated_tr(processed):
    pipeline, files = processed["pipeline"], processed["files"]
    assert pipeline.record(KEY, "done")["n_volumes"] == 156
    assert pipeline.outputs(KEY).keys() == pipeline.expected_outputs(KEY, normalised=True)
    used = json.loads(files["preproc_json"].read_text())
    assert used["RepetitionTime"] == STATED_TR_S
    assert used["RepetitionTimeSource"]["Source"] == "sidecar"
    assert "1.79355" in used["RepetitionTimeSource"]["Note"]  # the header's value, named
    assert nib.load(files["preproc_bold"]).header.get_zooms()[3] == pytest.approx(STATED_TR_S)


def test_memory_stays_within_the_function_and_its_model(processed):
    pipeline, spec = processed["pipeline"], processed["spec"]
    run, = pipeline.runs(KEY)
    assert run["error_type"] is None and run["max_memory_mb"] < spec.memory_mb
    fits, = [line for line in pipeline.handler_lines(KEY) if line["message"] == "fits"]
    assert fits["needs_memory_mb"] >= pipeline.record(KEY, "done")["peak_memory_mb"]


def test_normalised_brain_mask_overlaps_the_template_brain(processed):
    """Dice >= 0.9 with the template's brain, inside the run's field of view (the run's 35
    slices miss the lower cerebellum) and over the whole brain."""
    files = processed["files"]
    mask = np.asarray(nib.load(files["mni_brain_mask"]).dataobj) > 0
    series = nib.load(files["mni_preproc_bold"])
    fov = np.asarray(series.dataobj[..., 0]) != 0
    template = load_template()
    brain = np.zeros(template.grid_shape, dtype=bool)
    brain[template.crop] = template.brain
    dice_fov = 2 * np.sum(mask & brain & fov) / (np.sum(mask & fov) + np.sum(brain & fov))
    dice = 2 * np.sum(mask & brain) / (mask.sum() + brain.sum())
    print(f"\nreal run: Dice with the template brain {dice_fov:.3f} in the field of view, "
          f"{dice:.3f} whole brain")
    assert dice_fov >= 0.9 and dice >= 0.9


def test_a_connectome_from_the_real_run_shows_its_networks(processed):
    """Dosenbach's spheres on the MNI series (refused on the native one): regions of one
    network correlate more than regions of different networks, also for pairs more than
    40 mm apart, which closeness and smoothing cannot explain."""
    from nilearn.connectome import ConnectivityMeasure
    from nilearn.interfaces.fmriprep import load_confounds
    from nilearn.maskers import NiftiSpheresMasker

    files = processed["files"]
    with pytest.raises(ValueError, match="native"):
        atlas.require_space(files["preproc_bold"], "MNI")
    image = str(files["mni_preproc_bold"])
    atlas.require_space(image, "MNI")
    regions = atlas.dosenbach_regions()
    regions = regions[atlas.regions_inside(regions, files["mni_brain_mask"])]
    assert len(regions) >= 150
    confounds, sample_mask = load_confounds(image, strategy=("motion", "high_pass", "wm_csf"),
                                            motion="basic", wm_csf="basic")
    masker = NiftiSpheresMasker(regions[["x", "y", "z"]].to_numpy(), radius=5.0,
                                mask_img=files["mni_brain_mask"], standardize="zscore_sample",
                                t_r=STATED_TR_S)
    signals = masker.fit_transform(image, confounds=confounds, sample_mask=sample_mask)
    matrix = ConnectivityMeasure(kind="correlation").fit_transform([signals])[0]
    assert matrix.shape == (len(regions), len(regions)) and np.isfinite(matrix).all()
    networks = regions["network"].to_numpy()
    same = networks[:, None] == networks[None, :]
    far = cdist(regions[["x", "y", "z"]], regions[["x", "y", "z"]]) > 40
    off = ~np.eye(len(regions), dtype=bool)
    within, between = matrix[same & off & far].mean(), matrix[~same & far].mean()
    print(f"\nreal run, pairs > 40 mm apart: within-network r = {within:.3f}, "
          f"between = {between:.3f}")
    assert within > between + 0.03
