"""Delete everything a workbook created, then prove that nothing is left.

The verified sweep, in the safe order:

1. **stop new runs**: the trigger off, and the function's reserved concurrency set to 0
   (retries of failed events, due 1-2 minutes later, and throttled events, kept for up to
   ``MaximumEventAgeInSeconds``, can then no longer start a run);
2. **wait out runs in flight**, at most the function's timeout (after that Lambda has
   ended them): a run still going would write into an emptied bucket, or re-create the log
   group untagged and without retention;
3. the function, *then* its log group; each bucket (every object version first, again
   after a late write); the failure queue; the role's policies, then the role.

Every step runs, whatever happened before it; "already gone" counts as done, and errors
are collected and raised together at the end (:class:`CleanupIncomplete`), so cleanup can
be re-run safely, also after a notebook crashed half-way. Deletions take effect
eventually (SQS up to 60 s, IAM and S3 some seconds): :func:`wait_until_gone` looks again
with backoff before it reports anything left. From a shell::

    python -m helpers.cloud.cleanup                                  # local, the saved id
    python -m helpers.cloud.cleanup --mode aws --yes                 # the saved aws id
    python -m helpers.cloud.cleanup --mode aws --yes --region eu-west-1 --workbook-id fmriwb-1a2b3c4d
    python -m helpers.cloud.cleanup --mode aws --yes --all           # every workbook, by tag and name
"""
from __future__ import annotations

import argparse
import re
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field

from botocore.exceptions import ClientError

from fmri_preproc.contract import input_problem
from helpers.cloud.clients import client
from helpers.cloud.logs import REPORT_RE, log_events
from helpers.cloud.settings import ID_PREFIX, ROLE_PATH, TAG_PROJECT, Settings
from helpers.cloud.status import FINISHED, processing_status
from helpers.cloud.transfer import list_objects

NOT_FOUND = {"NoSuchBucket", "NoSuchEntity", "ResourceNotFoundException", "404",
             "AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist", "NotFound"}
BUCKET_ATTEMPTS = 4       # emptied and deleted again after a late write, this many times
LATE_WRITE_PAUSE_S = 2.0
LEFTOVER_TIMEOUT_S = 120  # SQS takes up to 60 s to delete a queue; IAM and S3 some seconds
LOG_DELAY_S = 10          # CloudWatch Logs shows a line a few seconds after it is written
ID_PATTERN = rf"{re.escape(ID_PREFIX)}[a-z0-9]+"
NAME_PATTERNS = {  # resource names a workbook id makes (settings.Settings): id by name
    "bucket": re.compile(rf"^({ID_PATTERN})-(?:input|output)$"),
    "function": re.compile(rf"^({ID_PATTERN})-preproc$"),
    "queue": re.compile(rf"^({ID_PATTERN})-failed-invocations$"),
    "log group": re.compile(rf"^/aws/lambda/({ID_PATTERN})-preproc$"),
    "role": re.compile(rf"^({ID_PATTERN})-lambda-role$"),
}


class CleanupIncomplete(RuntimeError):
    """Some steps failed; every other step still ran. ``steps``: all lines; ``errors``."""

    def __init__(self, steps: list[str], errors: list[str]) -> None:
        self.steps, self.errors = steps, errors
        super().__init__(
            "Cleanup could not delete everything (every other step ran):\n  "
            + "\n  ".join(errors) + "\nRead each error: AccessDenied means your user may "
            "not delete it (see docs/cleanup_guide.md, the operator policy); BucketNotEmpty "
            "means something keeps writing into it. Fix that, then run the cleanup again: "
            "it is safe to repeat.")


def _gone(exc: ClientError) -> bool:
    return exc.response["Error"]["Code"] in NOT_FOUND


