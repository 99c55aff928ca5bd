"""Checks of notebook 04b's exercises (a real scan through the function, into MNI space)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from fmri_preproc.contract import TEMPLATE, parse_bids_name
from helpers.course.feedback import Feedback, expect

__all__ = ["check_tr_prediction", "check_space_fix", "check_network_contrast"]


def check_tr_prediction(tr: float | None, source: str | None, *, run: Path) -> Feedback:
    """Exercise 1: the TR the function would use without a stated one, and its source.

    Without our own value, the function takes the run's sidecar first (the converter's
    ``RepetitionTime``), the header only when no sidecar gives one
    (:func:`fmri_preproc.inputs.repetition_time`, asked here about the original ``run``).
    """
    from fmri_preproc.inputs import check_input, repetition_time

    if tr is None or source is None:
        return Feedback(False, "set tr_answer (seconds) and source_answer "
                               "('sidecar', 'header' or 'override').")
    sidecar = Path(run).with_name(Path(run).name.replace(".nii.gz", ".json"))
    expected, record = repetition_time(
        check_input(run), json.loads(sidecar.read_text()) if sidecar.exists() else None)
    if str(source).lower() != record["Source"]:
        return Feedback(False, "which file does the function read first for the TR? BIDS "
                               "puts acquisition parameters in the JSON sidecar; the header "
                               "is the fallback.")
    return expect(np.isclose(float(tr), expected, atol=1e-4),
                  f"without your value it would use {expected:g} s from the "
                  f"{record['Source']}: if that is wrong, nothing else would tell you, which "
                  "is why we state the TR.",
                  f"the source is right, but it does not say {tr} s: look at the TRs printed "
                  "in the first cells.")


def check_space_fix(image) -> Feedback:
    """Exercise 2: the image handed to an MNI atlas is the MNI-space series."""
    name = parse_bids_name(Path(image).name)
    if name.get("space") is None:
        return Feedback(False, "this file has no space- entity: it is in the scanner's own "
                               "(native) space. Which output did the function write in MNI?")
    return expect(name.get("space") == TEMPLATE and name.get("desc") == "preproc",
                  f"space-{TEMPLATE}: the spheres now land on the anatomy they name.",
                  "use the preprocessed series (desc-preproc) in the template's space.")


def check_network_contrast(answer: float | None, *, matrix: np.ndarray,
                           networks) -> Feedback:
    """Exercise 3: mean correlation within networks minus mean correlation between them.

    Pairs of one region with itself (the diagonal) are left out.
    """
    if answer is None:
        return Feedback(False, "set within_minus_between to the mean within-network "
                               "correlation minus the mean between-network correlation.")
    networks = np.asarray(networks)
    same = networks[:, None] == networks[None, :]
    off_diagonal = ~np.eye(len(networks), dtype=bool)
    expected = float(matrix[same & off_diagonal].mean() - matrix[~same].mean())
    return expect(np.isclose(float(answer), expected, atol=1e-4),
                  f"{expected:+.3f}: regions of one network correlate more with each other "
                  "than with the rest, even in one short task run.",
                  f"not {answer}: average the off-diagonal entries whose two regions share a "
                  "network, then subtract the average of those that do not (expected "
                  f"{expected:+.3f}).")
