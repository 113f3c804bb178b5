"""Delivery events in the store: what happened to each recipient of each queued message.

`DeliveryEvents.record` writes a batch in one transaction; `query` reads them back newest
first, filtered. Blocking: run in a worker thread. Nothing here decides what an event means.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import insert, select

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


class DeliveryEvents:
    def __init__(self, store: Store) -> None:
        self.store = store

    def record(self, events: list[tuple[str, str, str, str, float]]) -> None:
        """Store (queue_id, recipient, event, detail, unix time) tuples in one transaction."""
        rows = []
        for qid, rcpt, event, detail, at in events:
            if event not in DELIVERY_EVENTS:
                raise ValueError(f"unknown delivery event {event!r}")
            rows.append(
                {
                    "queue_id": qid[:64],
                    "recipient": rcpt.lower()[:320],
                    "event": event,
                    "detail": detail[:2000],
                    "created_at": datetime.fromtimestamp(at, UTC),
                }
            )
        if not rows:
            return
        # One executemany, without an ORM object per row: events come in at the mail rate.
        with self.store._write(control=False) as session:
            session.execute(insert(DeliveryEventRow), rows)

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
