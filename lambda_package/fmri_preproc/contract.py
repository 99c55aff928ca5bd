"""The contract: every name that the engine, the handler, the helpers, the notebooks and the
tests share. Each is defined here once; everything else imports it.

- **BIDS names.** :func:`parse_bids_name` reads a file name into its entities (all kept, in
  order), suffix and extension; :class:`BidsName` writes one back.
- **Runs.** :func:`run_from_key` names a run from its key (or path) relative to the input
  root: its derivatives folder (``sub-01/[ses-1/]func``, any other leading folders kept, so
  two same-named files in different folders never collide), its id, and the name of each
  output (:data:`OUTPUTS`, fMRIPrep's names). :func:`input_problem` says why a key will not
  be processed.
- **Dataset files, markers and records**: :func:`dataset_files` (:data:`DATASET_DESCRIPTION`
  from :func:`derivatives_description`, and :data:`BIDSIGNORE`); ``<run>_done.json`` is
  written last, ``<run>_error.json`` when a run fails.
- **Confound columns** (fMRIPrep's), **sidecar keys** (:class:`Sidecar`), the handler's
  **log events** (:class:`LogEvent`), and :class:`PreprocResult`, what
  :func:`fmri_preproc.preprocess` returns.

Standard library only: the handler, the engine and the notebooks all import it.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any

# ------------------------------------------------------------------------------------------
# BIDS file names

#: Entity keys in the order BIDS puts them in a file name (BIDS schema 1.10, plus the
#: transform entities from/to/mode that fMRIPrep writes before ``desc``).
ENTITY_ORDER = ("sub", "ses", "sample", "task", "tracksys", "acq", "nuc", "voi", "ce", "trc",
                "stain", "rec", "dir", "run", "mod", "echo", "flip", "inv", "mt", "part",
                "proc", "hemi", "space", "split", "recording", "chunk", "seg", "res", "den",
                "label", "from", "to", "mode", "desc")
_EXTENSIONS = (".nii.gz", ".nii", ".json", ".tsv", ".txt", ".png", ".svg")
_LABEL = re.compile(r"^[A-Za-z0-9+]+$")


@dataclass(frozen=True)
class BidsName:
    """A BIDS-style file name: ``<key-value>_..._<suffix><extension>``.

    Attributes
    ----------
    entities : tuple of (key, value)
        In file-name order. Parts of a non-BIDS name without a ``-`` are kept as
        ``(part, "")`` so that no information is lost.
    suffix : str
        e.g. ``"bold"``, ``"mask"``, ``"timeseries"``.
    extension : str
        e.g. ``".nii.gz"``.
    """

    entities: tuple
    suffix: str
    extension: str

    def get(self, key: str, default: str | None = None) -> str | None:
        """The value of entity ``key``."""
        return dict(self.entities).get(key, default)

    @property
    def stem(self) -> str:
        """The entities alone, e.g. ``sub-01_ses-1_task-rest_run-1``."""
        return "_".join(f"{k}-{v}" if v else k for k, v in self.entities)

    def with_entities(self, *, suffix: str | None = None, extension: str | None = None,
                      **changes: str | None) -> "BidsName":
        """A copy with entities set (``None`` removes one), placed in BIDS order."""
        entities = dict(self.entities)
        for key, value in changes.items():
            key = key.rstrip("_")  # from_="boldref": "from" is a Python keyword
            if value is None:
                entities.pop(key, None)
            else:
                entities[key] = str(value)
        # known entities in BIDS order; unknown ones keep their place before the known tail
        rank = {key: i for i, key in enumerate(ENTITY_ORDER)}
        order = sorted(entities, key=lambda k: rank.get(k, rank["space"] - 0.5))
        return BidsName(tuple((k, entities[k]) for k in order),
                        self.suffix if suffix is None else suffix,
                        self.extension if extension is None else extension)

    def __str__(self) -> str:
        return f"{self.stem}_{self.suffix}{self.extension}" if self.entities else \
            f"{self.suffix}{self.extension}"


def parse_bids_name(name: str | Path) -> BidsName:
    """Read a file name (or path: only its name is used) into entities, suffix and extension.

    ``sub-01_ses-1_task-rest_run-2_bold.nii.gz`` -> entities sub, ses, task, run; suffix
    ``bold``; extension ``.nii.gz``. The extension is matched case-insensitively and
    written back in lower case.

    Raises
    ------
    ValueError
        When the name has no suffix (no ``_`` before the extension) or an empty part.
    """
    filename = PurePosixPath(str(name)).name
    lower = filename.lower()
    extension = next((e for e in _EXTENSIONS if lower.endswith(e)), PurePosixPath(lower).suffix)
    body = filename[: len(filename) - len(extension)]
    parts = body.split("_")
    if len(parts) < 2 or not all(parts):
        raise ValueError(f"{filename!r} is not a BIDS-style name (<entities>_<suffix>.<ext>)")
    entities = tuple(tuple(p.split("-", 1)) if "-" in p else (p, "") for p in parts[:-1])
    return BidsName(entities, parts[-1], extension)


# ------------------------------------------------------------------------------------------
# Inputs and runs

BOLD_SUFFIX = "bold"
#: What the trigger fires on (the S3 notification's suffix filter) and the engine reads.
INPUT_SUFFIX = "_bold.nii.gz"
# nilearn ships the ICBM 2009a nonlinear *symmetric* template (mni_icbm152_*_tal_nlin_sym_09a),
# TemplateFlow's MNI152NLin2009aSym: outputs are named for the template actually used.
TEMPLATE = "MNI152NLin2009aSym"
TEMPLATE_RES = "2"


def input_problem(key: str) -> str | None:
    """Why an uploaded key will *not* be processed, or None if the trigger takes it.

    The trigger's suffix filter is case-sensitive and takes compressed BOLD runs only, so
    the reason says what to rename or compress.
    """
    name = PurePosixPath(key).name
    if name.endswith(INPUT_SUFFIX):
        return None
    if name.lower().endswith(INPUT_SUFFIX):
        return (f"{name}: the trigger matches '{INPUT_SUFFIX}' in lower case only; rename the "
                "file.")
    if name.lower().endswith("_bold.nii"):
        return f"{name}: uncompressed NIfTI; compress it (gzip {name}) and upload the .nii.gz."
    if name.endswith(".json"):
        return f"{name}: a sidecar; it is read with its run, not processed on its own."
    return f"{name}: not a BOLD run (only files ending in '{INPUT_SUFFIX}' are processed)."


@dataclass(frozen=True)
class Output:
    """How an output's name derives from its run's source name."""

    entities: dict = field(default_factory=dict)
    suffix: str = "bold"
    extension: str = ".nii.gz"
    folder: str = ""  # "figures": instead of the run's func/ folder


_MNI = {"space": TEMPLATE, "res": TEMPLATE_RES}
#: Every file the function writes for a run, by kind (fMRIPrep's names).
OUTPUTS: dict[str, Output] = {
    "preproc_bold": Output({"desc": "preproc"}),            # realigned, unsmoothed
    "preproc_json": Output({"desc": "preproc"}, extension=".json"),
    "smoothed_bold": Output({"desc": "smoothed"}),          # realigned and smoothed
    "smoothed_json": Output({"desc": "smoothed"}, extension=".json"),
    "boldref": Output({}, suffix="boldref"),                # the motion reference volume
    "brain_mask": Output({"desc": "brain"}, suffix="mask"),
    "confounds": Output({"desc": "confounds"}, suffix="timeseries", extension=".tsv"),
    "confounds_json": Output({"desc": "confounds"}, suffix="timeseries", extension=".json"),
    "mni_preproc_bold": Output({**_MNI, "desc": "preproc"}),
    "mni_preproc_json": Output({**_MNI, "desc": "preproc"}, extension=".json"),
    "mni_brain_mask": Output({**_MNI, "desc": "brain"}, suffix="mask"),
    # BIDS requires a sidecar saying what res-2 means for any image with a res- entity
    "mni_brain_mask_json": Output({**_MNI, "desc": "brain"}, suffix="mask", extension=".json"),
    "xfm_to_mni": Output({"from": "boldref", "to": TEMPLATE, "mode": "image"}, suffix="xfm",
                         extension=".txt"),
    "normalization_figure": Output({"space": TEMPLATE, "desc": "normalization"},
                                   extension=".png", folder="figures"),
}
DONE_SUFFIX = "_done.json"    # written last: a reader who sees it sees a complete set
ERROR_SUFFIX = "_error.json"  # a run that failed: what went wrong, the cause, what to do


@dataclass(frozen=True)
class Run:
    """One input run and where its derivatives go.

    Attributes
    ----------
    key : str
        The input's path relative to the input root (the S3 key without the input prefix).
    source : BidsName
        The input's parsed name (its sidecar has the same name).
    folder : str
        The derivatives folder of its outputs, relative to the derivatives root.
    name : BidsName
        The entities its outputs are named with: the source's, plus the session of its
        folder when the file name leaves it out (``sub-02/ses-2/func/sub-02_task-rest``
        becomes ``sub-02_ses-2_task-rest``), so outputs are valid BIDS and never collide.
    """

    key: str
    source: BidsName
    folder: str
    name: BidsName

    @property
    def id(self) -> str:
        """Unique name of the run: ``<folder>/<entities>``, e.g.
        ``sub-01/ses-1/func/sub-01_ses-1_task-rest_run-1``."""
        return f"{self.folder}/{self.name.stem}" if self.folder else self.name.stem

    @property
    def subject(self) -> str | None:
        return self.source.get("sub")

    def filename(self, kind: str) -> str:
        """File name of output ``kind`` (a key of :data:`OUTPUTS`)."""
        spec = OUTPUTS[kind]
        name = self.name.with_entities(suffix=spec.suffix, extension=spec.extension,
                                       **{**{"desc": None}, **spec.entities})
        return str(name)

    def path(self, kind: str) -> str:
        """Path of output ``kind`` relative to the derivatives root."""
        folder = self.folder
        if OUTPUTS[kind].folder:  # sub-01/[ses-1/]func -> sub-01/[ses-1/]figures
            parts = list(PurePosixPath(folder).parts)
            parts = parts[:-1] if parts[-1:] == ["func"] else parts
            folder = "/".join([*parts, OUTPUTS[kind].folder])
        return f"{folder}/{self.filename(kind)}" if folder else self.filename(kind)

    @property
    def done(self) -> str:
        """The completion marker's path relative to the derivatives root."""
        return f"{self.id}{DONE_SUFFIX}"

    @property
    def error(self) -> str:
        """The error record's path relative to the derivatives root."""
        return f"{self.id}{ERROR_SUFFIX}"

    def sidecar_key(self) -> str:
        """The raw JSON sidecar next to the input (BIDS: same name, ``.json``)."""
        parent = PurePosixPath(self.key).parent
        name = str(replace(self.source, extension=".json"))
        return name if str(parent) == "." else f"{parent}/{name}"


