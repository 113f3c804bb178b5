"""The HTTP listeners' screen before any resource runs: body size and a single Host header.

Twisted's `Request` stores a whole body before it renders anything, so a cap checked by the
app comes too late: the body was already read (and any token check waited for it).
`BoundedRequest` decides as soon as the headers are in: a `Content-Length` past the cap, or
a second `Host` header, is answered at once (413 or 400, with the API's error body and
`Connection: close`) and nothing of the body is kept; a chunked body is counted as it
arrives and cut off the same way once it grows past the cap. `bounded_site` makes a `Site`
whose requests are screened so. This module must never store more of a body than the cap,
and never let a refused request reach a resource.
"""

from __future__ import annotations

import io
import json
from typing import Any

from twisted.web.resource import IResource
from twisted.web.server import Request, Site

__all__ = ["BoundedRequest", "bounded_site"]

_REASONS = {400: b"Bad Request", 413: b"Content Too Large"}


def _reply(status: int, code: str, message: str, action: str) -> bytes:
    body = json.dumps(
        {"error": message, "code": code, "statusCode": status, "action": action}
    ).encode("utf-8")
    head = [
        b"HTTP/1.1 %d %s" % (status, _REASONS[status]),
        b"Content-Type: application/json",
        b"Content-Length: %d" % len(body),
        b"Connection: close",
        b"X-Content-Type-Options: nosniff",
        b"Cache-Control: no-store",
    ]
    return b"\r\n".join(head) + b"\r\n\r\n" + body


class BoundedRequest(Request):
    """A request refused before its body is read when it is too large or ambiguous."""

    max_body = 64 * 1024

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._received = 0
        self._refused = False

    def _refuse(self, status: int, code: str, message: str, action: str) -> None:
        self._refused = True
        self.content = io.BytesIO()
        # No "100 Continue" after the refusal: the channel looks for Expect after this.
        self.requestHeaders.removeHeader(b"expect")
        transport = self.channel.transport
        if transport is not None:
            transport.write(_reply(status, code, message, action))
        self.channel.loseConnection()

    def gotLength(self, length: int | None) -> None:
        if len(self.requestHeaders.getRawHeaders(b"host") or []) > 1:
            self._refuse(400, "duplicate_host", "send exactly one Host header", "fix_request")
            return
        if length is not None and length > self.max_body:
            self._refuse(
                413, "payload_too_large", "the request body is too large", "send_less_data"
            )
            return
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self._refused:
            return
        self._received += len(data)
        if self._received > self.max_body:
            self._refuse(
                413, "payload_too_large", "the request body is too large", "send_less_data"
            )
            return
        super().handleContentChunk(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self._refused:
            return  # answered already; the connection is closing
        super().requestReceived(command, path, version)


def bounded_site(root: IResource, max_body: int, **kwargs: Any) -> Site:
    """A `Site` over `root` whose requests carry at most `max_body` bytes of body."""

    class Bounded(BoundedRequest):
        pass

    Bounded.max_body = max_body
    site = Site(root, **kwargs)
    site.requestFactory = Bounded
    return site
