"""The whole pipeline for robustness tests: the real deployment zip, deployed as notebooks 01
and 02 deploy it, on the test session's local cloud; small runs made here; and what a user
can see afterwards (output objects, logs, the status table, the failure queue).

Imported by the ``test_robustness_*`` modules (not a conftest: nothing here is shared by
other tests).
"""
from __future__ import annotations

import gzip
import json
import time
from dataclasses import dataclass, replace
from urllib.parse import quote_plus, unquote_plus

import nibabel as nib
import numpy as np

from fmri_preproc.contract import OUTPUTS, run_from_key
from fmri_preproc.normalize import MNI_KINDS
from helpers.cloud.clients import client
from helpers.cloud.deploy import (FunctionSpec, build_lambda_zip, event_invoke_configuration,
                                  function_configuration, invoke_permission,
                                  notification_configuration)
from helpers.cloud.iam import execution_policy, lambda_trust_policy
from helpers.cloud.logs import invocations, log_events
from helpers.cloud.settings import Settings
from helpers.cloud.status import processing_status
from phantom import moving_blobs

SHAPE = (16, 16, 8)
N_VOLUMES = 20
VOXEL_MM = (3.5, 3.5, 4.0)
#: What a complete result of the deployed function holds (FunctionSpec smooths by default).
OUTPUT_KINDS = ("preproc_bold", "preproc_json", "smoothed_bold", "smoothed_json", "boldref",
                "brain_mask", "confounds", "confounds_json")

_zip_cache: dict[str, bytes] = {}


def lambda_zip() -> bytes:
    """The real deployment zip (``helpers.cloud.deploy.build_lambda_zip``), built once per session."""
    if "zip" not in _zip_cache:
        package = build_lambda_zip()  # the same folder as notebook 02's: built once
        _zip_cache["zip"] = package.path.read_bytes()
        _zip_cache["runtime"] = package.runtime
    return _zip_cache["zip"]


# ------------------------------------------------------------------------------------------
# Small runs with known content


def centred_affine(linear) -> np.ndarray:
    """A voxel-to-world affine with the given 3x3 part and the field of view centred on 0."""
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = -np.asarray(linear) @ ((np.array(SHAPE) - 1) / 2)
    return affine


PLAIN = centred_affine(np.diag(VOXEL_MM))


