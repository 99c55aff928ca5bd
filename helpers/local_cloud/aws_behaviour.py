"""AWS behaviour the local cloud can show on request, where moto (or speed) forgives.

By default the local cloud is quick: failed asynchronous events are retried after 1 and
2 seconds, deletions take effect at once, the function gets this machine's CPU and an
unlimited ``/tmp``. Each setting below makes it behave as AWS does instead. They are set
from the server's environment at start (``LOCAL_CLOUD_*`` variables, which the local
cloud's clean environment lets through) or changed while it runs through its
authenticated endpoint :data:`ROUTE` (``helpers.local_cloud.set_aws_behaviour``).

Settings
--------
async_time_scale : float or None  (``LOCAL_CLOUD_ASYNC_TIME_SCALE``)
    AWS's clock for asynchronous invocations, scaled: retries after 60 and 120 s times
    the scale, and events older than ``MaximumEventAgeInSeconds`` (default 6 h) times
    the scale are dropped and sent to the on-failure destination with
    ``condition: "EventAgeExceeded"``. 1 is AWS; 0.01 makes a minute last 0.6 s. None
    (default): retries after 1 and 2 s, event age not checked.
deletion_delay_s : float  (``LOCAL_CLOUD_DELETION_DELAY_S``)
    For this long after ``DeleteRole`` / ``DeleteQueue`` the role or queue can still be
    found, as AWS's eventual consistency allows (up to about 60 s). Default 0.
cpu_shares : bool  (``LOCAL_CLOUD_CPU_SHARES``)
    CPU in proportion to memory, as on Lambda (one vCPU at 1,769 MB), from the handler's
    call. Default off: the machine's cores, shared.
ephemeral_storage : bool  (``LOCAL_CLOUD_EPHEMERAL_STORAGE``)
    The function's ``/tmp`` is limited to its ``EphemeralStorage`` (512 MB by default);
    a run that writes more is stopped. Default off.

References
----------
Asynchronous invocation (retries, maximum event age):
https://docs.aws.amazon.com/lambda/latest/dg/invocation-async.html
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

ROUTE = "/local-cloud/aws-behaviour"
ENV_PREFIX = "LOCAL_CLOUD_"
AWS_RETRY_DELAYS_S = (60.0, 120.0)  # AWS: about 1 minute, then 2 minutes
QUICK_RETRY_DELAYS_S = (1.0, 2.0)
AWS_DEFAULT_MAX_EVENT_AGE_S = 6 * 3600
TRUE_WORDS = {"1", "true", "yes", "on"}


@dataclass
class AwsBehaviour:
    """The settings (see the module's docstring); defaults are the quick local cloud."""

    async_time_scale: float | None = None
    deletion_delay_s: float = 0.0
    cpu_shares: bool = False
    ephemeral_storage: bool = False

    def retry_delays_s(self) -> tuple[float, ...]:
        """Waits before the 2nd and 3rd attempt of a failed asynchronous event (s)."""
        if self.async_time_scale is None:
            return QUICK_RETRY_DELAYS_S
        return tuple(d * self.async_time_scale for d in AWS_RETRY_DELAYS_S)

    def max_event_age_s(self, async_config: Mapping[str, Any]) -> float | None:
        """How long an event may wait before it is dropped (s), or None (not checked)."""
        if self.async_time_scale is None:
            return None
        age = async_config.get("MaximumEventAgeInSeconds", AWS_DEFAULT_MAX_EVENT_AGE_S)
        return float(age) * self.async_time_scale

    def update(self, changes: Mapping[str, Any]) -> None:
        """Change some settings; unknown names or wrong values raise ValueError."""
        known = {f.name: f for f in fields(self)}
        unknown = set(changes) - set(known)
        if unknown:
            raise ValueError(f"unknown local cloud settings {sorted(unknown)}; "
                             f"known: {sorted(known)}")
        for name, value in changes.items():
            setattr(self, name, _parse(name, value))



def _parse(name: str, value: Any) -> Any:
    """A setting's value from JSON or an environment variable's text."""
    text = str(value).strip().lower() if value is not None else ""
    if name in ("cpu_shares", "ephemeral_storage"):
        return value if isinstance(value, bool) else text in TRUE_WORDS
    if name == "async_time_scale" and text in ("", "none", "null"):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, not {value!r}") from None
    if number < 0 or (name == "async_time_scale" and number == 0):
        raise ValueError(f"{name} must be positive, not {value!r}")
    return number


def environment_settings(env: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The settings given as ``LOCAL_CLOUD_<NAME>`` variables (for :meth:`AwsBehaviour.update`)."""
    names = (f.name for f in fields(AwsBehaviour))
    return {name: env[ENV_PREFIX + name.upper()] for name in names
            if ENV_PREFIX + name.upper() in env}


CURRENT = AwsBehaviour()  # the server's settings (set by control.serve)


def route(method: str, body: bytes) -> tuple[int, Any]:
    """The endpoint: GET the settings, POST a JSON object of changes (answers the result)."""
    if method == "POST":
        try:
            CURRENT.update(json.loads(body or b"{}"))
        except ValueError as exc:
            return 400, {"error": str(exc)}
    elif method != "GET":
        return 405, {"error": "GET or POST"}
    return 200, asdict(CURRENT)
