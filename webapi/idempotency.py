"""`Idempotency-Key` for POST and PATCH: a retried request gets the first reply again.

Shared by the edge's `/v1` API (keys in its control-plane store) and the device's loopback
API (keys in a small SQLite file of the device): each passes its store, anything with the
three methods of `KeyStore`.

A key is claimed per caller before the request runs; the reply (any status below 500) is
remembered with it for the TTL (24 hours by default) and replayed, with an
`Idempotent-Replayed: true` header, when the same caller sends the same key with the same
method, path and body. The same key with anything else is refused with 409
`idempotency_key_reuse`; while the first request still runs, a retry gets 409
`idempotency_key_in_use`. A request that fails unexpectedly releases its key. Store calls run
through `run_blocking`; this module must never run them on the reactor thread.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from typing import Any, Protocol

from twisted.internet import defer
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest

from webapi.errors import APIError, json_reply

__all__ = ["HEADER", "Idempotency", "KeyStore", "body_digest"]

HEADER = b"Idempotency-Key"
_KEY = re.compile(rb"[\x21-\x7e]{1,255}")
DAY = 24 * 3600.0

Produce = Callable[[], "defer.Deferred[tuple[int, Any]]"]


class Claimed(Protocol):
    """What claiming a key found: `state` is new, replay, mismatch or in_progress."""

    @property
    def state(self) -> str: ...
    @property
    def status(self) -> int: ...
    @property
    def body(self) -> str: ...


class KeyStore(Protocol):
    """Where keys and their replies are kept (`edge.store.idempotency.IdempotencyStore`,
    `connector.idempotency.DeviceKeys`); blocking, called through `run_blocking`."""

    def claim_idempotency_key(
        self, scope: str, key: str, method: str, path: str, body_hash: str, ttl: float
    ) -> Claimed: ...

    def finish_idempotency_key(self, scope: str, key: str, status: int, body: str) -> None: ...

    def release_idempotency_key(self, scope: str, key: str) -> None: ...


def body_digest(body: bytes) -> str:
    """What a request body is compared by (hash large bodies in a worker thread)."""
    return hashlib.sha256(body).hexdigest()


class Idempotency:
    def __init__(
        self,
        store: KeyStore,
        run_blocking: Callable[..., defer.Deferred[Any]],
        ttl: float = DAY,
    ) -> None:
        self.store = store
        self.run = run_blocking
        self.ttl = ttl

    @staticmethod
    def key_of(request: IRequest) -> str | None:
        raw = request.getHeader(HEADER)
        if raw is None:
            return None
        value = raw.encode("latin-1") if isinstance(raw, str) else raw
        if not _KEY.fullmatch(value):
            raise APIError(
                400,
                "invalid_idempotency_key",
                "Idempotency-Key must be 1 to 255 visible ASCII characters",
                "fix_idempotency_key",
            )
        return value.decode("ascii")

    def handle(
        self, request: IRequest, scope: str, body: bytes, produce: Produce
    ) -> defer.Deferred[bytes]:
        """Reply to `request` with `produce()` once per key (see the module docstring)."""
        if self.key_of(request) is None:
            return produce().addCallback(lambda result: json_reply(request, result[1], result[0]))
        return self.handle_digest(request, scope, body_digest(body), produce)

    def handle_digest(
        self, request: IRequest, scope: str, digest: str, produce: Produce
    ) -> defer.Deferred[bytes]:
        """`handle` for a body already hashed with `body_digest`."""
        key = self.key_of(request)
        if key is None:
            return produce().addCallback(lambda result: json_reply(request, result[1], result[0]))
        method = request.method.decode("ascii", "replace")
        path = request.path.decode("utf-8", "replace")[:512]
        d = self.run(self.store.claim_idempotency_key, scope, key, method, path, digest, self.ttl)

        def claimed(reply: Any) -> Any:
            if reply.state == "mismatch":
                raise APIError(
                    409,
                    "idempotency_key_reuse",
                    "this Idempotency-Key was used for a different request",
                    "use_new_idempotency_key",
                )
            if reply.state == "in_progress":
                raise APIError(
                    409,
                    "idempotency_key_in_use",
                    "a request with this Idempotency-Key is still running",
                    "retry_later",
                )
            if reply.state == "replay":
                request.setHeader(b"Idempotent-Replayed", b"true")
                return json_reply(request, json.loads(reply.body), reply.status)
            return produce().addCallbacks(done, failed)

        def done(result: tuple[int, Any]) -> defer.Deferred[bytes]:
            status, payload = result
            stored = self.run(
                self.store.finish_idempotency_key, scope, key, status, json.dumps(payload)
            )
            return stored.addCallback(lambda _: json_reply(request, payload, status))

        def failed(failure: Failure) -> defer.Deferred[Any]:
            error = failure.value
            if isinstance(error, APIError) and error.status < 500:
                stored = self.run(
                    self.store.finish_idempotency_key,
                    scope,
                    key,
                    error.status,
                    json.dumps(error.body()),
                )
            else:
                stored = self.run(self.store.release_idempotency_key, scope, key)
            return stored.addCallback(lambda _: failure)

        return d.addCallback(claimed)
