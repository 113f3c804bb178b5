"""Remembered replies to Idempotency-Key requests of the control API.

A caller's key is claimed before its request runs (so a concurrent retry is told the first
is still in progress), then the reply is stored with it; keys older than the TTL are
forgotten. Time comes from the injected ``now``. This module must never decide HTTP
semantics (``webapi.idempotency`` does) and never hand out ORM rows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete

from edge.store.models import IdempotencyRow, utcnow
from edge.store.store import Store

__all__ = ["IdempotencyStore", "IdempotentReply"]


@dataclass(frozen=True)
class IdempotentReply:
    """The outcome of claiming an Idempotency-Key: ``new``, ``replay`` (with the remembered
    status and body), ``mismatch`` (another request used it) or ``in_progress``."""

    state: str
    status: int = 0
    body: str = ""


class IdempotencyStore:
    """Idempotency keys over the control-plane database."""

    def __init__(self, store: Store, now: Callable[[], datetime] = utcnow) -> None:
        self.store = store
        self.now = now

    def claim_idempotency_key(
        self, scope: str, key: str, method: str, path: str, body_hash: str, ttl: float
    ) -> IdempotentReply:
        """Claim ``key`` for this request, or report what an earlier use of it left."""
        now = self.now()
        with self.store._write() as session:
            session.execute(
                delete(IdempotencyRow).where(
                    IdempotencyRow.created_at < now - timedelta(seconds=ttl)
                )
            )
            row = session.get(IdempotencyRow, (scope, key))
            if row is None:
                session.add(
                    IdempotencyRow(
                        scope=scope,
                        key=key,
                        method=method,
                        path=path,
                        body_hash=body_hash,
                        status=None,
                        response="",
                        created_at=now,
                    )
                )
                return IdempotentReply("new")
            if (row.method, row.path, row.body_hash) != (method, path, body_hash):
                return IdempotentReply("mismatch")
            if row.status is None:
                return IdempotentReply("in_progress")
            return IdempotentReply("replay", row.status, row.response)

    def finish_idempotency_key(self, scope: str, key: str, status: int, body: str) -> None:
        with self.store._write() as session:
            row = session.get(IdempotencyRow, (scope, key))
            if row is not None:
                row.status = status
                row.response = body

    def release_idempotency_key(self, scope: str, key: str) -> None:
        """Forget a claim whose request failed unexpectedly, so it may be retried."""
        with self.store._write() as session:
            session.execute(
                delete(IdempotencyRow).where(
                    IdempotencyRow.scope == scope,
                    IdempotencyRow.key == key,
                    IdempotencyRow.status.is_(None),
                )
            )
