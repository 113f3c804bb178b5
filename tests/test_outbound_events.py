"""The device's outbound event log and bus: ids, the API's shape, restarts, wake-ups."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import defer

from connector.outbound.events import OutboundEvent, OutboundEventLog, OutboundEvents


def run_now(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> defer.Deferred[Any]:
    return defer.maybeDeferred(fn, *args, **kwargs)


FACTS = {
    "proxy_message_id": "out_01KNA97WGYC1ATSWR92GZW40CN",
    "internet_message_id": "<m@example.test>",
    "subject": "Daily summary",
    "sender": "alice@example.test",
    "recipients": ["friend@example.net"],
}


def test_ids_increase_across_restarts_and_torn_lines(tmp_path: Path) -> None:
    path = tmp_path / "outbound-events.jsonl"
    log = OutboundEventLog(path, lambda: 1_775_243_544.0)
    first = log.append(status="submitted", **FACTS)
    second = log.append(status="relayed", queue_id="Q1", **FACTS)
    assert (first.event_id, second.event_id) == (1, 2)
    assert path.stat().st_mode & 0o777 == 0o600
    with open(path, "ab") as fh:
        fh.write(b'{"event_id": 3, "status": "deliv')  # a crash mid-line
    again = OutboundEventLog(path, lambda: 0.0)
    assert [e.status for e in again.recent(10)] == ["relayed", "submitted"]
    assert again.last_item_id == FACTS["proxy_message_id"]
    third = again.append(status="delivered", recipient="friend@example.net", **FACTS)
    assert third.event_id == 3
    assert [e.event_id for e in OutboundEventLog(path, lambda: 0.0).after(1)] == [2, 3]


def test_the_api_shape(tmp_path: Path) -> None:
    log = OutboundEventLog(tmp_path / "e.jsonl", lambda: 1_775_243_544.0)
    event = log.append(status="bounced", recipient="x@y.test", detail="550 5.1.1 no", **FACTS)
    assert event.to_dict() == {
        "event_id": 1,
        "direction": "outbound",
        "proxy_message_id": FACTS["proxy_message_id"],
        "internet_message_id": "<m@example.test>",
        "subject": "Daily summary",
        "sender": "alice@example.test",
        "recipients": ["friend@example.net"],
        "status": "bounced",
        "recipient": "x@y.test",
        "detail": "550 5.1.1 no",
        "created_at": "2026-04-03T19:12:24Z",
        "received_at": "2026-04-03T19:12:24Z",
    }
    submitted = log.append(status="submitted", **FACTS).to_dict()
    assert "recipient" not in submitted and "queue_id" not in submitted


def test_an_unknown_status_is_refused(tmp_path: Path) -> None:
    log = OutboundEventLog(tmp_path / "e.jsonl", lambda: 0.0)
    with pytest.raises(ValueError):
        log.append(status="sent", **FACTS)
    with pytest.raises(ValueError):
        OutboundEvent.from_dict({"event_id": 1, "proxy_message_id": "x", "status": "sent"})
    assert log.last_id == 0


def test_compaction_keeps_the_newest(tmp_path: Path) -> None:
    path = tmp_path / "e.jsonl"
    log = OutboundEventLog(path, lambda: 0.0, keep=3)
    for _ in range(10):
        log.append(status="submitted", **FACTS)
    assert len(path.read_bytes().splitlines()) <= 6
    again = OutboundEventLog(path, lambda: 0.0, keep=3)
    assert [e.event_id for e in again.recent(10)] == [10, 9, 8]
    assert again.append(status="submitted", **FACTS).event_id == 11


def test_record_wakes_the_subscribers(tmp_path: Path) -> None:
    events = OutboundEvents(OutboundEventLog(tmp_path / "e.jsonl", lambda: 0.0), run_now)
    woken: list[int] = []
    unsubscribe = events.subscribe(lambda: woken.append(events.log.last_id))
    events.record(status="submitted", **FACTS)
    assert woken == [1]
    unsubscribe()
    events.record(status="relayed", **FACTS)
    assert woken == [1]