def run_from_key(key: str) -> Run:
    """The run of an input, from its key relative to the input root (or any path).

    The outputs go to ``sub-<label>/[ses-<label>/]func/``, as in a BIDS dataset. A key
    already in that layout (its folder ends in ``func/`` below ``sub-<label>/``) keeps its
    folders, even when the file name omits the session; a flat key
    (``sub-01_task-rest_bold.nii.gz``) gets them; leading folders that are not part of the
    layout (``siteA/``) are kept in front, so same-named files in different folders get
    different outputs.

    Raises
    ------
    ValueError
        When the file name is not BIDS-style (see :func:`parse_bids_name`).
    """
    path = PurePosixPath(key.lstrip("/"))
    source = parse_bids_name(path.name)
    parts = [p for p in path.parent.parts if p not in (".", "")]
    subject, session = source.get("sub"), source.get("ses")
    in_layout = parts[-1:] == ["func"] and f"sub-{subject}" in parts
    if subject and not in_layout:
        parts = parts + [f"sub-{subject}", *([f"ses-{session}"] if session else []), "func"]
    name = source
    if subject and not session and in_layout:
        below = parts[parts.index(f"sub-{subject}") + 1:-1]
        if len(below) == 1 and below[0].startswith("ses-"):
            name = source.with_entities(ses=below[0].removeprefix("ses-"))
    return Run(str(path), source, "/".join(parts), name)


