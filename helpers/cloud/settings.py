"""Settings and resource names: the one place that says what the workbook creates and where.

Every notebook starts with ``cfg = open_session(mode, aws_confirm)``, which calls
:func:`load_settings`. The first call creates a *workbook id* (for example
``fmriwb-3f9a1c2e``) and saves it; later notebooks, in new kernels, load the same id, so they
find the buckets, role and function that the earlier notebooks made. Every resource name is
derived from that id, and every resource carries the same tags, so cleanup can find and
verify all of it.

Where the id is kept:

- local mode: ``build/workbook-local.json``, beside the local cloud it names (``make clean``
  removes both together);
- aws mode: ``$XDG_CONFIG_HOME/fmri-cloud-workbook/workbook-aws.json`` (default
  ``~/.config/...``), outside the project, so ``make clean`` or a fresh clone cannot lose
  the only record of what lives in your account.
"""
from __future__ import annotations

import json
import os
import re
import secrets
from dataclasses import asdict, dataclass, fields, replace
from functools import lru_cache
from pathlib import Path

import boto3

PROJECT_ROOT = Path(__file__).resolve().parents[2]
# Overridable so that tests and CI runs keep their state apart from a student's own run.
BUILD_DIR = Path(os.environ.get("WORKBOOK_BUILD_DIR", PROJECT_ROOT / "build"))
DATA_DIR = Path(os.environ.get("WORKBOOK_DATA_DIR", PROJECT_ROOT / "data"))
# Real scans no simulator made (studyforrest, public domain; provenance in its README):
# beside the project, never in its git history.
REAL_DATA_DIR = Path(os.environ.get("WORKBOOK_REAL_DATA_DIR",
                                    PROJECT_ROOT.parent / "shared" / "data" / "realdata"))
REAL_RUN = REAL_DATA_DIR / "studyforrest_oneback_full_bold.nii.gz"
MODES = ("local", "aws")
TAG_PROJECT = "fmri-cloud-workbook"
ID_PREFIX = "fmriwb-"
DEFAULT_REGION = "us-east-1"
# Every execution role the workbook creates lives under this IAM path: cleanup lists roles
# by it (not every role of the account), and the operator policy grants IAM on it only.
ROLE_PATH = f"/{TAG_PROJECT}/"
# The only values CloudWatch Logs accepts for retentionInDays (PutRetentionPolicy).
LOG_RETENTION_DAYS = (1, 3, 5, 7, 14, 30, 60, 90, 120, 150, 180, 365, 400, 545, 731, 1096,
                      1827, 2192, 2557, 2922, 3288, 3653)
ROLE_ARN_RE = re.compile(r"^arn:(?P<partition>aws[a-z-]*):iam::(?P<account>\d{12}):"
                         r"role/(?:[\w+=,.@-]+/)*(?P<name>[\w+=,.@-]{1,64})$")


class AwsModeRefused(RuntimeError):
    """Raised when aws mode is asked for without an explicit confirmation, or under CI."""


