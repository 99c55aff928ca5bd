"""Finding a study's runs on disk and reading their confounds.

The derivatives follow fMRIPrep's names (``*_desc-preproc_bold.nii.gz``,
``*_desc-confounds_timeseries.tsv``); confounds are read through nilearn's fMRIPrep
interface so that the same code reads real fMRIPrep output.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

__all__ = ["MOTION_COLUMNS", "find_runs", "read_confounds", "load_motion_confounds",
           "reference_volume", "relative_motion"]


MOTION_COLUMNS = ["trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z"]


def _run_name(path: Path) -> str:
    """``sub-01_task-rest`` from any of a run's file names."""
    name = Path(path).name
    for tail in ("_desc-preproc_bold", "_desc-confounds_timeseries", "_error", "_bold"):
        if tail in name:
            return name.split(tail)[0]
    raise ValueError(f"{name} is not a BIDS-style run file")


def find_runs(derivatives_dir, raw_dir=None) -> pd.DataFrame:
    """Table of the runs found in a derivatives folder (and their raw inputs).

    Parameters
    ----------
    derivatives_dir : str or Path
        Folder with ``<name>_desc-preproc_bold.nii.gz``, ``<name>_desc-confounds_timeseries.tsv``,
        ``<name>_desc-preproc_bold.json`` and, for failed inputs, ``<name>_error.json``
        (searched recursively).
    raw_dir : str or Path, optional
        Folder with the inputs ``<name>_bold.nii.gz``.

    Returns
    -------
    pandas.DataFrame
        One row per run name, sorted: ``name``, ``subject``, ``preproc``, ``confounds``,
        ``sidecar``, ``error`` and ``raw`` (paths, or None when missing), ``ok`` (True when
        the preprocessed image and confounds are both present and no error was written).
    """
    derivatives_dir = Path(derivatives_dir)
    kinds = {"preproc": "*_desc-preproc_bold.nii.gz",
             "confounds": "*_desc-confounds_timeseries.tsv",
             "sidecar": "*_desc-preproc_bold.json", "error": "*_error.json"}
    rows: dict[str, dict] = {}
    for kind, pattern in kinds.items():
        for path in sorted(derivatives_dir.rglob(pattern)):
            rows.setdefault(_run_name(path), {})[kind] = path
    if raw_dir is not None:
        for path in sorted(Path(raw_dir).glob("*_bold.nii.gz")):
            rows.setdefault(_run_name(path), {})["raw"] = path
    table = pd.DataFrame([{"name": name, **paths} for name, paths in sorted(rows.items())],
                         columns=["name", *kinds, "raw"])
    table = table.astype(object).where(table.notna(), None)
    table.insert(1, "subject", table["name"].str.split("_").str[0])
    table["ok"] = table["preproc"].notna() & table["confounds"].notna() & table["error"].isna()
    return table


def read_confounds(path) -> pd.DataFrame:
    """Read an fMRIPrep-style confounds TSV (``n/a`` becomes NaN)."""
    return pd.read_csv(path, sep="\t", na_values=["n/a"])


def load_motion_confounds(preproc_path, *, fd_threshold: float = 0.5,
                          std_dvars_threshold: float = 1.5, scrub: int = 5):
    """24 motion regressors and the scrubbing mask of a run, via nilearn's fMRIPrep reader.

    Parameters
    ----------
    preproc_path : str or Path
        The ``*_desc-preproc_bold.nii.gz`` file; its confounds TSV must sit beside it.
    fd_threshold : float
        Framewise displacement (mm) above which a volume is censored.
    std_dvars_threshold : float
        Standardized DVARS above which a volume is censored.
    scrub : int
        Also censor kept segments shorter than this many volumes (nilearn's default, 5).

    Returns
    -------
    confounds : pandas.DataFrame
        The six parameters, their temporal derivatives, and the squares of both (24).
    sample_mask : ndarray of int or None
        Indices of the volumes kept (None when none is censored).

    Notes
    -----
    This calls :func:`nilearn.interfaces.fmriprep.load_confounds` with
    ``strategy=("motion", "scrub")`` and ``motion="full"``: the 24-parameter model of
    Friston et al. (1996) with motion censoring ("scrubbing", Power et al. 2014).
    """
    from nilearn.interfaces.fmriprep import load_confounds

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        confounds, sample_mask = load_confounds(
            str(preproc_path), strategy=("motion", "scrub"), motion="full", scrub=scrub,
            fd_threshold=fd_threshold, std_dvars_threshold=std_dvars_threshold)
    return confounds, sample_mask


def reference_volume(sidecar_path, n_volumes: int) -> int:
    """Index of the engine's motion reference volume, read from the run's JSON sidecar.

    Looks for a key containing "reference" with an integer (or "first"/"middle") value;
    falls back to the middle volume.
    """
    def search(obj):
        if isinstance(obj, dict):
            for key, value in obj.items():
                if "reference" in key.lower() and isinstance(value, (int, str)):
                    return value
                found = search(value)
                if found is not None:
                    return found
        return None

    value = None
    if sidecar_path is not None and Path(sidecar_path).exists():
        value = search(json.loads(Path(sidecar_path).read_text()))
    if isinstance(value, int) and not isinstance(value, bool):
        return value % n_volumes
    if value == "first":
        return 0
    return n_volumes // 2


def relative_motion(motion: np.ndarray, affine: np.ndarray, shape, reference: int) -> np.ndarray:
    """Express true motion relative to another reference volume.

    With ``M_t`` the true matrix of volume ``t`` (reference point -> moving point), the
    motion of volume ``t`` seen from volume ``r`` is ``M_t M_r^-1``; this is what a
    realignment to volume ``r`` should estimate.

    Parameters
    ----------
    motion : (T, 6) ndarray
        True parameters (mm, radians), engine convention.
    affine, shape :
        The run's affine and shape.
    reference : int
        Index of the new reference volume.

    Returns
    -------
    (T, 6) ndarray
    """
    from fmri_preproc import affine_to_params, params_to_affine

    motion = np.asarray(motion, dtype=float)
    inv_ref = np.linalg.inv(params_to_affine(motion[reference], affine, shape))
    return np.array([affine_to_params(params_to_affine(p, affine, shape) @ inv_ref, affine, shape)
                     for p in motion])