def phantom_motion(*, n_volumes=N_VOLUMES, seed=0) -> np.ndarray:
    """The true motion of :func:`phantom_run` (engine convention: mm, radians), zero at the
    middle volume (the engine's reference)."""
    rng = np.random.default_rng([seed, 1])
    motion = np.cumsum(rng.normal(0, [0.1, 0.1, 0.1, 0.002, 0.002, 0.002],
                                  size=(n_volumes, 6)), axis=0)
    return motion - motion[n_volumes // 2]


def phantom_run(*, affine=PLAIN, shape=SHAPE, n_volumes=N_VOLUMES, seed=0) -> np.ndarray:
    """A float32 run of smooth blobs in world mm, moving by up to ~1 mm / 1 degree, plus noise."""
    rng = np.random.default_rng(seed)
    centres = rng.uniform(-15, 15, size=(6, 3)) * [1, 1, 0.5]
    motion = phantom_motion(n_volumes=n_volumes, seed=seed)
    data = moving_blobs(shape, affine, motion, centres, head_mm=[24, 24, 14], head_amp=800,
                        blob_sigma_mm=5.0, baseline=200)
    data += rng.normal(0, 5, size=data.shape).astype(np.float32)
    return data


def nifti_bytes(data, affine=PLAIN, *, dtype=None, slope=None, inter=None,
                compress=True) -> bytes:
    """A NIfTI-1 file's bytes (gzip-compressed unless ``compress=False``), TR = 2 s."""
    img = nib.Nifti1Image(data, affine)
    if dtype is not None:
        img.header.set_data_dtype(dtype)
    if slope is not None:
        img.header.set_slope_inter(slope, inter or 0.0)
    if np.ndim(data) == 4:
        img.header.set_zooms((*img.header.get_zooms()[:3], 2.0))
    raw = img.to_bytes()
    return gzip.compress(raw, mtime=0) if compress else raw


def large_run_bytes(*, shape=(64, 64, 32), n_volumes=100) -> bytes:
    """A run of 64x64x32x100 int16 values (105 MB once read as float32) that compresses to
    about 5 MB: a smooth blob, alternating by one unit over time."""
    g = [np.exp(-((np.arange(n) - (n - 1) / 2) / (n / 4)) ** 2) for n in shape]
    volume = (1000 * g[0][:, None, None] * g[1][None, :, None] * g[2][None, None, :])
    data = np.repeat(volume.astype(np.int16)[..., None], n_volumes, axis=3)
    data[..., 1::2] += 1
    affine = np.diag([*VOXEL_MM, 1.0])
    return gzip.compress(nib.Nifti1Image(data, affine).to_bytes(), compresslevel=1, mtime=0)


# ------------------------------------------------------------------------------------------
# A deployed pipeline and what its user sees


def wait_until(predicate, *, timeout: float = 30.0, poll: float = 0.25) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(poll)
    return bool(predicate())


@dataclass
class Pipeline:
    """One deployed workbook: buckets, role, function, trigger, failure queue."""

    cfg: Settings
    queue_url: str

    # --- acting as the user
    def upload(self, key: str, body: bytes) -> str:
        """Upload like notebook 03 does (one PUT); return the ETag."""
        return client("s3").put_object(Bucket=self.cfg.input_bucket, Key=key, Body=body)["ETag"]

    def event(self, key: str, size: int) -> dict:
        """The S3 event for ``key``, as S3 delivers it (key URL-encoded)."""
        return {"Records": [{
            "eventSource": "aws:s3", "eventName": "ObjectCreated:Put",
            "s3": {"bucket": {"name": self.cfg.input_bucket,
                              "arn": f"arn:aws:s3:::{self.cfg.input_bucket}"},
                   "object": {"key": quote_plus(key), "size": size}}}]}

    def invoke(self, event: dict) -> dict:
        """Invoke the function synchronously; its payload (or error payload)."""
        response = client("lambda").invoke(FunctionName=self.cfg.function_name,
                                           Payload=json.dumps(event))
        return json.loads(response["Payload"].read())

    # --- what the user can see
    def run(self, key: str):
        """The contract's run of an input key."""
        return run_from_key(key.removeprefix(self.cfg.input_prefix))

    def out_key(self, key: str, kind: str) -> str:
        """The output key of ``kind`` (a contract output kind, or "done" / "error")."""
        run = self.run(key)
        relative = {"done": run.done, "error": run.error}.get(kind) or run.path(kind)
        return f"{self.cfg.output_prefix}{relative}"

    def outputs(self, key: str) -> dict[str, dict]:
        """Output objects of ``key``'s run (in its folders, func/ and figures/, names
        starting with its entities)."""
        run = self.run(key)
        folders = {run.path(kind).rpartition("/")[0] for kind in OUTPUTS}
        found = {}
        for folder in folders:
            prefix = f"{self.cfg.output_prefix}{folder}/" if folder else self.cfg.output_prefix
            pages = client("s3").get_paginator("list_objects_v2").paginate(
                Bucket=self.cfg.output_bucket, Prefix=f"{prefix}{run.name.stem}_")
            found.update({o["Key"]: o for page in pages for o in page.get("Contents", [])})
        return found

    def expected_outputs(self, key: str, normalised: bool = False) -> set[str]:
        """The keys of a complete result: every output and the completion marker, and the
        MNI-space outputs when the field of view is a brain's (``normalised``)."""
        kinds = (*OUTPUT_KINDS, *(MNI_KINDS if normalised else ()), "done")
        return {self.out_key(key, kind) for kind in kinds}

    def read(self, out_key: str) -> bytes:
        return client("s3").get_object(Bucket=self.cfg.output_bucket, Key=out_key)["Body"].read()

    def record(self, key: str, kind: str) -> dict:
        """``kind`` = "error" or "done": the JSON record next to where the result would be."""
        return json.loads(self.read(self.out_key(key, kind)))

    def runs(self, key: str | None = None) -> list[dict]:
        """Invocations in the function's logs (of ``key`` only, if given)."""
        records = invocations(log_events(self.cfg.log_group))
        return [r for r in records if key is None or r.get("key") == key]

    def log_messages(self) -> list[str]:
        """Every line of the function's log group, oldest first."""
        return [event["message"] for event in log_events(self.cfg.log_group)]

    def handler_lines(self, key: str) -> list[dict]:
        """The handler's own JSON log lines about ``key``."""
        lines = []
        for event in log_events(self.cfg.log_group):
            if event["message"].startswith("{"):
                line = json.loads(event["message"])
                if line.get("key") == key:
                    lines.append(line)
        return lines

    def status(self, keys: list[str]):
        return processing_status(self.cfg, keys)

    def failed_events(self) -> list[dict]:
        """Messages in the on-failure queue (left in place: visibility timeout 0)."""
        sqs = client("sqs")
        seen: dict[str, dict] = {}
        for _ in range(3):  # SQS may return a subset per call
            for m in sqs.receive_message(QueueUrl=self.queue_url, MaxNumberOfMessages=10,
                                         VisibilityTimeout=0).get("Messages", []):
                seen[m["MessageId"]] = json.loads(m["Body"])
        return list(seen.values())

    def failed_keys(self) -> list[str]:
        return [unquote_plus(r["s3"]["object"]["key"]) for e in self.failed_events()
                for r in e["requestPayload"]["Records"]]

    def settle(self, keys: list[str], *, timeout: float = 120) -> None:
        """Wait until no key is pending in the status table and each has a logged run."""
        def finished() -> bool:
            if self.status(keys)["status"].isin(("pending", "retrying")).any():
                return False
            logged = {r.get("key") for r in self.runs()}
            return set(keys) <= logged
        assert wait_until(finished, timeout=timeout, poll=0.5), \
            f"not finished after {timeout} s:\n{self.status(keys)}"


def deploy_pipeline(tag: str, *, spec: FunctionSpec | None = None,
                    route_s3_through: str | None = None, **changes) -> Pipeline:
    """Create buckets and role (notebook 01) and the function, queue and trigger (notebook 02).

    The function is configured exactly as notebook 02 configures it: from a
    :class:`~helpers.cloud.deploy.FunctionSpec` (its defaults, or ``spec``) through the same
    builders. ``changes`` replace spec fields (e.g. ``memory_mb=128`` to provoke a kill);
    ``route_s3_through`` points the function's AWS endpoint at a fault-injecting proxy.
    """
    spec = replace(spec or FunctionSpec(), **changes)
    cfg = Settings(mode="local", workbook_id=f"rb-{tag}")
    s3, iam, lam, sqs = client("s3"), client("iam"), client("lambda"), client("sqs")
    account_id = client("sts").get_caller_identity()["Account"]
    for bucket in (cfg.input_bucket, cfg.output_bucket):
        s3.create_bucket(Bucket=bucket)
    role_arn = iam.create_role(
        RoleName=cfg.role_name, Path=cfg.role_path,
        AssumeRolePolicyDocument=json.dumps(lambda_trust_policy()))["Role"]["Arn"]
    iam.put_role_policy(RoleName=cfg.role_name, PolicyName=cfg.policy_name,
                        PolicyDocument=json.dumps(execution_policy(cfg, account_id)))
    queue_url = sqs.create_queue(QueueName=cfg.failure_queue)["QueueUrl"]
    queue_arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])[
        "Attributes"]["QueueArn"]
    zip_bytes = lambda_zip()
    configuration = function_configuration(cfg, spec, role_arn=role_arn,
                                           runtime=_zip_cache["runtime"])
    if route_s3_through:
        configuration["Environment"]["Variables"]["AWS_ENDPOINT_URL"] = route_s3_through
    function = lam.create_function(Code={"ZipFile": zip_bytes}, **configuration)
    lam.put_function_concurrency(FunctionName=cfg.function_name,
                                 ReservedConcurrentExecutions=spec.max_concurrency)
    lam.put_function_event_invoke_config(**event_invoke_configuration(cfg, spec,
                                                                      queue_arn=queue_arn))
    lam.add_permission(**invoke_permission(cfg, account_id=account_id))
    s3.put_bucket_notification_configuration(
        **notification_configuration(cfg, function_arn=function["FunctionArn"]))
    return Pipeline(cfg, queue_url)


def remove_trigger(pipeline: Pipeline) -> None:
    """Stop new uploads from invoking the function (runs still in flight finish)."""
    client("s3").put_bucket_notification_configuration(
        Bucket=pipeline.cfg.input_bucket, NotificationConfiguration={})


def input_state(pipeline: Pipeline, key: str) -> tuple[str, bytes]:
    """(ETag, bytes) of an input object, to show it was left untouched."""
    obj = client("s3").get_object(Bucket=pipeline.cfg.input_bucket, Key=key)
    return obj["ETag"], obj["Body"].read()


def load_nifti(body: bytes):
    """A nibabel image from a .nii.gz's bytes (data loaded)."""
    raw = gzip.decompress(body)
    img = nib.Nifti1Image.from_bytes(raw)
    return img, np.asarray(img.dataobj, dtype=np.float32)
