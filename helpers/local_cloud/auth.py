"""Who may use the local cloud: only requests signed with a key it knows.

On a shared machine every user can reach 127.0.0.1, and moto accepts any credentials. So
every request goes through :class:`AuthMiddleware` first, which recomputes its AWS
Signature Version 4 with botocore's own signer and refuses it (HTTP 403, in the error
format of the service asked) unless it was signed with

- the workbook's own access key (random, kept in a file only its owner can read: see
  :mod:`helpers.local_cloud.control`), or
- a key the local cloud itself issued: an execution role's session credentials (handed
  to the function), or an access key made through its IAM API by an authorised caller.

The administrative endpoints (moto's ``/moto-api/*`` and the local cloud's own routes)
take the workbook's own key only: a function or an IAM user cannot reset the cloud.

References
----------
AWS Signature Version 4: https://docs.aws.amazon.com/IAM/latest/UserGuide/reference_sigv.html
"""
from __future__ import annotations

import hmac
import io
import json
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable, Iterable

from botocore.auth import S3SigV4Auth, SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from werkzeug.datastructures import EnvironHeaders

ALGORITHM = "AWS4-HMAC-SHA256"
MAX_SKEW_S = 15 * 60  # AWS refuses requests signed more than 15 minutes away from its clock
# S3 words some refusals its own way.
S3_CODES = {"InvalidClientTokenId": "InvalidAccessKeyId", "MissingAuthenticationToken":
            "AccessDenied"}
# (secret, session token or None) for an access key id, or None when it is unknown.
SecretLookup = Callable[[str], "tuple[str, str | None] | None"]
# An administrative route: (method, body) -> (HTTP status, JSON-able answer).
AdminRoute = Callable[[str, bytes], "tuple[int, Any]"]


