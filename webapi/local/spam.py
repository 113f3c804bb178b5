"""Reporting spam and ham from the device: block rules at the edge and optional Rspamd training.

`EdgeRequester` is the device's client to its edge's `/v1` API (the spam rules live in the
edge's store, and the edge enforces them). `RspamdTrainer` posts a message to Rspamd's
controller (`/learnspam`, `/learnham`) when one is configured. Both are outside the Maildir:
the Maildir moves are done by the caller before these run, so a failing edge or Rspamd never
loses or strands a message; their failures come back as warnings. This module must never
send a message anywhere but the configured Rspamd, and never log a password.
"""

from __future__ import annotations

import json
from typing import Any, Protocol

import treq
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.web.http_headers import Headers

from connector.edgeclient import EdgeClient, EdgeUnavailable
from webapi.errors import APIError

__all__ = ["EdgeJSON", "EdgeRequester", "RspamdTrainer", "edge_call", "rule_body"]

log = Logger(namespace="tailpost.webapi.spam")

RULES_PATH = "/v1/mail/spam-rules"


class EdgeRequester(Protocol):
    """What the local API needs of the edge client: one JSON request, (status, body) back."""

    def request(self, method: str, path: str, json: Any = None) -> Deferred[tuple[int, Any]]: ...


class EdgeJSON:
    """An `EdgeRequester` over the device's `EdgeClient`: JSON in, (status, JSON) out."""

    def __init__(self, client: EdgeClient) -> None:
        self._client = client

    def request(self, method: str, path: str, json: Any = None) -> Deferred[tuple[int, Any]]:
        return defer.ensureDeferred(self._request(method, path, json))

    async def _request(self, method: str, path: str, payload: Any) -> tuple[int, Any]:
        headers = {b"Accept": b"application/json"}
        body = b""
        if payload is not None:
            headers[b"Content-Type"] = b"application/json"
            body = json.dumps(payload).encode("utf-8")
        reply = await self._client.request(
            method.encode("ascii"), path.encode("ascii"), headers=headers, body=body
        )
        if not reply.body.strip():
            return reply.code, {}
        try:
            return reply.code, reply.json()
        except ValueError:
            raise EdgeUnavailable("the edge's reply was not JSON") from None


def edge_unavailable() -> APIError:
    return APIError(
        502, "edge_unavailable", "the edge could not be reached", "retry_later_or_check_the_link"
    )


def no_edge() -> APIError:
    return APIError(
        503,
        "edge_not_configured",
        "this device has no edge link configured",
        "register_the_device_with_its_edge",
    )


async def edge_call(
    edge: EdgeRequester | None, method: str, path: str, body: Any = None
) -> tuple[int, Any]:
    """Call the edge; a transport failure becomes 502, no edge at all 503."""
    if edge is None:
        raise no_edge()
    try:
        status, reply = await edge.request(method, path, json=body)
    except APIError:
        raise
    except Exception as exc:
        log.info(
            "edge request {method} {path} failed: {error}", method=method, path=path, error=exc
        )
        raise edge_unavailable() from None
    return status, reply


def rule_body(kind: str, value: str, source_id: str) -> dict[str, Any]:
    """The `/v1/mail/spam-rules` body blocking `value`: a sender address or a domain (which
    one is `webapi.local.spamblock`'s choice)."""
    if kind not in ("sender", "domain"):
        raise ValueError(f"no such rule kind: {kind!r}")
    return {
        "kind": kind,
        "value": value,
        "action": "reject",
        "note": "reported as spam on the device",
        "source_message_ids": [source_id] if source_id else [],
    }


class RspamdTrainer:
    """Teaches a configured Rspamd that a message is spam or ham."""

    def __init__(self, url: str, password: str = "", timeout: float = 10.0) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError("the Rspamd URL must start with http:// or https://")
        self.url = url.rstrip("/")
        self._password = password
        self._timeout = timeout

    async def learn(self, kind: str, data: bytes) -> bool:
        """True when Rspamd learned it (or knew it already); False on any failure."""
        if kind not in ("spam", "ham"):
            raise ValueError(kind)
        headers = Headers({b"Content-Type": [b"message/rfc822"]})
        if self._password:
            headers.setRawHeaders(b"Password", [self._password.encode("utf-8")])
        try:
            response = await treq.post(
                f"{self.url}/learn{kind}", data=data, headers=headers, timeout=self._timeout
            )
            await treq.content(response)
        except Exception as exc:
            log.info("Rspamd learn{kind} failed: {error}", kind=kind, error=exc)
            return False
        # 208: Rspamd has learned this message already, which is what was asked.
        if response.code in (200, 208):
            return True
        log.info("Rspamd learn{kind} answered {code}", kind=kind, code=response.code)
        return False
