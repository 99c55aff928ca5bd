"""Every moto internal the local cloud relies on, in one place.

moto (pinned in ``pyproject.toml``) emulates AWS's APIs; a few of its private parts are
needed to run the deployed zip without Docker. Each is used here and nowhere else, and
``tests/test_moto_adapter.py`` has one contract test per hook, so a moto upgrade that moves
one fails loudly instead of silently falling back to moto's Docker runner:

- :func:`install_hooks`: ``LambdaFunction._invoke_lambda`` (what ``Invoke`` runs) and
  ``moto.s3.notifications._invoke_awslambda`` (what an S3 event notification runs);
- :class:`FunctionView`: the attributes of moto's ``LambdaFunction`` that the executor
  reads (code, handler, limits, variables, reserved concurrency, async configuration);
- :func:`write_log_events`: the function's CloudWatch log group, as the Lambda service
  writes it;
- :func:`role_credentials`: the execution role's temporary credentials from moto's STS
  backend (moto's ``AssumeRole`` API fails for roles trusted by a *service* principal);
- :func:`send_message`: a message into an SQS queue, as Lambda's on-failure destination;
- :func:`serve`, :data:`HEALTH_PATH`, :data:`IAM_ENFORCEMENT_PATH`: the server and its
  administrative endpoints.
"""
from __future__ import annotations

from typing import Any, Callable

# moto's administrative HTTP endpoints (moto-api): a cheap GET to see the server is up
# (``/moto-api/data.json`` fails once a function exists), and IAM enforcement on/off.
HEALTH_PATH = "/moto-api/config"
IAM_ENFORCEMENT_PATH = "/moto-api/reset-auth"


class FunctionView:
    """Read-only view of one moto ``LambdaFunction``; attributes are read live.

    Parameters
    ----------
    fn : moto.awslambda.models.LambdaFunction
    """

    def __init__(self, fn: Any):
        self._fn = fn

    name = property(lambda self: self._fn.function_name)
    arn = property(lambda self: self._fn.function_arn)
    handler = property(lambda self: self._fn.handler)
    runtime = property(lambda self: self._fn.run_time)
    version = property(lambda self: str(self._fn.version))
    timeout_s = property(lambda self: float(self._fn.timeout))
    memory_mb = property(lambda self: int(self._fn.memory_size))
    ephemeral_mb = property(lambda self: int(self._fn.ephemeral_storage))
    role_arn = property(lambda self: self._fn.role)
    region = property(lambda self: self._fn.region)
    account_id = property(lambda self: self._fn.function_arn.split(":")[4])
    log_group = property(lambda self: self._fn.logs_group_name)
    code_sha256 = property(lambda self: self._fn.code_sha_256)
    code_bytes = property(lambda self: self._fn.code_bytes)

    @property
    def environment(self) -> dict[str, str]:
        """The function's environment variables."""
        return {k: str(v) for k, v in (self._fn.environment_vars or {}).items()}

    @property
    def reserved_concurrency(self) -> int | None:
        """``ReservedConcurrentExecutions``, or None when none is reserved."""
        reserved = self._fn.reserved_concurrency
        return None if reserved in (None, "") else int(reserved)

    @property
    def async_config(self) -> dict:
        """The ``PutFunctionEventInvokeConfig`` settings (empty when none were set)."""
        configs = self._fn.event_invoke_config
        return dict(configs[-1].config) if configs else {}


def install_hooks(on_invoke: Callable[[FunctionView, Any], tuple[str, bool, str]],
                  on_s3_event: Callable[[FunctionView, dict], None]) -> None:
    """Route moto's Lambda runs to our executor (call once, in the server process).

    Parameters
    ----------
    on_invoke : callable
        ``(function, event) -> (payload, errored, logs)`` for the ``Invoke`` API.
    on_s3_event : callable
        ``(function, event)`` for an S3 event notification; must return at once (S3
        invokes asynchronously).
    """
    import moto.s3.notifications as notifications
    from moto.awslambda.models import LambdaFunction
    from moto.awslambda.utils import get_backend

    def invoke_lambda(fn: Any, event: Any = None) -> tuple[str, bool, str]:
        return on_invoke(FunctionView(fn), event)

    def invoke_from_s3(account_id: str, event_body: Any, fn_arn: str, region_name: str) -> None:
        fn = get_backend(account_id, region_name).get_function(fn_arn)
        on_s3_event(FunctionView(fn), event_body)

    LambdaFunction._invoke_lambda = invoke_lambda
    notifications._invoke_awslambda = invoke_from_s3


def write_log_events(function: FunctionView, stream: str, events: list[tuple[int, str]]) -> None:
    """Append ``(timestamp_ms, line)`` events to a new stream of the function's log group."""
    backend = function._fn.logs_backend
    backend.ensure_log_group(function.log_group)
    backend.create_log_stream(function.log_group, stream)
    backend.put_log_events(function.log_group, stream,
                           [{"timestamp": ts, "message": line} for ts, line in events])


def role_credentials(function: FunctionView, session_name: str) -> dict[str, str]:
    """Temporary credentials of the function's execution role, as environment variables."""
    from moto.sts.models import sts_backends

    sts = sts_backends[function.account_id]["aws"]
    role = sts.assume_role(region_name=function.region, role_session_name=session_name,
                           role_arn=function.role_arn, policy="", duration=3600, external_id="")
    return {"AWS_ACCESS_KEY_ID": role.access_key_id,
            "AWS_SECRET_ACCESS_KEY": role.secret_access_key,
            "AWS_SESSION_TOKEN": role.session_token}


def send_message(queue_arn: str, body: str) -> None:
    """Send ``body`` to the SQS queue ``queue_arn`` (``arn:aws:sqs:region:account:name``)."""
    from moto.sqs.models import sqs_backends

    _, _, _, region, account_id, queue_name = queue_arn.split(":", 5)
    sqs_backends[account_id][region].send_message(queue_name, body)


def serve(host: str, port: int, *, cert: str, key: str) -> None:
    """Run moto's server (HTTPS) in this process until it is stopped."""
    from moto import server

    server.main(["--host", host, "--port", str(port), "--ssl-cert", cert, "--ssl-key", key])