# ------------------------------------------------------------------------------------------
# The derivatives dataset

PIPELINE_NAME = "fmri_preproc"
DATASET_DESCRIPTION = "dataset_description.json"
#: Files in the derivatives dataset the BIDS schema does not define yet (the validator skips
#: them): our markers and records, and names fMRIPrep writes from the functional derivatives
#: proposal (BEP 012) that schema 2.0 (BIDS 1.11) does not include yet.
BIDSIGNORE = (".bidsignore", "\n".join([
    "# markers and error records of the cloud function", f"*{DONE_SUFFIX}", f"*{ERROR_SUFFIX}",
    "# fMRIPrep's names not yet in the BIDS schema (BEP 012): confounds, boldref, transforms",
    "*_timeseries.tsv", "*_timeseries.json", "*_boldref.nii.gz", "*_xfm.txt",
    "# QC figures, in sub-<label>/[ses-<label>/]figures/ (the validator matches this form only)",
    "**/figures", ""]))


def derivatives_description(version: str, *, source_url: str | None = None) -> dict:
    """``dataset_description.json`` of the derivatives dataset (BIDS 1.10)."""
    description = {
        "Name": "fmri_preproc derivatives (cloud fMRI workbook)",
        "BIDSVersion": "1.10.0",
        "DatasetType": "derivative",
        "GeneratedBy": [{"Name": PIPELINE_NAME, "Version": version,
                         "Description": "Rigid-body motion correction, smoothing, confounds "
                                        "and normalisation in AWS Lambda (numpy + nibabel)",
                         "CodeURL": "https://github.com/fmri-cloud-workbook"}],
    }
    if source_url:
        description["SourceDatasets"] = [{"URL": source_url}]
    return description


