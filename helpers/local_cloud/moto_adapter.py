"""Every moto internal the local cloud relies on, in one place.

moto (pinned in ``pyproject.toml``) emulates AWS's APIs; a few of its private parts are
needed to run the deployed zip without Docker, to check who is calling, and to show AWS
behaviour that moto leaves out. Each is used here and nowhere else, and
``tests/test_moto_adapter.py`` has one contract test per hook, so a moto upgrade that moves
one fails loudly instead of silently falling back to moto's own behaviour:

- :func:`install_hooks`: ``LambdaFunction._invoke_lambda`` (what a synchronous ``Invoke``
  runs), ``LambdaFunction.invoke`` (to take ``InvocationType=Event`` off the request
  thread) and ``moto.s3.notifications._invoke_awslambda`` (what an S3 notification runs);
- :class:`FunctionView`: the attributes of moto's ``LambdaFunction`` that the executor
  reads (code, handler, limits, ephemeral storage, variables, concurrency, async settings);
- :func:`write_log_events`: the function's CloudWatch log group, as the Lambda service
  writes it;
- :func:`role_credentials`: the execution role's temporary credentials from moto's STS
  backend (moto's ``AssumeRole`` API fails for roles trusted by a *service* principal);
- :func:`issued_secret`: the secret of an access key the local cloud issued (an IAM user's
  key, or a role session's), to check a request's signature;
- :func:`send_message`: a message into an SQS queue, as Lambda's on-failure destination;
- :func:`delay_deletions`: deleted IAM roles and SQS queues stay visible for a while, as
  on AWS (eventual consistency);
- :func:`serve`, :data:`HEALTH_PATH`, :data:`IAM_ENFORCEMENT_PATH`: the server (with our
  middleware in front of moto's application) and its administrative endpoints.
"""
from __future__ import annotations

import json
import os
import threading
from datetime import datetime, timezone
from typing import Any, Callable

# moto's administrative HTTP endpoints (moto-api): a cheap GET to see the server is up
# (``/moto-api/data.json`` fails once a function exists), and IAM enforcement on/off.
HEALTH_PATH = "/moto-api/config"
IAM_ENFORCEMENT_PATH = "/moto-api/reset-auth"
ADMIN_PREFIX = "/moto-api/"


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
                  on_event: Callable[[FunctionView, dict, str], None]) -> None:
    """Route moto's Lambda runs to our executor (call once, in the server process).

    Parameters
    ----------
    on_invoke : callable
        ``(function, event) -> (payload, errored, logs)`` for a synchronous ``Invoke``.
    on_event : callable
        ``(function, event, source)`` for an asynchronous event: ``source`` is ``"s3"``
        (an S3 notification) or ``"invoke"`` (``Invoke`` with ``InvocationType=Event``).
        Must return at once.
    """
    import moto.s3.notifications as notifications
    from moto.awslambda.models import LambdaFunction
    from moto.awslambda.utils import get_backend

    moto_invoke = getattr(LambdaFunction.invoke, "_moto_original", LambdaFunction.invoke)

    def invoke_lambda(fn: Any, event: Any = None) -> tuple[str, bool, str]:
        return on_invoke(FunctionView(fn), event)

    def invoke(fn: Any, body: Any, request_headers: Any, response_headers: Any) -> Any:
        if request_headers.get("x-amz-invocation-type") == "Event":
            on_event(FunctionView(fn), json.loads(body or "{}"), "invoke")
            return b""  # moto answers 202 Accepted
        return moto_invoke(fn, body, request_headers, response_headers)

    def invoke_from_s3(account_id: str, event_body: Any, fn_arn: str, region_name: str) -> None:
        fn = get_backend(account_id, region_name).get_function(fn_arn)
        on_event(FunctionView(fn), event_body, "s3")

    invoke._moto_original = moto_invoke  # type: ignore[attr-defined]
    LambdaFunction._invoke_lambda = invoke_lambda
    LambdaFunction.invoke = invoke
    notifications._invoke_awslambda = invoke_from_s3


def write_log_events(function: FunctionView, stream: str, events: list[tuple[int, str]]) -> None:
    """Append ``(timestamp_ms, line)`` events to a stream of the function's log group (made
    with the group on the first write, as the Lambda service does)."""
    backend = function._fn.logs_backend
    backend.ensure_log_group(function.log_group)
    if stream not in backend.groups[function.log_group].streams:
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


