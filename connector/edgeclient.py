"""The device's HTTP client of its edge's `/v1` API (treq), with the device key.

`EdgeClient` registers the device, polls its registration, and forwards `/v1` requests for
the local pass-through, adding `Authorization: Bearer <device key>`. The key comes from a
callable so a key received later is used at once. A transport failure becomes
`EdgeUnavailable`; the edge's own replies (errors included) are returned as they are. This
module must never log the key or send it anywhere but the configured edge URL.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import treq
from treq.client import HTTPClient
from twisted.internet import defer

__all__ = ["EdgeClient", "EdgeReply", "EdgeUnavailable"]

MAX_REPLY = 4 * 1024 * 1024
PASSED_HEADERS = (b"content-type", b"idempotency-key", b"accept")
RETURNED_HEADERS = (b"content-type", b"idempotent-replayed", b"www-authenticate", b"allow")


def _default_client(reactor: Any) -> Any:
    from twisted.web.client import Agent, HTTPConnectionPool

    pool = HTTPConnectionPool(reactor, persistent=False)
    return HTTPClient(Agent(reactor, pool=pool))


class EdgeUnavailable(Exception):
    """The edge could not be reached, or its reply was unusable."""


@dataclass(frozen=True)
class EdgeReply:
    code: int
    headers: dict[bytes, bytes]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class EdgeClient:
    def __init__(
        self,
        base_url: str,
        key: Callable[[], str | None],
        *,
        http: Any = None,
        reactor: Any = None,
        timeout: float = 30.0,
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ValueError("the edge URL must start with http:// or https://")
        self.base_url = base_url.rstrip("/")
        self._key = key
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self._reactor = reactor
        self._http = http if http is not None else _default_client(reactor)
        self.timeout = timeout

    async def request(
        self,
        method: bytes,
        path: bytes,
        *,
        headers: dict[bytes, bytes] | None = None,
        body: bytes = b"",
        authenticated: bool = True,
    ) -> EdgeReply:
        """Send one request to the edge; ``path`` includes the query string."""
        sent: dict[bytes, list[bytes]] = {k: [v] for k, v in (headers or {}).items()}
        if authenticated:
            key = self._key()
            if key:
                sent[b"Authorization"] = [b"Bearer " + key.encode("ascii")]
        url = self.base_url.encode("ascii") + path
        try:
            response = await self._http.request(
                method.decode("ascii"),
                url.decode("ascii"),
                headers=sent,
                data=body or None,
                timeout=self.timeout,
                reactor=self._reactor,
            )
            content = await treq.content(response)
        except Exception as exc:  # connection refused, timeout, TLS: the edge is unreachable
            raise EdgeUnavailable(f"the edge at {self.base_url} did not answer: {exc}") from exc
        if len(content) > MAX_REPLY:
            raise EdgeUnavailable("the edge's reply was too large")
        returned = {}
        for name in RETURNED_HEADERS:
            values = response.headers.getRawHeaders(name)
            if values:
                returned[name] = (
                    values[0].encode("latin-1") if isinstance(values[0], str) else values[0]
                )
        return EdgeReply(response.code, returned, content)

    async def _json(self, path: bytes, payload: dict[str, Any]) -> EdgeReply:
        return await self.request(
            b"POST",
            path,
            headers={b"Content-Type": b"application/json"},
            body=json.dumps(payload).encode("utf-8"),
            authenticated=False,
        )

    def register(
        self, name: str, hostname: str, connector_smtp_addr: str, tls_pin: str | None = None
    ) -> defer.Deferred[EdgeReply]:
        """`tls_pin`: the pin of the connector's TLS key, for the edge to pin at approval."""
        body = {"name": name, "hostname": hostname, "connector_smtp_addr": connector_smtp_addr}
        if tls_pin:
            body["connector_tls_pin"] = tls_pin
        return defer.ensureDeferred(self._json(b"/v1/devices/register", body))

    def registration_status(
        self, registration_id: str, poll_token: str
    ) -> defer.Deferred[EdgeReply]:
        body = {"registration_id": registration_id, "poll_token": poll_token}
        return defer.ensureDeferred(self._json(b"/v1/devices/register/status", body))

    def forward(
        self, method: bytes, path: bytes, headers: dict[bytes, bytes], body: bytes
    ) -> defer.Deferred[EdgeReply]:
        """A local `/v1` request, passed on with the device key instead of the local token."""
        kept = {k: v for k, v in headers.items() if k.lower() in PASSED_HEADERS}
        return defer.ensureDeferred(self.request(method, path, headers=kept, body=body))
