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


def test_a_run_in_flight_has_its_start_line_in_the_log_already(deploy):
    """As on AWS, START is logged when the run begins and REPORT when it ends, so a run
    in flight shows as a START without a REPORT (what cleanup waits for)."""
    from helpers.cloud.logs import log_events
    from pipeline_fixtures import wait_until

    s3 = client("s3")
    s3.create_bucket(Bucket="start-line-control")
    name = deploy({"app.py": HELD_APP}, timeout=60)
    held = HeldInvocation(control_bucket="start-line-control", target_bucket="start-line-control")
    held.start(name)
    assert held.wait_until_running()
    group = f"/aws/lambda/{name}"
    lines = lambda: [e["message"] for e in log_events(group)]  # noqa: E731
    assert wait_until(lambda: any(m.startswith("START") for m in lines()), timeout=10)
    assert not any(m.startswith("REPORT") for m in lines())
    held.release()
    assert wait_until(lambda: any(m.startswith("REPORT") for m in lines()), timeout=30)
    assert sum(m.startswith("START") for m in lines()) == 1  # not written twice
