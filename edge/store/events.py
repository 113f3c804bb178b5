"""Delivery events in the store: what happened to each recipient of each queued message.

`DeliveryEvents.record` writes a batch in one transaction; `query` reads them back newest
first, filtered. Blocking: run in a worker thread. Nothing here decides what an event means.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select

from edge.store.models import DELIVERY_EVENTS, DeliveryEventRow
from edge.store.store import Store


@dataclass(frozen=True)
class DeliveryEvent:
    id: int
    queue_id: str
    recipient: str
    event: str
    detail: str
    created_at: datetime

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "queue_id": self.queue_id,
            "recipient": self.recipient,
            "event": self.event,
            "detail": self.detail,
            "created_at": self.created_at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        }


_COLUMNS = ("queue_id", "recipient", "event", "detail", "created_at")


def _insert_sql(paramstyle: str) -> str:
    marks = {"qmark": "?", "format": "%s", "pyformat": "%s", "numeric": ":{n}"}
    mark = marks.get(paramstyle)
    if mark is None:
        raise ValueError(f"no insert for the driver's parameter style {paramstyle!r}")
    values = ", ".join(mark.format(n=i + 1) for i in range(len(_COLUMNS)))
    return f"INSERT INTO {DeliveryEventRow.__tablename__} ({', '.join(_COLUMNS)}) VALUES ({values})"


def _stored_time(dialect: str) -> Any:
    """How `created_at` goes to the driver: SQLite keeps SQLAlchemy's text form of a naive
    UTC time (what its DateTime type writes and reads back); other drivers take datetimes."""
    if dialect == "sqlite":
        return lambda at: datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%d %H:%M:%S.%f")
    return lambda at: datetime.fromtimestamp(at, UTC)


class DeliveryEvents:
    def __init__(self, store: Store) -> None:
        self.store = store

    def record(self, events: list[tuple[str, str, str, str, float]]) -> None:
        """Store (queue_id, recipient, event, detail, unix time) tuples in one transaction."""
        for _qid, _rcpt, event, _detail, _at in events:
            if event not in DELIVERY_EVENTS:
                raise ValueError(f"unknown delivery event {event!r}")
        if not events:
            return
        with self.store._write(control=False) as session:
            connection = session.connection()
            stored = _stored_time(connection.dialect.name)
            rows = [
                (qid[:64], rcpt.lower()[:320], event, detail[:2000], stored(at))
                for qid, rcpt, event, detail, at in events
            ]
            # Events come in at the mail rate, and SQLAlchemy's per-row parameter handling
            # costs more than the insert itself (and holds the interpreter lock the reactor
            # needs): one executemany straight to the driver.
            connection.exec_driver_sql(_insert_sql(connection.dialect.paramstyle), rows)

    def query(
        self,
        *,
        queue_id: str | None = None,
        recipient: str | None = None,
        event: str | None = None,
        limit: int = 100,
    ) -> list[DeliveryEvent]:
        stmt = select(DeliveryEventRow).order_by(DeliveryEventRow.id.desc()).limit(limit)
        if queue_id:
            stmt = stmt.where(DeliveryEventRow.queue_id == queue_id)
        if recipient:
            stmt = stmt.where(DeliveryEventRow.recipient == recipient.lower())
        if event:
            stmt = stmt.where(DeliveryEventRow.event == event)
        with self.store._read() as session:
            return [
                DeliveryEvent(r.id, r.queue_id, r.recipient, r.event, r.detail, r.created_at)
                for r in session.scalars(stmt)
            ]