class Denied(Exception):
    """A request the local cloud refuses: an AWS error code and a message."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Signature:
    """The parts of a SigV4 ``Authorization`` header."""

    access_key_id: str
    date: str
    region: str
    service: str
    signed_headers: tuple[str, ...]
    signature: str

    @classmethod
    def parse(cls, header: str | None) -> "Signature":
        if not header:
            raise Denied("MissingAuthenticationToken",
                         "Request is missing Authentication Token (the local cloud takes "
                         "only requests signed with its own key)")
        algorithm, _, rest = header.partition(" ")
        fields = dict(part.strip().split("=", 1) for part in rest.split(",") if "=" in part)
        try:
            key_id, date, region, service, terminal = fields["Credential"].split("/")
            signed = tuple(fields["SignedHeaders"].split(";"))
            signature = fields["Signature"]
        except (KeyError, ValueError):
            raise Denied("IncompleteSignature", "Authorization header is not a valid "
                         f"{ALGORITHM} signature") from None
        if algorithm != ALGORITHM or terminal != "aws4_request":
            raise Denied("IncompleteSignature", f"only {ALGORITHM} signatures are accepted")
        return cls(key_id, date, region, service, signed, signature)


def verify(method: str, url: str, headers: dict[str, str], body: bytes,
           secret: str, sig: Signature, *, now: datetime | None = None) -> None:
    """Raise :class:`Denied` unless ``sig`` is the request's signature made with ``secret``.

    Parameters
    ----------
    method, url, headers, body
        The request as received (``url`` with its raw, still-encoded path and query;
        ``headers``: the signed ones only).
    secret : str
        The secret access key belonging to ``sig.access_key_id``.
    sig : Signature
        What the client sent.
    now : datetime, optional
        The clock to check the request's time against (UTC; default: now).
    """
    stamp = headers.get("x-amz-date", "")
    try:
        signed_at = datetime.strptime(stamp, "%Y%m%dT%H%M%SZ").replace(tzinfo=timezone.utc)
    except ValueError:
        raise Denied("IncompleteSignature", "the request has no valid X-Amz-Date") from None
    skew = abs(((now or datetime.now(timezone.utc)) - signed_at).total_seconds())
    if skew > MAX_SKEW_S or stamp[:8] != sig.date:
        raise Denied("RequestTimeTooSkewed", "The difference between the request time and "
                     "the current time is too large.")
    signer_class = S3SigV4Auth if sig.service == "s3" else SigV4Auth
    signer = signer_class(Credentials(sig.access_key_id, secret), sig.service, sig.region)
    request = AWSRequest(method=method, url=url, headers=headers, data=body)
    request.context["timestamp"] = stamp
    canonical = signer.canonical_request(request)
    expected = signer.signature(signer.string_to_sign(request, canonical), request)
    if not hmac.compare_digest(expected, sig.signature):
        raise Denied("SignatureDoesNotMatch", "The request signature we calculated does not "
                     "match the signature you provided. Check your key and signing method.")


class AuthMiddleware:
    """WSGI middleware: let through only requests signed with a key the local cloud knows.

    Parameters
    ----------
    app : WSGI application
        moto's application.
    owner : dict
        The workbook's own key: ``AWS_ACCESS_KEY_ID`` and ``AWS_SECRET_ACCESS_KEY``.
    issued : callable
        ``access_key_id -> (secret, session token or None) | None`` for keys the local
        cloud issued (:func:`helpers.local_cloud.moto_adapter.issued_secret`).
    admin_prefixes : iterable of str
        Paths that only the owner may use (moto's ``/moto-api/``).
    routes : dict
        The local cloud's own administrative routes: ``{path: (method, body) -> (status,
        answer)}``; owner only.
    """

    def __init__(self, app: Callable, owner: dict[str, str], issued: SecretLookup, *,
                 admin_prefixes: Iterable[str], routes: dict[str, AdminRoute]):
        self._app = app
        self._owner_id = owner["AWS_ACCESS_KEY_ID"]
        self._owner_secret = owner["AWS_SECRET_ACCESS_KEY"]
        self._issued = issued
        self._admin = (*admin_prefixes, *routes)
        self._routes = routes

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        headers = EnvironHeaders(environ)
        path = environ.get("PATH_INFO", "")
        try:
            sig = Signature.parse(headers.get("Authorization"))
            body = self._body(environ, headers, sig)
            self._check(environ, headers, body, sig)
            if path.startswith(self._admin) and sig.access_key_id != self._owner_id:
                raise Denied("AccessDenied", "only the workbook's own key may use the local "
                             "cloud's administrative endpoints")
        except Denied as exc:
            return _refuse(exc, headers, start_response)
        if path in self._routes:
            status, answer = self._routes[path](environ["REQUEST_METHOD"], body)
            payload = json.dumps(answer).encode()
            start_response(f"{status} {'OK' if status == 200 else 'Error'}",
                           [("Content-Type", "application/json"),
                            ("Content-Length", str(len(payload)))])
            return [payload]
        return self._app(environ, start_response)

    def _check(self, environ: dict, headers: EnvironHeaders, body: bytes,
               sig: Signature) -> None:
        token = headers.get("X-Amz-Security-Token")
        if sig.access_key_id == self._owner_id:
            secret, expected_token = self._owner_secret, None
        else:
            known = self._issued(sig.access_key_id)
            if known is None:
                raise Denied("InvalidClientTokenId", "The security token included in the "
                             "request is invalid (an access key the local cloud did not issue)")
            secret, expected_token = known
        if token != expected_token:
            raise Denied("InvalidClientTokenId", "The security token included in the "
                         "request is invalid.")
        raw_uri = environ.get("REQUEST_URI") or environ.get("RAW_URI") or environ["PATH_INFO"]
        url = f"https://{headers.get('Host', '')}{raw_uri}"
        signed = {name: headers.get(name, "") for name in sig.signed_headers}
        verify(environ["REQUEST_METHOD"], url, signed, body, secret, sig)

    @staticmethod
    def _body(environ: dict, headers: EnvironHeaders, sig: Signature) -> bytes:
        """The body when the signature covers it; read once and put back for moto.

        S3 signs a declared hash (``X-Amz-Content-SHA256``, often ``UNSIGNED-PAYLOAD``
        over HTTPS) instead, so large uploads are not read here.
        """
        if "x-amz-content-sha256" in sig.signed_headers:
            return b""
        length = int(headers.get("Content-Length") or 0)
        body = environ["wsgi.input"].read(length) if length else b""
        environ["wsgi.input"] = io.BytesIO(body)
        return body


def _refuse(exc: Denied, headers: EnvironHeaders, start_response: Callable) -> list[bytes]:
    """A 403 in the error format the caller's SDK parses (JSON, S3 XML or query XML)."""
    content_type = headers.get("Content-Type", "")
    scope = headers.get("Authorization", "")
    if "json" in content_type or "/lambda/" in scope:
        body = json.dumps({"__type": exc.code, "message": exc.message}).encode()
        kind = "application/json"
    elif "/s3/" in scope or not scope:
        code = S3_CODES.get(exc.code, exc.code)
        body = (f"<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>{code}</Code>"
                f"<Message>{exc.message}</Message></Error>").encode()
        kind = "application/xml"
    else:
        body = (f"<ErrorResponse><Error><Type>Sender</Type><Code>{exc.code}</Code>"
                f"<Message>{exc.message}</Message></Error></ErrorResponse>").encode()
        kind = "text/xml"
    start_response("403 Forbidden", [("Content-Type", kind), ("x-amzn-ErrorType", exc.code),
                                     ("Content-Length", str(len(body)))])
    return [body]