@dataclass
class _Sweep:
    """The lines of a cleanup, and the errors it collected instead of stopping."""

    lines: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def step(self, description: str, call, *args, done: str = "deleted", **kwargs) -> None:
        """Run one step; "already gone" counts as done, any other error is collected."""
        try:
            outcome = call(*args, **kwargs)
            outcome = outcome if isinstance(outcome, str) else done
        except ClientError as exc:
            if not _gone(exc):
                error = exc.response["Error"]
                self.errors.append(f"{description}: {error.get('Code')}: {error.get('Message')}")
                outcome = f"FAILED ({error.get('Code')})"
            else:
                outcome = "already gone"
        self.lines.append(f"{description}: {outcome}")


def stop_new_runs(cfg: Settings, sweep: _Sweep) -> None:
    """Trigger off and reserved concurrency 0: no upload, retry or queued event starts a run."""
    s3, lam = client("s3"), client("lambda")
    sweep.step(f"trigger on {cfg.input_bucket}", s3.put_bucket_notification_configuration,
               Bucket=cfg.input_bucket, NotificationConfiguration={}, done="removed")
    sweep.step(f"new runs of {cfg.function_name}", lam.put_function_concurrency,
               FunctionName=cfg.function_name, ReservedConcurrentExecutions=0,
               done="stopped (reserved concurrency 0)")


def runs_in_flight(cfg: Settings, *, window_s: float) -> list[str]:
    """What may still be running: inputs whose run has not finished and been logged, and
    invocations whose START line (in the last ``window_s`` seconds) has no REPORT yet.

    Returns
    -------
    list of str
        Input keys and ``RequestId``s; empty when nothing can be running.
    """
    events = log_events(cfg.log_group)
    since_ms = (time.time() - window_s) * 1000
    started = {e["message"].split()[2] for e in events
               if e["message"].startswith("START RequestId:") and e["timestamp"] >= since_ms}
    reported = {m["request_id"] for e in events if (m := REPORT_RE.search(e["message"]))}
    try:
        keys = [o["Key"] for o in list_objects(cfg.input_bucket, cfg.input_prefix)
                if input_problem(o["Key"]) is None]
    except ClientError as exc:
        if not _gone(exc):
            raise
        keys = []
    busy = []
    if keys:
        table = processing_status(cfg, keys)
        unfinished = ~table["status"].isin(FINISHED)
        unlogged = (table["status"] != "not processed") & table["max_memory_mb"].isna()
        busy = list(table.loc[unfinished | unlogged, "key"])
    return busy + sorted(started - reported)


def wait_for_runs_in_flight(cfg: Settings, *, timeout_s: float | None = None,
                            poll_s: float = 2.0) -> str:
    """After :func:`stop_new_runs`: wait until no run can still be writing.

    Parameters
    ----------
    timeout_s : float, optional
        Wait at most this long (s); default: the function's timeout plus the logs' delay.
        By then Lambda has ended every run that started before new runs were stopped.
    poll_s : float
        Pause between looks (s).

    Returns
    -------
    str
        One line for the cleanup's report.
    """
    lam = client("lambda")
    try:
        function_timeout = lam.get_function_configuration(FunctionName=cfg.function_name)["Timeout"]
    except ClientError as exc:
        if not _gone(exc):
            raise
        return "runs in flight: none (no function)"
    limit = function_timeout + LOG_DELAY_S if timeout_s is None else timeout_s
    started = time.monotonic()
    while busy := runs_in_flight(cfg, window_s=function_timeout + LOG_DELAY_S):
        waited = time.monotonic() - started
        if waited >= limit:
            return (f"runs in flight: {len(busy)} unfinished after {waited:.0f} s (the "
                    f"function's timeout is {function_timeout} s: a run that started has "
                    "ended; the rest were queued and will not start)")
        if waited < poll_s:  # say once why cleanup pauses
            print(f"waiting for {len(busy)} run(s) in flight, at most {limit:.0f} s "
                  f"(the function's timeout): {', '.join(busy[:3])}{' ...' * (len(busy) > 3)}")
        time.sleep(poll_s)
    waited = time.monotonic() - started
    return "runs in flight: none" + (f" (waited {waited:.0f} s)" if waited >= poll_s else "")


