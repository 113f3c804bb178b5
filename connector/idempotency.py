"""The device's remembered replies to `Idempotency-Key` requests of its loopback API.

One small SQLite file under the device's data directory (`device/idempotency.sqlite3`), so a
retry after a restart of the device still gets the first reply and sends nothing twice. The
semantics (claim, replay, mismatch, in progress) are `webapi.idempotency`'s, as on the
edge; this is only where the keys live. A claim still open when the process ended belongs to
a request that never answered: it is released when the file is opened, so its retry runs.
Time comes from the injected `now`. This module must never be called on the reactor thread
(every method does file I/O) and never decide anything about HTTP.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path

from edge.store.idempotency import IdempotentReply

__all__ = ["DeviceKeys"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS idempotency_keys (
    scope TEXT NOT NULL,
    key TEXT NOT NULL,
    method TEXT NOT NULL,
    path TEXT NOT NULL,
    body_hash TEXT NOT NULL,
    status INTEGER,
    response TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL,
    PRIMARY KEY (scope, key)
)
"""


class DeviceKeys:
    """Idempotency keys in SQLite; thread-safe (one connection behind a lock)."""

    def __init__(self, path: Path, now: Callable[[], float]) -> None:
        self.path = path
        self.now = now
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        with self._lock:
            self._db.execute(_SCHEMA)
            # Requests that were running when the process ended never answered.
            self._db.execute("DELETE FROM idempotency_keys WHERE status IS NULL")
        path.chmod(0o600)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def claim_idempotency_key(
        self, scope: str, key: str, method: str, path: str, body_hash: str, ttl: float
    ) -> IdempotentReply:
        now = self.now()
        with self._lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                db.execute("DELETE FROM idempotency_keys WHERE created_at < ?", (now - ttl,))
                row = db.execute(
                    "SELECT method, path, body_hash, status, response FROM idempotency_keys"
                    " WHERE scope = ? AND key = ?",
                    (scope, key),
                ).fetchone()
                if row is None:
                    db.execute(
                        "INSERT INTO idempotency_keys"
                        " (scope, key, method, path, body_hash, status, response, created_at)"
                        " VALUES (?, ?, ?, ?, ?, NULL, '', ?)",
                        (scope, key, method, path, body_hash, now),
                    )
                    reply = IdempotentReply("new")
                elif tuple(row[:3]) != (method, path, body_hash):
                    reply = IdempotentReply("mismatch")
                elif row[3] is None:
                    reply = IdempotentReply("in_progress")
                else:
                    reply = IdempotentReply("replay", int(row[3]), str(row[4]))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        return reply

    def finish_idempotency_key(self, scope: str, key: str, status: int, body: str) -> None:
        with self._lock:
            self._db.execute(
                "UPDATE idempotency_keys SET status = ?, response = ? WHERE scope = ? AND key = ?",
                (status, body, scope, key),
            )

    def release_idempotency_key(self, scope: str, key: str) -> None:
        with self._lock:
            self._db.execute(
                "DELETE FROM idempotency_keys WHERE scope = ? AND key = ? AND status IS NULL",
                (scope, key),
            )
