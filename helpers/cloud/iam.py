"""IAM policy documents for the Lambda's execution role: least privilege, written out.

The role may read objects under the input prefix of the input bucket, write and delete
objects under the output prefix of the output bucket (a newer result replaces an older one's
records: one current state per input), write its own logs, and send failed events to its own
failure queue. Nothing else: no listing, no deleting inputs, no other bucket.
"""
from __future__ import annotations

from helpers.cloud.settings import Settings


def lambda_trust_policy() -> dict:
    """Who may assume the role: only the Lambda service."""
    return {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Principal": {"Service": "lambda.amazonaws.com"},
                       "Action": "sts:AssumeRole"}],
    }


def execution_policy(cfg: Settings, account_id: str) -> dict:
    """The role's inline policy, scoped to this workbook's own resources.

    Parameters
    ----------
    cfg : Settings
        Bucket, prefix, function and queue names.
    account_id : str
        The account the resources live in (from ``sts.get_caller_identity``).
    """
    logs_arn = f"arn:aws:logs:{cfg.region}:{account_id}:log-group:{cfg.log_group}"
    return {
        "Version": "2012-10-17",
        "Statement": [
            {"Sid": "ReadInputPrefixOnly", "Effect": "Allow", "Action": "s3:GetObject",
             "Resource": f"arn:aws:s3:::{cfg.input_bucket}/{cfg.input_prefix}*"},
            {"Sid": "WriteOutputPrefixOnly", "Effect": "Allow",
             "Action": ["s3:PutObject", "s3:DeleteObject"],
             "Resource": f"arn:aws:s3:::{cfg.output_bucket}/{cfg.output_prefix}*"},
            {"Sid": "WriteOwnLogs", "Effect": "Allow",
             "Action": ["logs:CreateLogGroup", "logs:CreateLogStream", "logs:PutLogEvents"],
             "Resource": [logs_arn, f"{logs_arn}:*"]},
            {"Sid": "ReportFailedEvents", "Effect": "Allow", "Action": "sqs:SendMessage",
             "Resource": f"arn:aws:sqs:{cfg.region}:{account_id}:{cfg.failure_queue}"},
        ],
    }
