"""Request screening for the loopback API: Host must be a loopback name, a token is required.

`RequestGuard` wraps an application resource so that every request, including requests for
paths no route knows, is screened before any handler runs. This module must never let a
request through without the token, never compare tokens in a way that leaks timing, and
never echo a presented token back.
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Callable
from urllib.parse import unquote_to_bytes

from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, Resource

from webapi.errors import APIError, error_reply

__all__ = ["RequestGuard", "check_host", "check_token", "is_loopback_host"]

_LOOPBACK_HOST = re.compile(rb"(?:127\.0\.0\.1|localhost|\[::1\])(?::[0-9]{1,5})?", re.IGNORECASE)
_BEARER = re.compile(rb"bearer[ \t]+(\S+)[ \t]*", re.IGNORECASE)
_TOKEN_HEADER = b"X-Tailpost-Token"


def is_loopback_host(host: bytes | None) -> bool:
    """True when a Host header value names the loopback interface (any port)."""
    return host is not None and _LOOPBACK_HOST.fullmatch(host) is not None


def check_host(request: IRequest) -> None:
    """Refuse requests whose Host is not a loopback name (DNS rebinding)."""
    if not is_loopback_host(request.getHeader(b"host")):
        raise APIError(
            403,
            "forbidden_host",
            "this API only answers requests addressed to a loopback name",
            "use_http_127_0_0_1",
        )


def _presented_token(request: IRequest) -> bytes | None:
    authorization = request.getHeader(b"authorization")
    if authorization is not None:
        match = _BEARER.fullmatch(authorization)
        return match.group(1) if match else b""
    return request.getHeader(_TOKEN_HEADER)


def check_token(request: IRequest, token: bytes) -> None:
    """Require `Authorization: Bearer <token>` or `X-Tailpost-Token: <token>`."""
    presented = _presented_token(request)
    challenge = {b"WWW-Authenticate": b'Bearer realm="tailpost"'}
    if presented is None:
        raise APIError(
            401,
            "auth_missing_token",
            "this API needs the local API token",
            "add_authorization_bearer_header",
            challenge,
        )
    if not hmac.compare_digest(presented, token):
        raise APIError(
            401, "auth_invalid_token", "the token is not valid", "verify_local_api_token", challenge
        )


class RequestGuard(Resource):
    """Screens every request (Host, token, URL encoding, body size), then hands it on."""

    isLeaf = True

    def __init__(
        self,
        inner: IResource,
        token: bytes,
        max_body: int,
        larger: Callable[[bytes], int | None] | None = None,
    ) -> None:
        """`larger(path)` may name a larger cap for some paths (None: `max_body`)."""
        super().__init__()
        if not token:
            raise ValueError("an empty API token would let anyone in")
        self._inner = inner
        self._token = token
        self._max_body = max_body
        self._larger = larger

    def _limit(self, path: bytes) -> int:
        larger = self._larger(path) if self._larger is not None else None
        return larger if larger is not None else self._max_body

    def _screen(self, request: IRequest) -> None:
        check_host(request)
        check_token(request, self._token)
        try:
            unquote_to_bytes(request.path).decode("utf-8")
        except UnicodeDecodeError:
            raise APIError(
                400, "invalid_url", "the URL is not valid UTF-8", "fix_the_url"
            ) from None
        content = request.content
        if content is not None:
            size = content.seek(0, 2)
            content.seek(0, 0)
            if size > self._limit(request.path):
                raise APIError(
                    413, "payload_too_large", "the request body is too large", "send_less_data"
                )

    def render(self, request: IRequest) -> bytes | int:  # type: ignore[override]
        try:
            self._screen(request)
        except APIError as error:
            return error_reply(request, error)
        return self._inner.render(request)
