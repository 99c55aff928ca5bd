"""Finding a study's runs on disk and reading their confounds.

The derivatives follow fMRIPrep's names (``*_desc-preproc_bold.nii.gz``,
``*_desc-confounds_timeseries.tsv``); confounds are read through nilearn's fMRIPrep
interface so that the same code reads real fMRIPrep output.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from fmri_preproc.contract import (ERROR_SUFFIX, INPUT_SUFFIX, Sidecar, parse_bids_name,
                                   run_from_key)

__all__ = ["find_runs", "read_confounds", "load_motion_confounds", "reference_volume",
           "relative_motion"]


# Which file of a run is which: (desc, suffix, extension) -> column of find_runs' table.
_KINDS = {("preproc", "bold", ".nii.gz"): "preproc",
          ("confounds", "timeseries", ".tsv"): "confounds",
          ("preproc", "bold", ".json"): "sidecar"}


def _run_file(path: Path, root: Path) -> tuple[str, str] | None:
    """(run id, kind) of a native-space derivatives file, or None for any other file.

    The run id is the contract's (:attr:`fmri_preproc.contract.Run.id`): the folder and every
    entity but ``desc``, so two sessions or runs of one subject never collide.
    """
    try:
        name = parse_bids_name(path.name)
    except ValueError:
        return None
    if name.get("space") is not None:  # template-space files: not this table's native runs
        return None
    folder = path.parent.relative_to(root).as_posix()
    if path.name.endswith(ERROR_SUFFIX):
        kind = "error"
        stem = path.name.removesuffix(ERROR_SUFFIX)
    else:
        kind = _KINDS.get((name.get("desc"), name.suffix, name.extension))
        stem = name.with_entities(desc=None).stem
    if kind is None:
        return None
    return (stem if folder == "." else f"{folder}/{stem}"), kind


def find_runs(derivatives_dir, raw_dir=None) -> pd.DataFrame:
    """Table of the runs found in a derivatives folder (and their raw inputs).

    Parameters
    ----------
    derivatives_dir : str or Path
        A derivatives dataset (``sub-XX/[ses-YY/]func/`` with fMRIPrep's names:
        ``*_desc-preproc_bold.nii.gz``, ``*_desc-confounds_timeseries.tsv``,
        ``*_desc-preproc_bold.json`` and, for failed inputs, ``*_error.json``).
    raw_dir : str or Path, optional
        The raw dataset, whose ``*_bold.nii.gz`` runs are matched by the contract's run id.

    Returns
    -------
    pandas.DataFrame
        One row per run id, sorted: ``name`` (the run id), ``subject``, ``preproc``,
        ``confounds``, ``sidecar``, ``error`` and ``raw`` (paths, or None when missing),
        ``ok`` (True when the preprocessed image and confounds are both present and no error
        was written).
    """
    derivatives_dir = Path(derivatives_dir)
    rows: dict[str, dict] = {}
    for path in sorted(p for p in derivatives_dir.rglob("*") if p.is_file()):
        found = _run_file(path, derivatives_dir)
        if found:
            rows.setdefault(found[0], {})[found[1]] = path
    if raw_dir is not None:
        for path in sorted(Path(raw_dir).rglob(f"*{INPUT_SUFFIX}")):
            run = run_from_key(path.relative_to(raw_dir).as_posix())
            rows.setdefault(run.id, {})["raw"] = path
    columns = ["preproc", "confounds", "sidecar", "error", "raw"]
    table = pd.DataFrame([{"name": name, **paths} for name, paths in sorted(rows.items())],
                         columns=["name", *columns])
    table = table.astype(object).where(table.notna(), None)
    table.insert(1, "subject", [parse_bids_name(f"{n.split('/')[-1]}_bold.nii.gz").get("sub")
                                for n in table["name"]])
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
    ``strategy=("motion", "scrub")`` and ``motion="full"``: the 24-parameter model
    (parameters, derivatives and squares; Satterthwaite et al. 2013,
    :doi:`10.1016/j.neuroimage.2012.08.052`) with motion censoring ("scrubbing", Power et
    al. 2012, :doi:`10.1016/j.neuroimage.2011.10.018`). nilearn censors the flagged volumes
    only; :func:`helpers.analysis.denoising.censor_mask` also censors their neighbours.
    """
    from nilearn.interfaces.fmriprep import load_confounds

    # no warning filter: on the engine's confounds nilearn warns of nothing, and a warning
    # on other data (a missing column, a changed default) is worth seeing
    confounds, sample_mask = load_confounds(
        str(preproc_path), strategy=("motion", "scrub"), motion="full", scrub=scrub,
        fd_threshold=fd_threshold, std_dvars_threshold=std_dvars_threshold)
    return confounds, sample_mask


def reference_volume(sidecar_path, n_volumes: int) -> int:
    """Index of the engine's motion reference volume, from the run's JSON sidecar
    (:attr:`~fmri_preproc.contract.Sidecar.REFERENCE_VOLUME`); the middle volume when the
    sidecar does not say (e.g. another pipeline's derivatives)."""
    value = None
    if sidecar_path is not None and Path(sidecar_path).exists():
        value = json.loads(Path(sidecar_path).read_text()).get(Sidecar.REFERENCE_VOLUME)
    return int(value) % n_volumes if isinstance(value, int) else n_volumes // 2


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