def empty_bucket(bucket: str) -> int:
    """Delete every object version and delete marker (versioning may have been turned on).

    Returns
    -------
    int
        How many versions and markers were deleted.

    Raises
    ------
    ClientError
        Also when ``delete_objects`` answers 200 but lists objects it could not delete
        (e.g. ``AccessDenied`` for an object under Object Lock).
    """
    s3 = client("s3")
    deleted = 0
    for page in s3.get_paginator("list_object_versions").paginate(Bucket=bucket):
        doomed = [{"Key": v["Key"], "VersionId": v["VersionId"]}
                  for v in page.get("Versions", []) + page.get("DeleteMarkers", [])]
        if not doomed:
            continue
        # At most 1,000 per page: the delete_objects limit.
        answer = s3.delete_objects(Bucket=bucket, Delete={"Objects": doomed, "Quiet": True})
        if errors := answer.get("Errors"):
            first = errors[0]
            raise ClientError({"Error": {"Code": first["Code"], "Message": (
                f"{len(errors)} object(s) could not be deleted, e.g. {first['Key']}: "
                f"{first['Message']}")}}, "DeleteObjects")
        deleted += len(doomed)
    return deleted


def delete_bucket(bucket: str, *, attempts: int = BUCKET_ATTEMPTS,
                  pause_s: float = LATE_WRITE_PAUSE_S) -> str:
    """Empty a bucket and delete it; empty it again if a late write got in between.

    Returns
    -------
    str
        "deleted", with how many late writes were removed.
    """
    s3 = client("s3")
    late = 0
    for attempt in range(attempts):
        removed = empty_bucket(bucket)
        late += removed if attempt else 0
        try:
            s3.delete_bucket(Bucket=bucket)
            return "deleted" + (f" (after removing {late} object(s) written late)" if late else "")
        except ClientError as exc:
            if exc.response["Error"]["Code"] != "BucketNotEmpty" or attempt == attempts - 1:
                raise
            time.sleep(pause_s)
    raise AssertionError("unreachable")


def delete_role(role_name: str) -> None:
    """Delete a role's inline and attached policies, then the role."""
    iam = client("iam")
    for name in iam.list_role_policies(RoleName=role_name)["PolicyNames"]:
        iam.delete_role_policy(RoleName=role_name, PolicyName=name)
    for policy in iam.list_attached_role_policies(RoleName=role_name)["AttachedPolicies"]:
        iam.detach_role_policy(RoleName=role_name, PolicyArn=policy["PolicyArn"])
    iam.delete_role(RoleName=role_name)


def _delete_queue(queue_name: str) -> None:
    sqs = client("sqs")
    sqs.delete_queue(QueueUrl=sqs.get_queue_url(QueueName=queue_name)["QueueUrl"])


def delete_all(cfg: Settings, *, wait_timeout_s: float | None = None) -> list[str]:
    """Stop new runs, wait out runs in flight, then delete everything; every step runs.

    Parameters
    ----------
    cfg : Settings
        The workbook to delete.
    wait_timeout_s : float, optional
        Longest wait for runs in flight (default: the function's timeout).

    Returns
    -------
    list of str
        One line per step: what was deleted, or that it was already gone.

    Raises
    ------
    CleanupIncomplete
        After every step ran, if any failed (other than "already gone").
    """
    sweep = _Sweep()
    stop_new_runs(cfg, sweep)
    sweep.lines.append(wait_for_runs_in_flight(cfg, timeout_s=wait_timeout_s))
    lam, logs = client("lambda"), client("logs")
    # The function before its log group: a run that still ends writes its REPORT line,
    # and Lambda would re-create the group (untagged, kept forever).
    sweep.step(f"function {cfg.function_name} (with its concurrency, permissions and "
               "async config)", lam.delete_function, FunctionName=cfg.function_name)
    sweep.step(f"log group {cfg.log_group}", logs.delete_log_group, logGroupName=cfg.log_group)
    for bucket in (cfg.input_bucket, cfg.output_bucket):
        sweep.step(f"bucket {bucket} (every object version first)", delete_bucket, bucket)
    sweep.step(f"queue {cfg.failure_queue}", _delete_queue, cfg.failure_queue)
    if cfg.owns_role:
        sweep.step(f"role {cfg.role_name} and its policies", delete_role, cfg.role_name)
    else:
        sweep.lines.append(f"role {cfg.role_name}: pre-made (existing_role_arn), kept")
    if sweep.errors:
        raise CleanupIncomplete(sweep.lines, sweep.errors)
    return sweep.lines