class NoSavedWorkbook(RuntimeError):
    """Raised when a workbook id is needed but none is saved (``create=False``)."""


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
    object_expiry_days : int
        Objects in both buckets expire after this many days (S3 lifecycle rule), a safety
        net for a forgotten cleanup. Any whole number of days >= 1.
    log_retention_days : int
        The function's log group keeps events this many days. CloudWatch Logs accepts only
        the values in :data:`LOG_RETENTION_DAYS` (1, 3, 5, 7, 14, 30, 60, 90, ...).
    existing_role_arn : str or None
        A pre-made execution role to use instead of creating one (accounts that forbid
        ``iam:CreateRole``, such as AWS Academy's). Cleanup never deletes it.
    """

    mode: str
    workbook_id: str
    region: str = DEFAULT_REGION
    object_expiry_days: int = 7
    log_retention_days: int = 7
    existing_role_arn: str | None = None
    input_prefix: str = "raw/"
    output_prefix: str = "derivatives/"

    def __post_init__(self) -> None:
        if not isinstance(self.object_expiry_days, int) or self.object_expiry_days < 1:
            raise ValueError(f"object_expiry_days must be a whole number of days >= 1, not "
                             f"{self.object_expiry_days!r} (S3 lifecycle Expiration.Days)")
        if self.log_retention_days not in LOG_RETENTION_DAYS:
            raise ValueError(
                f"log_retention_days={self.log_retention_days!r} is not a value CloudWatch "
                f"Logs accepts; choose one of {LOG_RETENTION_DAYS}")
        if self.existing_role_arn is not None:
            match = ROLE_ARN_RE.match(self.existing_role_arn)
            if match is None:
                raise ValueError(f"existing_role_arn {self.existing_role_arn!r} is not an IAM "
                                 "role ARN (arn:aws:iam::<12-digit account>:role/<name>); copy "
                                 "it from IAM -> Roles -> your role -> ARN")
            if self.mode == "aws" and match["partition"] != self.partition:
                raise ValueError(f"the role {self.existing_role_arn} is in the "
                                 f"{match['partition']} partition, but region {self.region} is "
                                 f"in {self.partition}: use a role of the same partition")

    @property
    def partition(self) -> str:
        """The ARN partition of the region: ``aws``, ``aws-cn``, ``aws-us-gov``, ...

        Every ARN the workbook builds starts with ``arn:<partition>:``.
        """
        return partition_of(self.region)

    @property
    def input_bucket(self) -> str:
        return f"{self.workbook_id}-input"

    @property
    def output_bucket(self) -> str:
        return f"{self.workbook_id}-output"

    @property
    def owns_role(self) -> bool:
        """True when the workbook creates (and cleanup deletes) its execution role."""
        return self.existing_role_arn is None

    @property
    def role_name(self) -> str:
        """The execution role's name: the workbook's own, or the pre-made role's."""
        if self.existing_role_arn:
            return ROLE_ARN_RE.match(self.existing_role_arn)["name"]
        return f"{self.workbook_id}-lambda-role"

    @property
    def role_path(self) -> str:
        return ROLE_PATH

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


@lru_cache(maxsize=None)
def partition_of(region: str) -> str:
    """The ARN partition of ``region``, from botocore's own endpoint data."""
    return boto3.session.Session().get_partition_for_region(region)


def config_dir() -> Path:
    """The user's configuration folder for this project (``$XDG_CONFIG_HOME``, else
    ``~/.config``; a relative XDG_CONFIG_HOME is ignored, as the XDG spec says)."""
    base = os.environ.get("XDG_CONFIG_HOME", "")
    root = Path(base) if base and Path(base).is_absolute() else Path.home() / ".config"
    return root / TAG_PROJECT


def state_file(mode: str) -> Path:
    """Where the workbook id of ``mode`` is kept (see the module's docstring)."""
    return (BUILD_DIR if mode == "local" else config_dir()) / f"workbook-{mode}.json"


def resolve_region(region: str | None = None) -> tuple[str, str]:
    """The region to use and where it came from, as boto3 itself resolves it.

    Parameters
    ----------
    region : str, optional
        Given explicitly (a notebook parameter, ``--region``): used as is.

    Returns
    -------
    (str, str)
        The region, and a phrase saying where it came from (to print).
    """
    if region:
        return region, "as given"
    session = boto3.session.Session()  # AWS_REGION, AWS_DEFAULT_REGION, the profile (SSO too)
    if session.region_name:
        for name in ("AWS_REGION", "AWS_DEFAULT_REGION"):
            if os.environ.get(name) == session.region_name:
                return session.region_name, f"from {name}"
        return session.region_name, f"from your AWS profile {session.profile_name!r}"
    return DEFAULT_REGION, ("the default: no region is configured (aws configure set region "
                            "<region>, or AWS_DEFAULT_REGION)")


def load_settings(mode: str = "local", *, aws_confirm: bool = False,
                  region: str | None = None, create: bool = True) -> Settings:
    """Load this workbook's settings, creating its id on first use.

    Parameters
    ----------
    mode : {"local", "aws"}
        Where resources live. ``"aws"`` creates real, billable resources.
    aws_confirm : bool
        Must be True for ``mode="aws"``: the explicit opt-in.
    region : str, optional
        aws mode: the region for a new workbook; default: boto3's own resolution (the
        environment, then your profile, including SSO profiles), else us-east-1. Always
        us-east-1 locally. A saved workbook keeps its region: asking for another is an error.
    create : bool
        False: raise :class:`NoSavedWorkbook` instead of minting a new id (cleanup must not
        invent a workbook and then report that "nothing is left" of it).

    Returns
    -------
    Settings

    Raises
    ------
    AwsModeRefused
        For aws mode without confirmation, or when running under CI or pytest.
    NoSavedWorkbook
        With ``create=False`` when no id is saved.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    if mode == "aws":
        require_aws_opt_in(aws_confirm)
    path = state_file(mode)
    if path.exists():
        cfg = _from_saved(json.loads(path.read_text()))
        if mode == "aws":
            _check_saved_region(cfg, region)
        return cfg
    if not create:
        raise NoSavedWorkbook(f"No {mode} workbook id is saved in {path}. Pass the id "
                              "(--workbook-id fmriwb-...), or find every workbook by its "
                              "tags (--all).")
    if mode == "aws":
        region, source = resolve_region(region)
    else:
        region, source = DEFAULT_REGION, "the local cloud's"
    cfg = Settings(mode=mode, workbook_id=f"{ID_PREFIX}{secrets.token_hex(4)}", region=region)
    save_settings(cfg)
    print(f"New workbook {cfg.workbook_id} in {region} ({source}); its id is saved in {path}")
    return cfg


def save_settings(cfg: Settings) -> Path:
    """Write ``cfg`` where :func:`load_settings` finds it (atomically)."""
    path = state_file(cfg.mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(asdict(cfg), indent=2))
    partial.replace(path)
    return path


def choose_execution_role(cfg: Settings, existing_role_arn: str | None) -> Settings:
    """Use a pre-made execution role (or, with None, the workbook's own); save the choice.

    Notebook 01 calls this with its ``existing_role_arn`` parameter; later notebooks load
    the saved choice.
    """
    if existing_role_arn == cfg.existing_role_arn:
        return cfg
    cfg = replace(cfg, existing_role_arn=existing_role_arn)
    save_settings(cfg)
    return cfg


def forget_settings(mode: str) -> None:
    """Drop the saved workbook id (after cleanup), so the next run gets fresh names."""
    state_file(mode).unlink(missing_ok=True)


def _from_saved(saved: dict) -> Settings:
    """Settings from a saved file, also one written before a field was renamed."""
    if "retention_days" in saved:  # one field for both, before they were separated
        days = saved.pop("retention_days")
        saved.setdefault("object_expiry_days", days)
        saved.setdefault("log_retention_days", days if days in LOG_RETENTION_DAYS else 7)
    known = {f.name for f in fields(Settings)}
    return Settings(**{k: v for k, v in saved.items() if k in known})


def _check_saved_region(cfg: Settings, region: str | None) -> None:
    """A saved workbook keeps its region; say so when the configuration points elsewhere."""
    if region and region != cfg.region:
        raise ValueError(f"Workbook {cfg.workbook_id} lives in {cfg.region}, not {region}. "
                         f"Clean it up first (notebook 05, or python -m helpers.cloud.cleanup "
                         f"--mode aws --yes --region {cfg.region}), then start again in "
                         f"{region}; or leave region unset.")
    configured, source = resolve_region()
    if configured != cfg.region:
        print(f"Note: workbook {cfg.workbook_id} lives in {cfg.region}; your configuration "
              f"says {configured} ({source}). Using {cfg.region}.")


def require_aws_opt_in(aws_confirm: bool, *,
                       how: str = "set the notebook parameter aws_confirm = True") -> None:
    """Refuse aws mode unless confirmed, and always under CI or tests.

    Parameters
    ----------
    aws_confirm : bool
        The explicit opt-in (a notebook's ``aws_confirm``, the cleanup CLI's ``--yes``).
    how : str
        How to give it, for the error message.
    """
    if os.environ.get("CI") or os.environ.get("PYTEST_CURRENT_TEST"):
        raise AwsModeRefused("aws mode is disabled under CI and tests: they must never "
                             "touch a real AWS account. Use mode='local'.")
    if aws_confirm is not True:
        raise AwsModeRefused(
            "aws mode works on real resources in your AWS account and costs money. "
            f"To go ahead, {how}; or use mode = 'local' for the free emulated cloud.")
