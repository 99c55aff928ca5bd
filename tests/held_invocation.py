"""A function held in flight until a test releases it: for races with cleanup.

On AWS an S3-triggered run can still be writing after a notebook stopped waiting, e.g.
while notebook 05 empties the output bucket. To reproduce that on purpose, deploy
:data:`HELD_APP`: its handler announces that it is running (an object ``held/<id>`` in a
control bucket), waits until the test puts ``release/<id>`` there, then writes its late
object into the target bucket. Everything goes through S3 with the function's own role,
so it works as the unprivileged function user and on AWS alike.

Usage::

    held = HeldInvocation(control_bucket="...", target_bucket="...")
    held.start(function_name)           # an asynchronous Invoke
    held.wait_until_running()
    ...                                 # e.g. empty the target bucket
    held.release()
    held.wait_until_written()
"""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field

from helpers.cloud.clients import client
from pipeline_fixtures import wait_until

HELD_APP = '''
import json, time
import boto3

def lambda_handler(event, context):
    s3 = boto3.client("s3")
    hold = event["hold"]
    s3.put_object(Bucket=hold["control"], Key=f"held/{hold['id']}", Body=b"")
    while True:
        try:
            s3.head_object(Bucket=hold["control"], Key=f"release/{hold['id']}")
            break
        except s3.exceptions.ClientError:
            time.sleep(0.1)
    s3.put_object(Bucket=hold["target"], Key=hold["key"], Body=b"written late")
    return {"wrote": hold["key"]}
'''


@dataclass
class HeldInvocation:
    """One held run of :data:`HELD_APP` (see the module's docstring)."""

    control_bucket: str
    target_bucket: str
    key: str = "derivatives/late_write.json"
    hold_id: str = field(default_factory=lambda: uuid.uuid4().hex)

    def start(self, function_name: str) -> None:
        event = {"hold": {"id": self.hold_id, "control": self.control_bucket,
                          "target": self.target_bucket, "key": self.key}}
        client("lambda").invoke(FunctionName=function_name, InvocationType="Event",
                                Payload=json.dumps(event))

    def wait_until_running(self, timeout: float = 60) -> bool:
        return wait_until(lambda: self._exists(self.control_bucket, f"held/{self.hold_id}"),
                          timeout=timeout)

    def release(self) -> None:
        client("s3").put_object(Bucket=self.control_bucket, Key=f"release/{self.hold_id}",
                                Body=b"")

    def wait_until_written(self, timeout: float = 60) -> bool:
        return wait_until(lambda: self._exists(self.target_bucket, self.key), timeout=timeout)

    @staticmethod
    def _exists(bucket: str, key: str) -> bool:
        try:
            client("s3").head_object(Bucket=bucket, Key=key)
            return True
        except client("s3").exceptions.ClientError:
            return False