# ------------------------------------------------------------------------------------------
# Is anything left?


def find_leftovers(cfg: Settings) -> list[dict]:
    """Look every resource up again, by name and by tag; return what still exists.

    Returns
    -------
    list of dict
        ``{"type", "name", "found_by"}`` per resource found; empty when clean.
    """
    found = [{"type": kind, "name": name, "found_by": "name"}
             for kind, name, lookup in _name_lookups(cfg) if _exists(lookup)]
    names = {item["name"] for item in found}
    for arn in _tagged_arns(cfg):
        if not any(name in arn for name in names) and _arn_exists(arn):
            found.append({"type": arn.split(":")[2], "name": arn, "found_by": "tag"})
    return found


def wait_until_gone(cfg: Settings, *, timeout_s: float = LEFTOVER_TIMEOUT_S,
                    first_pause_s: float = 1.0) -> list[dict]:
    """:func:`find_leftovers`, again with backoff while deletions take effect.

    AWS deletes eventually: a deleted queue can be found for up to 60 s, an IAM role or an
    S3 bucket for some seconds. Only what is still there after ``timeout_s`` is left over.

    Returns
    -------
    list of dict
        What is still there (empty when clean), as :func:`find_leftovers` returns it.
    """
    deadline = time.monotonic() + timeout_s
    pause = first_pause_s
    while True:
        left = find_leftovers(cfg)
        if not left or time.monotonic() + pause > deadline:
            return left
        print(f"still being deleted: {', '.join(item['name'] for item in left)}; "
              f"looking again in {pause:.0f} s")
        time.sleep(pause)
        pause = min(pause * 2, 30)


def _name_lookups(cfg: Settings) -> list[tuple]:
    s3, lam, iam, sqs = (client(s) for s in ("s3", "lambda", "iam", "sqs"))
    lookups = [
        ("s3 bucket", cfg.input_bucket, lambda: s3.head_bucket(Bucket=cfg.input_bucket)),
        ("s3 bucket", cfg.output_bucket, lambda: s3.head_bucket(Bucket=cfg.output_bucket)),
        ("lambda function", cfg.function_name,
         lambda: lam.get_function_configuration(FunctionName=cfg.function_name)),
        ("log group", cfg.log_group, lambda: _describe_log_group(cfg.log_group)),
        ("sqs queue", cfg.failure_queue, lambda: sqs.get_queue_url(QueueName=cfg.failure_queue)),
    ]
    if cfg.owns_role:  # a pre-made role is meant to stay
        lookups.append(("iam role", cfg.role_name, lambda: iam.get_role(RoleName=cfg.role_name)))
    return lookups


def _raise_not_found():
    raise ClientError({"Error": {"Code": "ResourceNotFoundException"}}, "DescribeLogGroups")


def _exists(lookup) -> bool:
    try:
        lookup()
    except ClientError as exc:
        if _gone(exc) or exc.response["Error"]["Code"] in {"403", "AccessDenied"}:
            return False
        raise
    return True


def _arn_exists(arn: str) -> bool:
    """Look a tagged resource up in its own service.

    The Resource Groups Tagging API is eventually consistent: on AWS it can list a resource
    for a while after it was deleted. Services this workbook does not use count as existing.
    """
    service, resource = arn.split(":")[2], arn.split(":", 5)[5]
    lookups = {
        "s3": lambda: client("s3").head_bucket(Bucket=resource),
        "lambda": lambda: client("lambda").get_function_configuration(FunctionName=arn),
        "sqs": lambda: client("sqs").get_queue_url(QueueName=resource),
        "logs": lambda: _describe_log_group(resource.removeprefix("log-group:").removesuffix(":*")),
        "iam": lambda: client("iam").get_role(RoleName=resource.split("/")[-1]),
    }
    return service not in lookups or _exists(lookups[service])


