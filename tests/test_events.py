"""The device's inbound event log and bus, the mail service switch and the edge link state."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock

from connector.events import EventLog, InboundEvents, iso_time
from connector.mailservice import LinkState, MailService, read_enabled
from edge.runtime.service import TCPListener
from maildir import Maildir


def run_now(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> defer.Deferred[Any]:
    return defer.maybeDeferred(fn, *args, **kwargs)


def clock_at(t: float) -> Callable[[], float]:
    return lambda: t


MESSAGE = (
    b"From: Jane <jane@example.com>\r\nTo: agent@example.net, b@example.net\r\n"
    b"Cc: c@example.net\r\nSubject: =?utf-8?q?gr=C3=BC=C3=9Fe?=\r\n"
    b"Message-ID: <m1@example.com>\r\nX-Tailpost-Queue-ID: q123\r\n\r\nsecret body\r\n"
)


# -- the log -----------------------------------------------------------------------------------


def test_ids_increase_and_survive_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    log = EventLog(path, clock_at(1_775_243_544.0))
    first = log.append(mailbox_id="a", mailbox="INBOX", subject="one")
    second = log.append(mailbox_id="b", mailbox="INBOX", subject="two")
    assert first is not None and second is not None
    assert (first.event_id, second.event_id) == (1, 2)
    assert first.received_at == "2026-04-03T19:12:24Z"
    assert path.stat().st_mode & 0o777 == 0o600

    again = EventLog(path, clock_at(0))
    assert [e.subject for e in again.recent(10)] == ["two", "one"]
    third = again.append(mailbox_id="c", mailbox="INBOX")
    assert third is not None and third.event_id == 3
    assert [e.event_id for e in again.after(1)] == [2, 3]
    assert again.after(3) == []


def test_recent_limits_and_order(tmp_path: Path) -> None:
    log = EventLog(tmp_path / "e.jsonl", clock_at(0))
    for i in range(5):
        log.append(mailbox_id=f"m{i}", mailbox="INBOX")
    assert [e.mailbox_id for e in log.recent(2)] == ["m4", "m3"]
    assert log.recent(0) == []
    assert len(log.recent(100)) == 5


def test_a_redelivered_message_is_one_event(tmp_path: Path) -> None:
    log = EventLog(tmp_path / "e.jsonl", clock_at(0))
    assert log.append(mailbox_id="same", mailbox="INBOX") is not None
    assert log.append(mailbox_id="same", mailbox="INBOX") is None
    assert log.last_id == 1


def test_torn_and_foreign_lines_are_skipped(tmp_path: Path) -> None:
    path = tmp_path / "e.jsonl"
    good = {"event_id": 7, "mailbox_id": "x", "mailbox": "INBOX"}
    path.write_bytes(
        b"not json\n" + json.dumps(good).encode() + b'\n{"event_id": -1, "mailbox_id": "y"}\n'
        b'["a list"]\n{"event_id": 8, "mailbox_id": "z", "mail'  # torn by a crash
    )
    log = EventLog(path, clock_at(0))
    assert [e.event_id for e in log.recent(10)] == [7]
    event = log.append(mailbox_id="after", mailbox="INBOX")
    assert event is not None and event.event_id == 8
    assert [e.mailbox_id for e in EventLog(path, clock_at(0)).recent(10)] == ["after", "x"]


def test_compaction_keeps_ids_and_the_newest(tmp_path: Path) -> None:
    path = tmp_path / "e.jsonl"
    log = EventLog(path, clock_at(0), keep=3)
    for i in range(10):
        log.append(mailbox_id=f"m{i}", mailbox="INBOX")
    lines = path.read_bytes().splitlines()
    assert len(lines) <= 6
    reloaded = EventLog(path, clock_at(0), keep=3)
    assert [e.event_id for e in reloaded.recent(10)] == [10, 9, 8]
    assert reloaded.oldest_id() == 8
    event = reloaded.append(mailbox_id="new", mailbox="INBOX")
    assert event is not None and event.event_id == 11


def test_keep_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        EventLog(tmp_path / "e.jsonl", clock_at(0), keep=0)


def test_iso_time() -> None:
    assert iso_time(0) == "1970-01-01T00:00:00Z"


# -- the bus -----------------------------------------------------------------------------------


def test_delivered_records_header_facts_and_wakes(tmp_path: Path) -> None:
    maildir = Maildir(tmp_path / "Maildir", hostname="testhost")
    events = InboundEvents(EventLog(tmp_path / "e.jsonl", clock_at(0)), maildir, run_now)
    woken: list[int] = []
    unsubscribe = events.subscribe(lambda: woken.append(events.log.last_id))
    info = maildir.deliver(MESSAGE)
    results: list[Any] = []
    events.delivered(info).addCallback(results.append)
    event = results[0]
    assert event.mailbox_id == info.id and event.mailbox == "INBOX"
    assert event.subject == "grüße"
    assert event.sender == "Jane <jane@example.com>"
    assert event.recipients == ["agent@example.net", "b@example.net", "c@example.net"]
    assert event.internet_message_id == "<m1@example.com>"
    assert event.proxy_message_id == "q123"
    assert woken == [1]
    assert b"secret body" not in (tmp_path / "e.jsonl").read_bytes()

    events.delivered(info)  # the same message again: no second event, no wake-up
    assert woken == [1]
    unsubscribe()
    events.delivered(maildir.deliver(MESSAGE))
    assert woken == [1] and events.log.last_id == 2


def test_a_message_gone_before_recording_is_still_an_event(tmp_path: Path) -> None:
    maildir = Maildir(tmp_path / "Maildir", hostname="testhost")
    events = InboundEvents(EventLog(tmp_path / "e.jsonl", clock_at(0)), maildir, run_now)
    info = maildir.deliver(MESSAGE)
    maildir.folder("INBOX").remove(info.id)
    events.delivered(info)
    [event] = events.log.recent(1)
    assert event.mailbox_id == info.id and event.subject == ""


def test_a_failing_subscriber_does_not_stop_the_others(tmp_path: Path) -> None:
    maildir = Maildir(tmp_path / "Maildir", hostname="testhost")
    events = InboundEvents(EventLog(tmp_path / "e.jsonl", clock_at(0)), maildir, run_now)
    seen: list[str] = []

    def broken() -> None:
        raise RuntimeError("boom")

    events.subscribe(broken)
    events.subscribe(lambda: seen.append("ok"))
    events.delivered(maildir.deliver(MESSAGE))
    assert seen == ["ok"]


# -- link state --------------------------------------------------------------------------------


def test_link_state() -> None:
    clock = Clock()
    link = LinkState(clock.seconds, online_window=60)
    assert link.status == "unknown" and link.last_seen is None
    clock.advance(100)
    link.touch()
    assert link.status == "online" and link.last_seen == 100
    clock.advance(61)
    assert link.status == "offline"


# -- mail service ------------------------------------------------------------------------------


class _Quiet(Protocol):
    pass


def _connectable(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_disable_stops_listening_and_is_remembered(in_reactor: Any, tmp_path: Path) -> None:
    state = tmp_path / "mail-state.json"
    factory = Factory.forProtocol(_Quiet)
    listener = TCPListener("imap", "127.0.0.1:0", factory, in_reactor.reactor)
    service = MailService(state, [listener], run_now)
    assert service.status == "enabled"
    in_reactor(service.startService)
    port = listener.port
    assert _connectable(port)

    assert in_reactor(service.disable) is True
    assert service.status == "disabled" and not listener.running
    assert not _connectable(port)
    assert read_enabled(state) is False
    assert state.stat().st_mode & 0o777 == 0o600
    assert in_reactor(service.disable) is False  # already disabled

    restarted = MailService(state, [listener], run_now)
    assert restarted.enabled is False
    in_reactor(restarted.startService)
    assert not listener.running  # a disabled device stays disabled after a restart
    assert in_reactor(restarted.enable) is True
    assert listener.running and _connectable(port)  # back on the same port
    assert read_enabled(state) is True
    in_reactor(restarted.stopService)
    assert not listener.running


def test_state_file_damage_means_enabled(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    assert read_enabled(path) is True
    path.write_text("{oops")
    assert read_enabled(path) is True
    path.write_text('{"mail": "disabled"}')
    assert read_enabled(path) is False


def test_switches_run_one_after_another(tmp_path: Path) -> None:
    pending: list[defer.Deferred[Any]] = []

    def slow(fn: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
        fn(*args)
        d: defer.Deferred[Any] = defer.Deferred()
        pending.append(d)
        return d

    service = MailService(tmp_path / "s.json", [], slow)
    first = service.disable()
    second = service.enable()
    assert len(pending) == 1  # the enable waits for the disable to finish
    pending[0].callback(None)
    assert len(pending) == 2
    pending[1].callback(None)
    assert first.called and second.called and service.enabled
