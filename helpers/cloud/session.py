"""The first call of every notebook: settings, the cloud to talk to, and a prerequisite check."""
from __future__ import annotations

from helpers import local_cloud
from helpers.cloud.clients import client, use_aws
from helpers.cloud.settings import Settings, load_settings

# What each notebook needs that an earlier notebook made, and which notebook made it.
NEEDS = {
    "buckets": "01_create_buckets_and_role",
    "role": "01_create_buckets_and_role",
    "function": "02_package_and_deploy_lambda",
}


class MissingResources(RuntimeError):
    """An earlier notebook's resources are not there: say which notebook to re-run."""


def open_session(mode: str = "local", aws_confirm: bool = False, *,
                 needs: tuple[str, ...] = (), region: str | None = None) -> Settings:
    """Load settings, connect to the local cloud or AWS, and check prerequisites.

    Parameters
    ----------
    mode : {"local", "aws"}
        The notebook's ``mode`` parameter.
    aws_confirm : bool
        The notebook's explicit opt-in for ``mode="aws"``.
    needs : tuple of str
        Resources made by earlier notebooks that this one uses (keys of ``NEEDS``).
    region : str, optional
        aws mode, a new workbook only: its region (default: boto3's own resolution, i.e.
        ``AWS_REGION``/``AWS_DEFAULT_REGION`` or your profile's region, SSO included).

    Returns
    -------
    Settings

    Raises
    ------
    MissingResources
        With the notebook to re-run, e.g. after the local cloud was stopped or restarted.
    """
    cfg = load_settings(mode, aws_confirm=aws_confirm, region=region)
    if mode == "local":
        state = local_cloud.ensure_running()
        where = f"the local cloud at {state['endpoint']} (emulated: no account, no cost)"
        if state["restarted"] and needs:
            print("The local cloud had stopped, so a new, empty one was started.")
    else:
        use_aws(cfg.region)
        identity = client("sts").get_caller_identity()
        where = f"AWS account {identity['Account']} in {cfg.region} (real, billable)"
    print(f"Workbook {cfg.workbook_id}: {where}")
    missing = [need for need in needs if not _exists(cfg, need)]
    if missing:
        notebooks = sorted({NEEDS[m] for m in missing})
        raise MissingResources(
            f"This notebook needs the {', '.join(missing)} made by {', '.join(notebooks)}, "
            f"but they are not in {'the local cloud' if mode == 'local' else 'your account'}"
            f" (was the local cloud stopped or restarted?). Re-run {notebooks[0]} and the "
            "notebooks after it, in order, then this one.")
    return cfg


def _exists(cfg: Settings, need: str) -> bool:
    """Does the resource an earlier notebook should have made exist?"""
    try:
        if need == "buckets":
            for bucket in (cfg.input_bucket, cfg.output_bucket):
                client("s3").head_bucket(Bucket=bucket)
        elif need == "role":
            client("iam").get_role(RoleName=cfg.role_name)
        elif need == "function":
            client("lambda").get_function_configuration(FunctionName=cfg.function_name)
    except Exception:  # any "not found" (each service words it differently)
        return False
    return True