def _describe_log_group(name: str) -> None:
    """describe_log_groups matches by prefix: raise "not found" unless ``name`` itself exists."""
    groups = client("logs").describe_log_groups(logGroupNamePrefix=name)["logGroups"]
    if not any(g["logGroupName"] == name for g in groups):
        _raise_not_found()


def _tagged_arns(cfg: Settings) -> list[str]:
    """ARNs that carry this workbook's tag: the Resource Groups Tagging API, plus the roles
    under the workbook's IAM path (IAM is not covered by that API)."""
    tagging = client("resourcegroupstaggingapi")
    pages = tagging.get_paginator("get_resources").paginate(
        TagFilters=[{"Key": "workbook-id", "Values": [cfg.workbook_id]}])
    arns = [r["ResourceARN"] for page in pages for r in page["ResourceTagMappingList"]]
    return arns + [arn for arn, tags in _workbook_roles()
                   if tags.get("workbook-id") == cfg.workbook_id]


def _workbook_roles() -> list[tuple[str, dict]]:
    """(ARN, tags) of every role under :data:`ROLE_PATH`: the workbook's roles only, not
    every role of the account."""
    iam = client("iam")
    roles = []
    for page in iam.get_paginator("list_roles").paginate(PathPrefix=ROLE_PATH):
        for role in page["Roles"]:
            tags = iam.list_role_tags(RoleName=role["RoleName"])["Tags"]
            roles.append((role["Arn"], {t["Key"]: t["Value"] for t in tags}))
    return roles


def find_workbooks() -> dict[str, list[str]]:
    """Every workbook id with something left in this account and region.

    Found by the project tag (Resource Groups Tagging API; roles under :data:`ROLE_PATH`)
    and by name (buckets, functions, queues, log groups the ids name), so a resource that
    never got its tags (a crash between create and tag, a log group Lambda re-created) is
    found too.

    Returns
    -------
    dict
        ``{workbook id: [what was found, ...]}``.
    """
    found: dict[str, list[str]] = defaultdict(list)
    pages = client("resourcegroupstaggingapi").get_paginator("get_resources").paginate(
        TagFilters=[{"Key": "project", "Values": [TAG_PROJECT]}])
    for page in pages:
        for resource in page["ResourceTagMappingList"]:
            tags = {t["Key"]: t["Value"] for t in resource["Tags"]}
            if "workbook-id" in tags:
                found[tags["workbook-id"]].append(resource["ResourceARN"])
    for arn, tags in _workbook_roles():
        name = arn.rsplit("/", 1)[-1]
        workbook = tags.get("workbook-id") or _id_from("role", name)
        if workbook:
            found[workbook].append(arn)
    for kind, name in _named_resources():
        if workbook := _id_from(kind, name):
            if not any(name in item for item in found[workbook]):
                found[workbook].append(f"{kind} {name}")
    return {workbook: sorted(set(items)) for workbook, items in sorted(found.items())}


def _id_from(kind: str, name: str) -> str | None:
    match = NAME_PATTERNS[kind].match(name)
    return match.group(1) if match else None


