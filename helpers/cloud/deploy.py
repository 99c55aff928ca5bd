"""Build the Lambda deployment zip: our handler and engine plus numpy and nibabel wheels."""
from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from helpers.cloud.settings import BUILD_DIR, PROJECT_ROOT

LAMBDA_SOURCE = PROJECT_ROOT / "lambda_package"
# AWS Lambda limits: https://docs.aws.amazon.com/lambda/latest/dg/gettingstarted-limits.html
ZIPPED_LIMIT_MB = 50     # direct upload of a .zip in CreateFunction
UNZIPPED_LIMIT_MB = 250  # everything extracted, layers included
# Fixed timestamp: the same sources give the same zip, so CodeSha256 changes only with code.
ZIP_DATE = (2020, 1, 1, 0, 0, 0)
PRUNE_DIRS = {"__pycache__", "tests", "testing"}
# python3.12 runs on Amazon Linux 2023 (glibc 2.34), so manylinux_2_28 wheels work there;
# numpy >= 2.3 has no manylinux2014 wheels, which rules out python3.11 on Amazon Linux 2.
AWS_RUNTIME = "python3.12"
AWS_PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")


@dataclass(frozen=True)
class LambdaZip:
    """A built deployment package."""

    path: Path
    runtime: str
    zipped_mb: float
    unzipped_mb: float

    def report(self) -> str:
        """One line per size, against Lambda's limits."""
        return (f"{self.path.name} for {self.runtime}\n"
                f"  zipped:   {self.zipped_mb:6.1f} MB of {ZIPPED_LIMIT_MB} MB "
                f"({self.zipped_mb / ZIPPED_LIMIT_MB:.0%} of the direct-upload limit)\n"
                f"  unzipped: {self.unzipped_mb:6.1f} MB of {UNZIPPED_LIMIT_MB} MB "
                f"({self.unzipped_mb / UNZIPPED_LIMIT_MB:.0%})")


def local_runtime() -> str:
    """The Lambda runtime that matches this interpreter (e.g. ``python3.11``)."""
    return f"python{sys.version_info.major}.{sys.version_info.minor}"


def build_lambda_zip(*, runtime: str | None = None, for_aws: bool = False,
                     out_dir: Path = BUILD_DIR / "lambda") -> LambdaZip:
    """Install the Lambda's requirements next to its code and zip them.

    Parameters
    ----------
    runtime : str, optional
        Lambda runtime, e.g. ``"python3.12"``; default: ``AWS_RUNTIME`` for AWS, else the
        local interpreter's version (the local cloud runs the zip with this interpreter).
    for_aws : bool
        True: Linux x86_64 (manylinux) wheels for the runtime's Python, as AWS needs.
        False: wheels for this machine, which the local cloud runs.
    out_dir : Path
        Where the staging folder and the zip go.

    Returns
    -------
    LambdaZip
    """
    runtime = runtime or (AWS_RUNTIME if for_aws else local_runtime())
    stage = out_dir / "package"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    _pip_install(stage, runtime, for_aws)
    shutil.copy2(LAMBDA_SOURCE / "handler.py", stage)
    shutil.copytree(LAMBDA_SOURCE / "fmri_preproc", stage / "fmri_preproc",
                    ignore=shutil.ignore_patterns("__pycache__"))
    _prune(stage)
    path = out_dir / f"function-{runtime}{'-aws' if for_aws else ''}.zip"
    unzipped = _write_zip(stage, path)
    return LambdaZip(path, runtime, path.stat().st_size / 2**20, unzipped / 2**20)


def _pip_install(stage: Path, runtime: str, for_aws: bool) -> None:
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
           "--only-binary=:all:", "--target", str(stage),
           "-r", str(LAMBDA_SOURCE / "requirements.txt")]
    if for_aws:
        version = runtime.removeprefix("python")
        cmd += ["--implementation", "cp", "--python-version", version]
        cmd += [arg for platform in AWS_PLATFORMS for arg in ("--platform", platform)]
    # pip's own chatter (and its warnings about the *calling* environment) is noise here.
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"pip could not install the Lambda's requirements:\n{done.stderr}")


def _prune(stage: Path) -> None:
    """Drop test suites and caches: not needed at run time, and they cost megabytes."""
    for path in sorted(stage.rglob("*"), reverse=True):
        if path.is_dir() and path.name in PRUNE_DIRS and "fmri_preproc" not in path.parts:
            shutil.rmtree(path)
    shutil.rmtree(stage / "bin", ignore_errors=True)


def _write_zip(stage: Path, path: Path) -> int:
    """Zip ``stage`` reproducibly; return the unzipped size in bytes."""
    partial = path.with_suffix(".zip.partial")
    unzipped = 0
    with zipfile.ZipFile(partial, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        for file in sorted(p for p in stage.rglob("*") if p.is_file()):
            info = zipfile.ZipInfo(str(file.relative_to(stage)), date_time=ZIP_DATE)
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, file.read_bytes())
            unzipped += file.stat().st_size
    partial.replace(path)
    return unzipped
