"""Delete everything a workbook created, then prove that nothing is left.

Every step tolerates "already gone", so cleanup can be re-run safely, also after a notebook
crashed half-way. From a shell::

    python -m helpers.cloud.cleanup --mode local --workbook-id fmriwb-1a2b3c4d
    python -m helpers.cloud.cleanup --mode aws --workbook-id fmriwb-1a2b3c4d --yes
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace

from botocore.exceptions import ClientError

from helpers.cloud.clients import client
from helpers.cloud.settings import Settings

NOT_FOUND = {"NoSuchBucket", "NoSuchEntity", "ResourceNotFoundException", "404",
             "AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist", "NotFound"}


def _gone(exc: ClientError) -> bool:
    return exc.response["Error"]["Code"] in NOT_FOUND


def _step(description: str, call, *args, **kwargs) -> str:
    """Run one deletion; "already gone" counts as done."""
    try:
        call(*args, **kwargs)
        outcome = "deleted"
    except ClientError as exc:
        if not _gone(exc):
            raise
        outcome = "already gone"
    return f"{description}: {outcome}"


def empty_bucket(bucket: str) -> None:
    """Delete every object version and delete marker (versioning may have been turned on)."""
    s3 = client("s3")
    pages = s3.get_paginator("list_object_versions").paginate(Bucket=bucket)
    for page in pages:
        doomed = [{"Key": v["Key"], "VersionId": v["VersionId"]}
                  for v in page.get("Versions", []) + page.get("DeleteMarkers", [])]
        if doomed:  # at most 1000 per page, the delete_objects limit
            s3.delete_objects(Bucket=bucket, Delete={"Objects": doomed, "Quiet": True})


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


def delete_all(cfg: Settings) -> list[str]:
    """Delete the workbook's trigger, buckets, function, logs, queue and role, in that order.

    Returns
    -------
    list of str
        One line per step: what was deleted, or that it was already gone.
    """
    s3, lam = client("s3"), client("lambda")
    steps = [_step(f"trigger on {cfg.input_bucket}", s3.put_bucket_notification_configuration,
                   Bucket=cfg.input_bucket, NotificationConfiguration={})]
    for bucket in (cfg.input_bucket, cfg.output_bucket):
        steps.append(_step(f"objects in {bucket}", empty_bucket, bucket))
        steps.append(_step(f"bucket {bucket}", s3.delete_bucket, Bucket=bucket))
    steps.append(_step(f"function {cfg.function_name} (with its concurrency, permissions and "
                       "async config)", lam.delete_function, FunctionName=cfg.function_name))
    steps.append(_step(f"log group {cfg.log_group}", client("logs").delete_log_group,
                       logGroupName=cfg.log_group))
    steps.append(_step(f"queue {cfg.failure_queue}", _delete_queue, cfg.failure_queue))
    steps.append(_step(f"role {cfg.role_name} and its policies", delete_role, cfg.role_name))
    return steps


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


def _name_lookups(cfg: Settings) -> list[tuple]:
    s3, lam, iam, sqs = (client(s) for s in ("s3", "lambda", "iam", "sqs"))
    return [
        ("s3 bucket", cfg.input_bucket, lambda: s3.head_bucket(Bucket=cfg.input_bucket)),
        ("s3 bucket", cfg.output_bucket, lambda: s3.head_bucket(Bucket=cfg.output_bucket)),
        ("lambda function", cfg.function_name,
         lambda: lam.get_function_configuration(FunctionName=cfg.function_name)),
        ("log group", cfg.log_group, lambda: _describe_log_group(cfg.log_group)),
        ("sqs queue", cfg.failure_queue, lambda: sqs.get_queue_url(QueueName=cfg.failure_queue)),
        ("iam role", cfg.role_name, lambda: iam.get_role(RoleName=cfg.role_name)),
    ]


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
    """ARNs that carry this workbook's tag: the Resource Groups Tagging API, plus IAM roles
    (IAM is not covered by that API)."""
    tagging = client("resourcegroupstaggingapi")
    pages = tagging.get_paginator("get_resources").paginate(
        TagFilters=[{"Key": "workbook-id", "Values": [cfg.workbook_id]}])
    arns = [r["ResourceARN"] for page in pages for r in page["ResourceTagMappingList"]]
    iam = client("iam")
    for page in iam.get_paginator("list_roles").paginate():
        for role in page["Roles"]:
            tags = iam.list_role_tags(RoleName=role["RoleName"])["Tags"]
            if {"Key": "workbook-id", "Value": cfg.workbook_id} in tags:
                arns.append(role["Arn"])
    return arns


def _main(argv: list[str]) -> int:
    from helpers import local_cloud
    from helpers.cloud.clients import use_aws
    from helpers.cloud.settings import load_settings

    parser = argparse.ArgumentParser(prog="python -m helpers.cloud.cleanup", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=["local", "aws"], default="local")
    parser.add_argument("--workbook-id", help="default: the id saved under build/")
    parser.add_argument("--yes", action="store_true", help="confirm deleting in aws mode")
    args = parser.parse_args(argv)
    cfg = load_settings(args.mode, aws_confirm=args.yes)
    if args.workbook_id:
        cfg = replace(cfg, workbook_id=args.workbook_id)
    if args.mode == "local":
        if local_cloud.find() is None:
            print("The local cloud is not running: nothing to clean up.")
            return 0
        local_cloud.ensure_running()
    else:
        use_aws(cfg.region)
        account = client("sts").get_caller_identity()["Account"]
        print(f"Deleting workbook {cfg.workbook_id} in AWS account {account}, {cfg.region}")
    print("\n".join(delete_all(cfg)))
    leftovers = find_leftovers(cfg)
    print(f"left: {leftovers}" if leftovers else "Nothing is left.")
    return 1 if leftovers else 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