def _named_resources() -> list[tuple[str, str]]:
    """(kind, name) of the buckets (of this region), functions, queues and log groups whose
    names start with the workbook prefix."""
    s3, lam, sqs, logs = (client(s) for s in ("s3", "lambda", "sqs", "logs"))
    region = s3.meta.region_name
    named = []
    for bucket in s3.list_buckets()["Buckets"]:
        if bucket["Name"].startswith(ID_PREFIX):
            location = s3.get_bucket_location(Bucket=bucket["Name"])["LocationConstraint"]
            if (location or "us-east-1") == region:
                named.append(("bucket", bucket["Name"]))
    for page in lam.get_paginator("list_functions").paginate():
        named += [("function", f["FunctionName"]) for f in page["Functions"]
                  if f["FunctionName"].startswith(ID_PREFIX)]
    for url in sqs.list_queues(QueueNamePrefix=ID_PREFIX).get("QueueUrls", []):
        named.append(("queue", url.rsplit("/", 1)[-1]))
    for page in logs.get_paginator("describe_log_groups").paginate(
            logGroupNamePrefix=f"/aws/lambda/{ID_PREFIX}"):
        named += [("log group", g["logGroupName"]) for g in page["logGroups"]]
    return named


# ------------------------------------------------------------------------------------------
# The command line


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m helpers.cloud.cleanup", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=["local", "aws"], default="local")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--workbook-id", help="default: the id saved by the notebooks")
    which.add_argument("--all", action="store_true",
                       help="every workbook found by its tags and names (listed first)")
    parser.add_argument("--region", help="aws mode: default the saved workbook's region, else "
                                         "boto3's own (AWS_REGION, AWS_DEFAULT_REGION, profile)")
    parser.add_argument("--yes", action="store_true", help="confirm deleting in aws mode")
    parser.add_argument("--wait-timeout", type=float, default=LEFTOVER_TIMEOUT_S,
                        help="how long to look again for resources still being deleted (s)")
    return parser


def _main(argv: list[str]) -> int:
    from helpers import local_cloud
    from helpers.cloud.clients import use_aws
    from helpers.cloud import settings

    args = _parser().parse_args(argv)
    if args.mode == "aws":
        settings.require_aws_opt_in(args.yes, how="pass --yes")
    try:
        saved = settings.load_settings(args.mode, aws_confirm=args.yes, create=False)
    except settings.NoSavedWorkbook as exc:
        if not (args.all or args.workbook_id):
            print(exc, file=sys.stderr)
            return 2
        saved = None
    if saved and args.region and args.region != saved.region:
        saved = None  # the saved workbook lives elsewhere: not the one meant
    if args.mode == "local":
        if local_cloud.find() is None:
            print("The local cloud is not running: nothing to clean up.")
            return 0
        local_cloud.ensure_running()
        region = settings.DEFAULT_REGION
    else:
        region, source = settings.resolve_region(args.region or (saved and saved.region))
        use_aws(region)
        account = client("sts").get_caller_identity()["Account"]
        print(f"AWS account {account}, region {region} ({source})")
    if args.all:
        workbooks = find_workbooks()
        print(f"Found {len(workbooks)} workbook(s):" if workbooks else "Found no workbook.")
        for workbook, items in workbooks.items():
            print(f"  {workbook}: " + "\n    ".join(["", *items]))
        ids = list(workbooks)
    else:
        ids = [args.workbook_id or saved.workbook_id]
    left = {}
    for workbook in ids:
        cfg = saved if saved and saved.workbook_id == workbook else Settings(
            mode=args.mode, workbook_id=workbook, region=region)
        left[workbook] = _clean_one(cfg, args.wait_timeout)
        if saved and workbook == saved.workbook_id and not left[workbook]:
            settings.forget_settings(args.mode)
    remaining = [item for items in left.values() for item in items]
    print(f"left: {remaining}" if remaining else "Nothing is left.")
    return 1 if remaining else 0


def _clean_one(cfg: Settings, wait_timeout_s: float) -> list:
    """Delete one workbook; return what is still there after waiting (or the errors)."""
    print(f"Deleting workbook {cfg.workbook_id}")
    try:
        lines, errors = delete_all(cfg), []
    except CleanupIncomplete as exc:
        lines, errors = exc.steps, exc.errors
    print("\n".join(f"  {line}" for line in lines))
    # After a failed step waiting cannot help: one look, to list what is there.
    return errors + wait_until_gone(cfg, timeout_s=0 if errors else wait_timeout_s)


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