def issued_secret(access_key_id: str) -> tuple[str, str | None] | None:
    """``(secret, session token or None)`` of a key the local cloud issued, else None.

    Two kinds: an active access key of an IAM user (made with ``CreateAccessKey``), and
    an unexpired role session (what :func:`role_credentials` hands the function).
    """
    from moto.iam.models import iam_backends
    from moto.sts.models import sts_backends

    for _, by_partition in list(iam_backends.items()):
        for backend in list(by_partition.values()):
            for user in list(backend.users.values()):
                for key in user.access_keys:
                    if key.access_key_id == access_key_id and key.status == "Active":
                        return key.secret_access_key, None
    now = datetime.now(timezone.utc).replace(tzinfo=None)
    for _, by_partition in list(sts_backends.items()):
        for backend in list(by_partition.values()):
            for role in list(backend.assumed_roles):
                expiration = role.expiration.replace(tzinfo=None)
                if role.access_key_id == access_key_id and expiration > now:
                    return role.secret_access_key, role.session_token
    return None


def send_message(queue_arn: str, body: str) -> None:
    """Send ``body`` to the SQS queue ``queue_arn`` (``arn:aws:sqs:region:account:name``)."""
    from moto.sqs.models import sqs_backends

    _, _, _, region, account_id, queue_name = queue_arn.split(":", 5)
    sqs_backends[account_id][region].send_message(queue_name, body)


def delay_deletions(delay_s: Callable[[], float]) -> None:
    """Keep deleted IAM roles and SQS queues visible for ``delay_s()`` seconds.

    AWS is eventually consistent: for up to about 60 s after ``DeleteRole`` or
    ``DeleteQueue``, ``GetRole``/``GetQueueUrl`` may still find the resource. The deletion
    is checked and done by moto at once (its errors are returned as usual); the object is
    then put back and removed for good after the delay.
    """
    from moto.iam.models import IAMBackend
    from moto.sqs.models import SQSBackend

    def later(store: dict, key: str, item: Any) -> None:
        def forget() -> None:
            if store.get(key) is item:
                del store[key]
        seconds = delay_s()
        if seconds > 0:
            store[key] = item
            timer = threading.Timer(seconds, forget)
            timer.daemon = True
            timer.start()

    moto_delete_role = getattr(IAMBackend.delete_role, "_moto_original", IAMBackend.delete_role)
    moto_delete_queue = getattr(SQSBackend.delete_queue, "_moto_original",
                                SQSBackend.delete_queue)

    def delete_role(backend: Any, role_name: str) -> None:
        role = backend.get_role(role_name)
        moto_delete_role(backend, role_name)
        later(backend.roles, role.id, role)

    def delete_queue(backend: Any, queue_name: str) -> None:
        queue = backend.get_queue(queue_name)
        moto_delete_queue(backend, queue_name)
        later(backend.queues, queue_name, queue)

    delete_role._moto_original = moto_delete_role  # type: ignore[attr-defined]
    delete_queue._moto_original = moto_delete_queue  # type: ignore[attr-defined]
    IAMBackend.delete_role = delete_role
    SQSBackend.delete_queue = delete_queue


def moto_app() -> Callable:
    """moto's WSGI application (every service, dispatched by host and credential scope)."""
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app

    return DomainDispatcherApplication(create_backend_app)


def serve(host: str, port: int, app: Callable, *, cert: str, key: str) -> None:
    """Serve ``app`` (moto's application behind our middleware) over HTTPS until stopped."""
    from moto.moto_server.werkzeug_app import MotoRequestHandler
    from werkzeug.serving import run_simple

    run_simple(host, port, app, threaded=True, ssl_context=(cert, key),
               request_handler=MotoRequestHandler)


def keep_s3_objects_on_disk(buffer_bytes: int = 256 * 1024) -> None:
    """Keep at most ``buffer_bytes`` of each S3 object in the server's memory.

    moto holds each object in a ``SpooledTemporaryFile`` that stays in memory up to
    ``MOTO_S3_DEFAULT_KEY_BUFFER_SIZE`` bytes (about 5 MB by default), so a study of many
    runs would grow the server's memory by the size of its data; beyond the buffer the
    bytes go to an (unlinked) temporary file on disk. Call before the first object is made.
    """
    os.environ["MOTO_S3_DEFAULT_KEY_BUFFER_SIZE"] = str(int(buffer_bytes))
