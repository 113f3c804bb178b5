"""JSON replies and the headers every reply carries, with nothing but Twisted underneath.

Split from `webapi.errors` so that a listener can answer simple requests (the edge's `/health`
and `/metrics`) without loading a web framework or the API models. This module must never
turn an exception into a reply: that is `webapi.errors.failure_reply`.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.web.iweb import IRequest

__all__ = ["JSON_TYPE", "internal_error_reply", "json_reply", "set_common_headers"]

JSON_TYPE = b"application/json"


def set_common_headers(request: IRequest) -> None:
    """Headers every reply carries: mail is private and never sniffed or cached."""
    request.setHeader(b"X-Content-Type-Options", b"nosniff")
    request.setHeader(b"Cache-Control", b"no-store")
    request.setHeader(b"Referrer-Policy", b"no-referrer")


def json_reply(request: IRequest, body: Any, status: int = 200) -> bytes:
    """Serialise `body` as the JSON reply to `request`."""
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", JSON_TYPE)
    set_common_headers(request)
    return json.dumps(body, ensure_ascii=False).encode("utf-8", "replace")


def internal_error_reply(request: IRequest) -> bytes:
    """The generic 500 reply, in the common error shape; the cause belongs in the log only."""
    body = {
        "error": "internal server error",
        "code": "internal_error",
        "statusCode": 500,
        "action": "retry_later_or_check_the_log",
    }
    return json_reply(request, body, 500)
