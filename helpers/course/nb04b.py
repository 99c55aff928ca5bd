"""Checks of notebook 04b's exercises (a real scan through the function, into MNI space)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from fmri_preproc.contract import TEMPLATE, parse_bids_name
from helpers.course.feedback import Feedback, expect

__all__ = ["check_tr_prediction", "check_space_fix", "check_coverage"]


def check_tr_prediction(tr: float | None, source: str | None, *,
                        converter_sidecar: Path) -> Feedback:
    """Exercise 1: the TR the function would use without a stated one, and its source.

    Without our own value, the function takes the run's sidecar first (the converter's
    ``RepetitionTime``), the header only when no sidecar gives one.
    """
    if tr is None or source is None:
        return Feedback(False, "set tr_answer (seconds) and source_answer "
                               "('sidecar', 'header' or 'override').")
    expected = json.loads(Path(converter_sidecar).read_text())["RepetitionTime"]
    if str(source).lower() != "sidecar":
        return Feedback(False, "which file does the function read first for the TR? "
                               "BIDS puts acquisition parameters in the JSON sidecar.")
    return expect(np.isclose(float(tr), expected, atol=1e-4),
                  f"without your value it would use the converter's {expected} s from the "
                  "sidecar: wrong by 10 %, and silently, which is why we state the TR.",
                  f"the source is right, but the converter's sidecar says something else "
                  f"than {tr} s: look at the TR printed in the first cells.")


def check_space_fix(image) -> Feedback:
    """Exercise 2: the image handed to an MNI atlas is the MNI-space series."""
    name = parse_bids_name(Path(image).name)
    if name.get("space") is None:
        return Feedback(False, "this file has no space- entity: it is in the scanner's own "
                               "(native) space. Which output did the function write in MNI?")
    return expect(name.get("space") == TEMPLATE and name.get("desc") == "preproc",
                  f"space-{TEMPLATE}: the spheres now land on the anatomy they name.",
                  "use the preprocessed series (desc-preproc) in the template's space.")


def check_coverage(fraction: float | None, *, mni_mask, regions: pd.DataFrame) -> Feedback:
    """Exercise 3: the fraction of regions whose centre lies inside the MNI brain mask."""
    if fraction is None:
        return Feedback(False, "compute covered_fraction = regions inside / all regions.")
    img = nib.load(mni_mask)
    ijk = np.rint(nib.affines.apply_affine(np.linalg.inv(img.affine),
                                           regions[["x", "y", "z"]].to_numpy())).astype(int)
    inside = np.all((ijk >= 0) & (ijk < img.shape[:3]), axis=1)
    inside[inside] = np.asarray(img.dataobj)[tuple(ijk[inside].T)] > 0
    expected = inside.mean()
    return expect(np.isclose(float(fraction), expected, atol=0.5 / len(regions)),
                  f"{expected:.0%} of the regions: the run's 35 slices do not reach the top "
                  "and bottom of the brain, so those regions have no signal here.",
                  f"not {fraction:.3f}: count the regions whose centre voxel is inside the "
                  "MNI brain mask, divided by all regions.")
