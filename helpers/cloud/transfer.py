"""S3 transfers with progress bars (boto3's managed transfers + tqdm)."""
from __future__ import annotations

from pathlib import Path

from tqdm.auto import tqdm

from helpers.cloud.clients import client


def upload_files(paths: list[Path], bucket: str, prefix: str) -> list[str]:
    """Upload files to ``s3://bucket/prefix<name>`` with one progress bar over all bytes.

    Parameters
    ----------
    paths : list of Path
        Local files; each keeps its file name.
    bucket, prefix : str
        Destination; ``prefix`` ends with "/".

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
            key = f"{prefix}{path.name}"
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
