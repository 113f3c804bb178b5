"""`Idempotency-Key` for POST and PATCH: a retried request gets the first reply again.

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
from typing import Any

from twisted.internet import defer
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest

from edge.store.idempotency import IdempotencyStore
from webapi.errors import APIError, json_reply

__all__ = ["HEADER", "Idempotency"]

HEADER = b"Idempotency-Key"
_KEY = re.compile(rb"[\x21-\x7e]{1,255}")
DAY = 24 * 3600.0

Produce = Callable[[], "defer.Deferred[tuple[int, Any]]"]


class Idempotency:
    def __init__(
        self,
        store: IdempotencyStore,
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
        key = self.key_of(request)
        if key is None:
            return produce().addCallback(lambda result: json_reply(request, result[1], result[0]))
        method = request.method.decode("ascii", "replace")
        path = request.path.decode("utf-8", "replace")[:512]
        digest = hashlib.sha256(body).hexdigest()
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
