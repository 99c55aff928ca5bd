"""A run still in flight writes into a bucket after cleanup emptied it, as on AWS."""
from __future__ import annotations

import pytest
from botocore.exceptions import ClientError

from helpers.cloud.clients import client
from held_invocation import HELD_APP, HeldInvocation


def test_a_held_run_writes_after_the_bucket_was_emptied(deploy):
    s3 = client("s3")
    for bucket in ("late-write-control", "late-write-target"):
        s3.create_bucket(Bucket=bucket)
    name = deploy({"app.py": HELD_APP}, timeout=60)
    held = HeldInvocation(control_bucket="late-write-control", target_bucket="late-write-target")
    held.start(name)
    assert held.wait_until_running()
    # Cleanup empties the bucket while the run is still in flight ...
    assert s3.list_objects_v2(Bucket="late-write-target").get("KeyCount", 0) == 0
    held.release()
    assert held.wait_until_written()
    # ... and the late write makes deleting the bucket fail, as it would on AWS.
    with pytest.raises(ClientError) as refused:
        s3.delete_bucket(Bucket="late-write-target")
    assert refused.value.response["Error"]["Code"] == "BucketNotEmpty"
