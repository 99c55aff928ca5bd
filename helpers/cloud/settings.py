"""Settings and resource names: the one place that says what the workbook creates and where.

Every notebook starts with ``cfg = load_settings(mode=..., aws_confirm=...)``. The first call
creates a *workbook id* (for example ``fmriwb-3f9a1c2e``) and saves it under ``build/``; later
notebooks, in new kernels, load the same id, so they find the buckets, role and function that
the earlier notebooks made. Every resource name is derived from that id, and every resource
carries the same tags, so cleanup can find and verify all of it.
"""
from __future__ import annotations

import json
import os
import secrets
from dataclasses import asdict, dataclass
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]
# Overridable so that tests and CI runs keep their state apart from a student's own run.
BUILD_DIR = Path(os.environ.get("WORKBOOK_BUILD_DIR", PROJECT_ROOT / "build"))
DATA_DIR = Path(os.environ.get("WORKBOOK_DATA_DIR", PROJECT_ROOT / "data"))
MODES = ("local", "aws")
TAG_PROJECT = "fmri-cloud-workbook"
DEFAULT_REGION = "us-east-1"


class AwsModeRefused(RuntimeError):
    """Raised when aws mode is asked for without an explicit confirmation, or under CI."""


@dataclass(frozen=True)
class Settings:
    """What one workbook run uses: its mode, its id and the names derived from it.

    Attributes
    ----------
    mode : str
        ``"local"`` (the embedded emulated cloud, no account, no cost) or ``"aws"``.
    workbook_id : str
        Short unique id; every resource name starts with it.
    region : str
        AWS region for every resource.
    retention_days : int
        Objects in both buckets expire after this many days (lifecycle rule), a safety net
        for a forgotten cleanup.
    """

    mode: str
    workbook_id: str
    region: str = DEFAULT_REGION
    retention_days: int = 7
    input_prefix: str = "raw/"
    output_prefix: str = "derivatives/"

    @property
    def input_bucket(self) -> str:
        return f"{self.workbook_id}-input"

    @property
    def output_bucket(self) -> str:
        return f"{self.workbook_id}-output"

    @property
    def role_name(self) -> str:
        return f"{self.workbook_id}-lambda-role"

    @property
    def policy_name(self) -> str:
        return f"{self.workbook_id}-least-privilege"

    @property
    def function_name(self) -> str:
        return f"{self.workbook_id}-preproc"

    @property
    def log_group(self) -> str:
        return f"/aws/lambda/{self.function_name}"

    @property
    def failure_queue(self) -> str:
        return f"{self.workbook_id}-failed-invocations"

    @property
    def tags(self) -> dict[str, str]:
        """The tag set every resource gets, so it can be found again by tag."""
        return {"project": TAG_PROJECT, "workbook-id": self.workbook_id}

    @property
    def data_dir(self) -> Path:
        return DATA_DIR

    @property
    def build_dir(self) -> Path:
        return BUILD_DIR

    @property
    def results_dir(self) -> Path:
        return BUILD_DIR / "results"


def _state_file(mode: str) -> Path:
    return BUILD_DIR / f"workbook-{mode}.json"


def load_settings(mode: str = "local", *, aws_confirm: bool = False,
                  region: str | None = None) -> Settings:
    """Load this workbook's settings, creating its id on first use.

    Parameters
    ----------
    mode : {"local", "aws"}
        Where resources live. ``"aws"`` creates real, billable resources.
    aws_confirm : bool
        Must be True for ``mode="aws"``: the explicit opt-in.
    region : str, optional
        Region for a new workbook (default ``AWS_DEFAULT_REGION`` or us-east-1 in aws mode;
        always us-east-1 locally). Ignored once the workbook id exists.

    Returns
    -------
    Settings

    Raises
    ------
    AwsModeRefused
        For aws mode without confirmation, or when running under CI or pytest.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    if mode == "aws":
        _check_aws_opt_in(aws_confirm)
    path = _state_file(mode)
    if path.exists():
        return Settings(**json.loads(path.read_text()))
    if mode == "aws":
        region = region or os.environ.get("AWS_DEFAULT_REGION") or DEFAULT_REGION
    cfg = Settings(mode=mode, workbook_id=f"fmriwb-{secrets.token_hex(4)}",
                   region=DEFAULT_REGION if mode == "local" else region)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(asdict(cfg), indent=2))
    return cfg


def forget_settings(mode: str) -> None:
    """Drop the saved workbook id (after cleanup), so the next run gets fresh names."""
    _state_file(mode).unlink(missing_ok=True)


def _check_aws_opt_in(aws_confirm: bool) -> None:
    """Refuse aws mode unless confirmed, and always under CI or tests."""
    if os.environ.get("CI") or os.environ.get("PYTEST_CURRENT_TEST"):
        raise AwsModeRefused("aws mode is disabled under CI and tests: they must never "
                             "touch a real AWS account. Use mode='local'.")
    if aws_confirm is not True:
        raise AwsModeRefused(
            "aws mode creates real resources in your AWS account and costs money. "
            "Set the notebook parameter aws_confirm = True to go ahead, or use "
            "mode = 'local' for the free emulated cloud.")
