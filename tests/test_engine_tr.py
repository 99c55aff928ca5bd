"""The TR: a stated override, then the BIDS sidecar, then the header (in its declared unit);
nonsense is refused with a clear error, and the output sidecar says which value was used."""
import json

import nibabel as nib
import numpy as np
import pytest

from fmri_preproc import InputError, check_input, preprocess
from fmri_preproc.inputs import repetition_time
from scale_runs import write_head_run


def _run(tmp_path, tr=2.0, unit="sec"):
    path = tmp_path / "sub-01_task-rest_bold.nii.gz"
    write_head_run(path, (24, 24, 12), 6, tr_s=tr)
    if unit != "sec":
        img = nib.load(path)
        img = nib.Nifti1Image(np.asarray(img.dataobj), img.affine, img.header)
        img.header.set_xyzt_units("mm", unit)
        nib.save(img, path)
    return path


def test_sidecar_wins_and_a_disagreement_is_noted(tmp_path):
    info = check_input(_run(tmp_path, tr=1.79355))
    tr, record = repetition_time(info, {"RepetitionTime": 2.0})
    assert tr == 2.0 and record["Source"] == "sidecar"
    assert record["Header"] == pytest.approx(1.79355) and "1.79355" in record["Note"]
    tr, record = repetition_time(info, {"RepetitionTime": 2.0}, override=2.5)
    assert tr == 2.5 and record["Source"] == "override" and record["Sidecar"] == 2.0


def test_header_in_milliseconds_by_its_unit_is_converted(tmp_path):
    info = check_input(_run(tmp_path, tr=800.0, unit="msec"))
    assert repetition_time(info) == (0.8, {"Source": "header", "Header": 0.8})


@pytest.mark.parametrize("sidecar, words", [
    ({"RepetitionTime": 2000}, "looks like milliseconds"),
    ({"RepetitionTime": 0}, "positive number of seconds"),
    ({"RepetitionTime": -2}, "positive number of seconds"),
    ({"RepetitionTime": float("nan")}, "positive number of seconds"),
    ({"RepetitionTime": "2 s"}, "positive number of seconds")])
def test_nonsense_sidecar_tr_is_refused(tmp_path, sidecar, words):
    info = check_input(_run(tmp_path))
    with pytest.raises(InputError, match=words) as caught:
        repetition_time(info, sidecar)
    assert "sidecar" in caught.value.action


def test_header_tr_in_ms_written_as_seconds_is_refused(tmp_path):
    with pytest.raises(InputError, match="looks like milliseconds") as caught:
        preprocess(_run(tmp_path, tr=2000.0), tmp_path / "out")
    assert "RepetitionTime" in caught.value.action
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_the_output_sidecar_records_the_tr_and_its_source(tmp_path):
    result = preprocess(_run(tmp_path, tr=1.79355), tmp_path / "out",
                        sidecar={"RepetitionTime": 2.0, "TaskName": "rest"})
    sidecar = json.loads(result.outputs["preproc_json"].read_text())
    assert sidecar["RepetitionTime"] == 2.0
    assert sidecar["RepetitionTimeSource"]["Source"] == "sidecar"
    assert result.summary["repetition_time_s"] == 2.0
    # the images' headers carry the TR used too: nilearn reads it from there
    for kind in ("preproc_bold", "smoothed_bold"):
        header = nib.load(result.outputs[kind]).header
        assert header.get_zooms()[3] == pytest.approx(2.0) and header.get_xyzt_units()[1] == "sec"


def test_a_header_in_milliseconds_is_written_back_in_seconds(tmp_path):
    result = preprocess(_run(tmp_path, tr=800.0, unit="msec"), tmp_path / "out")
    header = nib.load(result.outputs["preproc_bold"]).header
    assert header.get_zooms()[3] == pytest.approx(0.8) and header.get_xyzt_units()[1] == "sec"
