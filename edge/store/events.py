"""Delivery events in the store: what happened to each recipient of each queued message.

`DeliveryEvents.record` writes a batch in one transaction; `query` reads them back newest
first, filtered. Blocking: run in a worker thread. Nothing here decides what an event means.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select

from edge.store.models import DELIVERY_EVENTS, DeliveryEventRow
from edge.store.records import StoreRecord
from edge.store.store import Store


@dataclass(frozen=True)
class DeliveryEvent(StoreRecord):
    TIME_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"

    id: int
    queue_id: str
    recipient: str
    event: str
    detail: str
    created_at: datetime


_COLUMNS = "queue_id, recipient, event, detail, created_at"

# A batch goes to the database as one statement over one JSON array of rows. An
# `executemany` would step the driver once per row, and each step gives up the interpreter
# lock and waits to get it back: while the reactor thread is busy, that wait is the switch
# interval (5 ms) per row, so a second's events took seconds to write and cost the reactor a
# forced switch every 5 ms.
_BATCH_INSERT = {
    # SQLite: created_at in SQLAlchemy's text form of the naive UTC time (what its DateTime
    # type writes and reads back), made here.
    "sqlite": (
        f"INSERT INTO {DeliveryEventRow.__tablename__} ({_COLUMNS}) "
        "SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]'), "
        "json_extract(value, '$[2]'), json_extract(value, '$[3]'), json_extract(value, '$[4]') "
        "FROM json_each(?) ORDER BY key"
    ),
    "postgresql": (
        f"INSERT INTO {DeliveryEventRow.__tablename__} ({_COLUMNS}) "
        "SELECT r->>0, r->>1, r->>2, r->>3, to_timestamp((r->>4)::double precision) "
        "FROM json_array_elements(%s::json) WITH ORDINALITY AS rows(r, n) ORDER BY n"
    ),
}


def _sqlite_time(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%d %H:%M:%S.%f")


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
            dialect = connection.dialect.name
            sql = _BATCH_INSERT.get(dialect)
            if sql is None:
                raise ValueError(f"no batch insert of delivery events for {dialect!r}")
            stored: Callable[[float], Any] = _sqlite_time if dialect == "sqlite" else float
            rows = [
                (qid[:64], rcpt.lower()[:320], event, detail[:2000], stored(at))
                for qid, rcpt, event, detail, at in events
            ]
            connection.exec_driver_sql(sql, (json.dumps(rows),))

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
            return [DeliveryEvent.from_row(r) for r in session.scalars(stmt)]
