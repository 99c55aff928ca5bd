"""S3 transfers with progress bars (boto3's managed transfers + tqdm), and the upload of a
BIDS dataset with its folders kept."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from fmri_preproc.contract import BOLD_SUFFIX, input_problem, parse_bids_name
from helpers.cloud.clients import client


@dataclass
class UploadPlan:
    """What :func:`plan_upload` found in a dataset folder.

    Attributes
    ----------
    root : Path
        The dataset folder; keys keep each file's path relative to it.
    runs : list of Path
        BOLD runs the function will process (``*_bold.nii.gz``).
    sidecars : list of Path
        JSON files the function reads with its runs (BIDS sidecars, inherited ones at the
        top, ``dataset_description.json``); uploaded *before* the runs.
    skipped : pandas.DataFrame
        ``file, reason`` for every other file: not uploaded, and why.
    """

    root: Path
    runs: list = field(default_factory=list)
    sidecars: list = field(default_factory=list)
    skipped: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=["file", "reason"]))


def plan_upload(bids_dir: Path, *, subjects: list[str] | None = None,
                tasks: list[str] | None = None) -> UploadPlan:
    """Sort a dataset's files into runs, sidecars and skipped files (with the reason).

    Parameters
    ----------
    bids_dir : Path
        A BIDS dataset (``sub-XX/[ses-YY/]func/...``) or any folder of BIDS-named runs.
    subjects, tasks : list of str, optional
        Keep only these subjects (``"01"`` or ``"sub-01"``) and tasks (``"rest"``).
    """
    root = Path(bids_dir)
    wanted_subjects = {s.removeprefix("sub-") for s in subjects} if subjects else None
    wanted_tasks = {t.removeprefix("task-") for t in tasks} if tasks else None
    plan, skipped = UploadPlan(root), []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        relative = path.relative_to(root).as_posix()
        if any(part.startswith(".") for part in path.relative_to(root).parts) or \
                relative.startswith(("derivatives/", "sourcedata/", "code/")):
            continue  # hidden files and BIDS folders that are not raw data
        try:
            name = parse_bids_name(path.name)
        except ValueError:
            name = None
        if name is not None and (wanted_subjects and name.get("sub") not in wanted_subjects
                                 or wanted_tasks and name.get("task") not in wanted_tasks):
            continue
        problem = input_problem(relative)
        if problem is None:
            plan.runs.append(path)
        elif path.name == "dataset_description.json" or (
                name is not None and name.suffix == BOLD_SUFFIX and name.extension == ".json"):
            plan.sidecars.append(path)
        else:
            skipped.append({"file": relative, "reason": problem})
    plan.skipped = pd.DataFrame(skipped, columns=["file", "reason"])
    return plan


def upload_dataset(plan: UploadPlan, bucket: str, prefix: str) -> list[str]:
    """Upload a plan's sidecars, then its runs, to ``prefix<path in the dataset>``.

    Sidecars go first: each run's upload triggers the function, which reads its sidecar.

    Returns
    -------
    list of str
        The keys of the runs (each triggers one invocation).
    """
    upload_files(plan.sidecars, bucket, prefix, root=plan.root)
    return upload_files(plan.runs, bucket, prefix, root=plan.root)


def upload_files(paths: list[Path], bucket: str, prefix: str, *,
                 root: Path | None = None) -> list[str]:
    """Upload files to ``s3://bucket/prefix<path>`` with one progress bar over all bytes.

    Parameters
    ----------
    paths : list of Path
        Local files.
    bucket, prefix : str
        Destination; ``prefix`` ends with "/".
    root : Path, optional
        Keys keep each file's path relative to ``root`` (default: the file name only).

    Returns
    -------
    list of str
        The object keys written.
    """
    s3 = client("s3")
    keys = []
    total = sum(Path(p).stat().st_size for p in paths)
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"upload to {bucket}") as bar:
        for path in map(Path, paths):
            relative = path.relative_to(root).as_posix() if root else path.name
            key = f"{prefix}{relative}"
            s3.upload_file(str(path), bucket, key, Callback=bar.update)
            keys.append(key)
    # A plain line too: saved notebooks and their HTML show a widget bar's first state.
    print(f"uploaded {len(keys)} files, {total / 1e6:.1f} MB, to s3://{bucket}/{prefix}")
    return keys


def list_objects(bucket: str, prefix: str = "") -> list[dict]:
    """Every object under a prefix (all pages), as S3's ``Contents`` entries."""
    pages = client("s3").get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [obj for page in pages for obj in page.get("Contents", [])]


def download_prefix(bucket: str, prefix: str, dest_dir: Path) -> list[Path]:
    """Download every object under ``prefix`` into ``dest_dir``, with a progress bar.

    A file appears under its final name only once complete (boto3 writes a temporary
    file and renames it).

    Returns
    -------
    list of Path
        The local files, in key order.
    """
    s3 = client("s3")
    objects = list_objects(bucket, prefix)
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    total = sum(obj["Size"] for obj in objects)
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"download from {bucket}") as bar:
        for obj in objects:
            path = dest_dir / obj["Key"][len(prefix):]
            path.parent.mkdir(parents=True, exist_ok=True)
            s3.download_file(bucket, obj["Key"], str(path), Callback=bar.update)
            paths.append(path)
    print(f"downloaded {len(paths)} files, {total / 1e6:.1f} MB, to {dest_dir}")
    return paths