def dataset_files(version: str, *, source_url: str | None = None) -> dict[str, str]:
    """The derivatives dataset's own files at its root, name -> text (the same every time)."""
    name, content = BIDSIGNORE
    return {DATASET_DESCRIPTION: json.dumps(derivatives_description(
        version, source_url=source_url), indent=2), name: content}


# ------------------------------------------------------------------------------------------
# Confounds (fMRIPrep's column names)

MOTION_PARAMS = ("trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z")
FRAMEWISE_DISPLACEMENT = "framewise_displacement"
DVARS = "dvars"
STD_DVARS = "std_dvars"
RMSD = "rmsd"
GLOBAL_SIGNAL = "global_signal"
CSF = "csf"
WHITE_MATTER = "white_matter"
MOTION_OUTLIER = "motion_outlier"              # + two digits, one column per flagged volume
NON_STEADY_STATE = "non_steady_state_outlier"  # + two digits
A_COMP_COR = "a_comp_cor"                      # + "_" + two digits
COSINE = "cosine"                              # + two digits
EXPANSIONS = ("derivative1", "power2", "derivative1_power2")


def expansion_names(base: str) -> list[str]:
    """``base`` and its fMRIPrep expansions: ``x, x_derivative1, x_power2,
    x_derivative1_power2``."""
    return [base, *(f"{base}_{e}" for e in EXPANSIONS)]


def indexed_column(prefix: str, index: int) -> str:
    """``motion_outlier03``, ``cosine00``, ``a_comp_cor_02``: fMRIPrep's numbered columns."""
    separator = "_" if prefix == A_COMP_COR else ""
    return f"{prefix}{separator}{index:02d}"


# ------------------------------------------------------------------------------------------
# Sidecars, records, log events, the engine's result


class Sidecar:
    """Keys of the JSON sidecars and records the function writes (BIDS keys where one
    exists)."""

    REPETITION_TIME = "RepetitionTime"          # seconds
    REPETITION_TIME_SOURCE = "RepetitionTimeSource"  # where the TR came from, and checks
    SLICE_TIMING = "SliceTiming"
    SKULL_STRIPPED = "SkullStripped"
    SOURCES = "Sources"
    SMOOTHING_FWHM = "SmoothingFWHM"            # mm
    REFERENCE_VOLUME = "ReferenceVolume"         # index of the motion reference volume
    MOTION_CORRECTION = "MotionCorrection"
    SOFTWARE = "Software"
    TIMINGS = "Timings_s"
    SUMMARY = "Summary"
    WARNINGS = "Warnings"
    SOURCE_OBJECT = "SourceObject"               # s3://bucket/key, version id, ETag


class Record:
    """Keys of ``_done.json`` and ``_error.json``."""

    SOURCE = "source"
    VERSION_ID = "version_id"
    ETAG = "etag"
    INPUT_LAST_MODIFIED = "input_last_modified"  # with the ETag: which upload was processed
    FINISHED = "finished"
    DURATION_S = "duration_s"
    ERROR = "error"
    ERROR_TYPE = "error_type"
    CAUSE = "cause"
    ACTION = "action"
    PERMANENT = "permanent"
    WARNINGS = "warnings"


class LogEvent:
    """The ``message`` of the handler's JSON log lines; each line also has ``key``."""

    START = "start"
    DONE = "done"
    FAILED = "failed"
    SKIPPED = "skipped"        # the key is not a BOLD run under the input prefix
    SUPERSEDED = "superseded"  # a newer upload replaced the input: this run wrote nothing


@dataclass(frozen=True)
class PreprocResult:
    """What :func:`fmri_preproc.preprocess` returns.

    Attributes
    ----------
    run : Run
        The run, named from the input file.
    outputs : dict of str to Path
        Output kind (a key of :data:`OUTPUTS`) -> the local file written.
    summary : dict
        Numbers about the run (volumes, motion, tSNR, memory, time), JSON-serialisable.
    """

    run: Run
    outputs: dict
    summary: dict[str, Any]
