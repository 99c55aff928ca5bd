"""The contract: run names from keys (every entity kept, nothing collides), output names."""
import pytest

from fmri_preproc.contract import (OUTPUTS, input_problem, parse_bids_name, run_from_key)


@pytest.mark.parametrize("key, folder, stem", [
    ("sub-01_task-rest_bold.nii.gz", "sub-01/func", "sub-01_task-rest"),
    ("sub-01/func/sub-01_task-rest_bold.nii.gz", "sub-01/func", "sub-01_task-rest"),
    ("sub-01/ses-2/func/sub-01_ses-2_task-rest_acq-mb_run-3_echo-1_bold.nii.gz",
     "sub-01/ses-2/func", "sub-01_ses-2_task-rest_acq-mb_run-3_echo-1"),
    ("siteA/sub-01_task-rest_bold.nii.gz", "siteA/sub-01/func", "sub-01_task-rest"),
    ("siteA/sub-01/func/sub-01_task-rest_bold.nii.gz", "siteA/sub-01/func", "sub-01_task-rest"),
    # the session folder is kept (and named) when the file name leaves the session out
    ("sub-02/ses-2/func/sub-02_task-rest_bold.nii.gz", "sub-02/ses-2/func",
     "sub-02_ses-2_task-rest"),
])
def test_run_folder_and_id_keep_every_entity_and_folder(key, folder, stem):
    run = run_from_key(key)
    assert (run.folder, run.name.stem, run.id) == (folder, stem, f"{folder}/{stem}")


def test_no_two_inputs_share_an_output():
    keys = ["siteA/sub-01_task-rest_bold.nii.gz", "siteB/sub-01_task-rest_bold.nii.gz",
            "sub-02/ses-1/func/sub-02_task-rest_bold.nii.gz",
            "sub-02/ses-2/func/sub-02_task-rest_bold.nii.gz",
            *[f"sub-01/ses-{s}/func/sub-01_ses-{s}_task-rest_run-{r}_bold.nii.gz"
              for s in (1, 2) for r in (1, 2)]]
    paths = [run_from_key(k).path(kind) for k in keys for kind in OUTPUTS]
    markers = [m for k in keys for m in (run_from_key(k).done, run_from_key(k).error)]
    assert len(set(paths + markers)) == len(paths) + len(markers)


def test_output_names_are_fmriprep_names():
    run = run_from_key("sub-01/ses-1/func/sub-01_ses-1_task-rest_run-1_bold.nii.gz")
    assert run.filename("preproc_bold") == "sub-01_ses-1_task-rest_run-1_desc-preproc_bold.nii.gz"
    assert run.filename("confounds") == \
        "sub-01_ses-1_task-rest_run-1_desc-confounds_timeseries.tsv"
    assert run.filename("mni_preproc_bold") == ("sub-01_ses-1_task-rest_run-1_space-"
                                                "MNI152NLin2009aSym_res-2_desc-preproc_bold.nii.gz")
    assert run.filename("xfm_to_mni") == ("sub-01_ses-1_task-rest_run-1_from-boldref_to-"
                                          "MNI152NLin2009aSym_mode-image_xfm.txt")
    assert run.path("normalization_figure").startswith("sub-01/ses-1/figures/")
    assert run.filename("brain_mask") == "sub-01_ses-1_task-rest_run-1_desc-brain_mask.nii.gz"


def test_names_round_trip_through_the_parser():
    name = "sub-01_ses-1_task-rest_space-MNI152NLin2009aSym_res-2_desc-preproc_bold.nii.gz"
    parsed = parse_bids_name(name)
    assert str(parsed) == name and parsed.get("space") == "MNI152NLin2009aSym"
    assert parsed.suffix == "bold" and parsed.extension == ".nii.gz"
    with pytest.raises(ValueError):
        parse_bids_name("scan.nii.gz")


def test_sidecar_sits_next_to_the_input():
    assert run_from_key("sub-01/func/sub-01_task-rest_bold.nii.gz").sidecar_key() == \
        "sub-01/func/sub-01_task-rest_bold.json"
    assert run_from_key("sub-01_task-rest_bold.nii.gz").sidecar_key() == \
        "sub-01_task-rest_bold.json"


@pytest.mark.parametrize("key, hint", [
    ("sub-01_task-rest_bold.nii.gz", None),
    ("sub-01_task-rest_bold.nii", "compress"),
    ("sub-01_task-rest_bold.NII.GZ", "lower case"),
    ("sub-01_task-rest_bold.json", "sidecar"),
    ("sub-01_T1w.nii.gz", "not a BOLD run"),
])
def test_input_problem_says_why_a_key_is_not_processed(key, hint):
    problem = input_problem(f"raw/{key}")
    assert (problem is None) if hint is None else (hint in problem)


def test_outputs_carry_the_session_of_the_folder_when_the_name_leaves_it_out():
    run = run_from_key("sub-02/ses-2/func/sub-02_task-rest_run-1_bold.nii.gz")
    assert run.filename("preproc_bold") == "sub-02_ses-2_task-rest_run-1_desc-preproc_bold.nii.gz"
    assert run.sidecar_key() == "sub-02/ses-2/func/sub-02_task-rest_run-1_bold.json"  # as given
    assert run.id == "sub-02/ses-2/func/sub-02_ses-2_task-rest_run-1"
