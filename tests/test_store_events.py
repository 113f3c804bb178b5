"""Delivery events in the store, on SQLite and PostgreSQL: what `record` writes reads back."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from edge.store import Store
from edge.store.events import DeliveryEvents
from tests.test_store_support import database_fixture, store_fixture  # noqa: F401


def test_recorded_events_read_back_exactly(store: Store) -> None:
    events = DeliveryEvents(store)
    at = datetime(2026, 12, 1, 7, 38, 3, 12203, tzinfo=UTC).timestamp()
    events.record(
        [
            ("Q1", "Me@Home.Test", "accepted", "", at),
            ("Q1", "me@home.test", "deferred", "451 4.4.0 device offline", at + 1.5),
            ("Q2", "you@home.test", "delivered", "250 2.0.0 OK", at + 2),
        ]
    )
    got = events.query(limit=10)
    assert [(e.queue_id, e.recipient, e.event, e.detail) for e in got] == [
        ("Q2", "you@home.test", "delivered", "250 2.0.0 OK"),
        ("Q1", "me@home.test", "deferred", "451 4.4.0 device offline"),
        ("Q1", "me@home.test", "accepted", ""),
    ]
    assert [e.created_at.timestamp() for e in got] == [at + 2, at + 1.5, at]
    assert all(e.created_at.tzinfo is not None for e in got)
    assert got[-1].to_dict()["created_at"] == "2026-12-01T07:38:03.012203Z"
    assert [e.event for e in events.query(queue_id="Q1", event="deferred")] == ["deferred"]
    assert [e.queue_id for e in events.query(recipient="ME@home.test")] == ["Q1", "Q1"]


def test_long_values_are_cut_and_unknown_events_refused(store: Store) -> None:
    events = DeliveryEvents(store)
    events.record([("Q" * 100, "r@x.test", "bounced", "d" * 5000, 1.0)])
    (got,) = events.query()
    assert len(got.queue_id) == 64 and len(got.detail) == 2000
    with pytest.raises(ValueError, match="unknown delivery event"):
        events.record([("Q1", "r@x.test", "exploded", "", 1.0)])
    assert len(events.query()) == 1
    events.record([])
    assert len(events.query()) == 1


def test_a_large_batch_keeps_its_order_and_text(store: Store) -> None:
    events = DeliveryEvents(store)
    batch = [
        (f"Q{i:04d}", "r@x.test", "deferred", f"451 4.4.1 wait ({i}) é ✓ \"'\\", float(i))
        for i in range(500)
    ]
    events.record(batch)
    got = events.query(limit=1000)
    assert [(e.queue_id, e.detail) for e in reversed(got)] == [(b[0], b[3]) for b in batch]
    assert [e.id for e in reversed(got)] == sorted(e.id for e in got)
