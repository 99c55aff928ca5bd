"""boto3 clients: the one place that makes them.

Notebook code calls ``client("s3")`` in both modes. In local mode, :func:`use_local_cloud`
sets the standard ``AWS_ENDPOINT_URL`` variable and the local cloud's own access key, which
boto3 honours on its own, so no endpoint plumbing leaks into the notebooks and nothing can
reach AWS.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlparse

import boto3
from botocore.config import Config

from helpers.cloud.settings import DEFAULT_REGION

# botocore's standard retry mode: exponential backoff with jitter on throttling and
# transient 5xx errors, the same policy the Lambda handler uses.
RETRY_CONFIG = Config(retries={"max_attempts": 5, "mode": "standard"})

# The local cloud's own access key (random, made by its first start and kept in its private
# state folder), as set by use_local_cloud: so that use_aws can tell it from real keys.
LOCAL_CREDENTIALS: dict[str, str] = {}
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}


def use_local_cloud(endpoint: str, region: str = DEFAULT_REGION, *,
                    ca_bundle: Path | None = None,
                    credentials: Mapping[str, str] | None = None) -> None:
    """Point every boto3 client of this process at the local cloud.

    Parameters
    ----------
    endpoint : str
        The local cloud's URL, e.g. ``https://127.0.0.1:5123``. Must be a loopback address.
    region : str
        Region the emulated resources live in.
    ca_bundle : Path, optional
        The local cloud's self-signed certificate, for HTTPS.
    credentials : mapping
        The local cloud's own access key: ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``
        (``helpers.local_cloud.control.own_key()``); it refuses every other key.
    """
    host = urlparse(endpoint).hostname
    if host not in LOOPBACK_HOSTS:
        raise ValueError(f"the local cloud must be on this machine, not {endpoint!r}")
    if credentials is None:
        raise ValueError("the local cloud takes only its own key: pass "
                         "credentials=helpers.local_cloud.own_key()")
    LOCAL_CREDENTIALS.clear()
    LOCAL_CREDENTIALS.update({name: credentials[name]
                              for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")})
    os.environ.update(LOCAL_CREDENTIALS)
    os.environ.pop("AWS_SESSION_TOKEN", None)  # a key of its own, not a session's
    boto3.DEFAULT_SESSION = None  # its cached credentials may be another local cloud's
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    os.environ["AWS_DEFAULT_REGION"] = region
    if ca_bundle:
        os.environ["AWS_CA_BUNDLE"] = str(ca_bundle)
    # Ignore any ~/.aws profile: local mode must never pick up real credentials.
    os.environ.pop("AWS_PROFILE", None)


def use_aws(region: str) -> None:
    """Undo :func:`use_local_cloud`: the standard credential chain and a real region."""
    os.environ.pop("AWS_ENDPOINT_URL", None)
    if "local_cloud" in os.environ.get("AWS_CA_BUNDLE", ""):
        del os.environ["AWS_CA_BUNDLE"]
    for name, dummy in LOCAL_CREDENTIALS.items():
        if os.environ.get(name) == dummy:
            del os.environ[name]
    os.environ["AWS_DEFAULT_REGION"] = region


def client(service: str, **kwargs: Any) -> Any:
    """A boto3 client from the standard chain, with standard-mode retries.

    Parameters
    ----------
    service : str
        e.g. ``"s3"``, ``"iam"``, ``"lambda"``, ``"logs"``, ``"sqs"``, ``"sts"``.
    **kwargs
        Passed to :func:`boto3.client` (e.g. explicit credentials of a role).
    """
    kwargs.setdefault("config", RETRY_CONFIG)
    return boto3.client(service, **kwargs)
