"""The outbound queue relaying to a real SMTP server on loopback standing in for the edge.

The stand-in is the edge's own SMTP server with a test policy (tests/edgerelay.py): AUTH
PLAIN as the device, STARTTLS, a queue id in its 250. The queue's retry timer runs on a
`Clock` the tests advance; the network and the thread pool are the reactor's.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import reactor, threads
from twisted.internet.task import Clock
from twisted.internet.threads import blockingCallFromThread

from connector.outbound.events import OutboundEventLog, OutboundEvents
from connector.outbound.outbox import RecipientState
from connector.outbound.queue import OutboundQueue
from connector.outbound.relay import EdgeRelay, relay_address
from maildir import Maildir
from tests.edgerelay import DEVICE_ID, DEVICE_KEY, EdgeRelayStandIn, within

ALICE = "alice@example.test"
BOB = "bob@example.net"
CAROL = "carol@example.org"


def message(subject: str) -> bytes:
    return (
        f"From: Alice <{ALICE}>\r\nTo: {BOB}\r\nSubject: {subject}\r\n\r\n"
        f"Hello, {subject}.\r\n.leading dot\r\n"
    ).encode()


def wait_for(check: Callable[[], bool], what: str, limit: float = 20.0) -> None:
    """Wait until `check()` holds (it runs in the reactor thread); fail after `limit`."""
    end = time.monotonic() + limit
    while time.monotonic() < end:
        core: Any = reactor
        if blockingCallFromThread(core, check):
            return
        time.sleep(0.02)
    raise AssertionError(f"never happened: {what}")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class Device:
    def __init__(
        self,
        root: Path,
        reactor: Any,
        relay_at: str,
        *,
        clock: Clock | None = None,
        creds: tuple[str, str] | None = (DEVICE_ID, DEVICE_KEY),
        plaintext: tuple[Any, ...] = (),
    ) -> None:
        self.clock = clock or Clock()
        self.maildir = Maildir(root / "mail", hostname="device.test")
        self.log = OutboundEventLog(root / "device" / "outbound-events.jsonl", time.time)
        self.events = OutboundEvents(self.log, threads.deferToThread)
        self.relay = EdgeRelay(
            reactor,
            "device.test",
            lambda: relay_at,
            lambda: creds,
            plaintext_networks=plaintext,
            clock=self.clock,
        )
        self.queue = OutboundQueue(
            root / "device" / "outbound",
            self.maildir,
            self.events,
            clock=self.clock,
            run_blocking=threads.deferToThread,
            hostname="device.test",
            relay=self.relay,
        )
        self.dir = root / "device" / "outbound" / "queue"

    def files(self) -> list[str]:
        return sorted(p.name for p in self.dir.iterdir())

    def statuses(self) -> list[tuple[str, str | None]]:
        return [(e.status, e.recipient) for e in reversed(self.log.recent(100))]


@pytest.fixture
def edge(in_reactor: Any, tmp_path: Path) -> Any:
    stand_in = EdgeRelayStandIn(tls_dir=tmp_path / "edge-tls")
    yield stand_in
    within(in_reactor, stand_in.stop)


def start(in_reactor: Any, dev: Device) -> None:
    in_reactor(dev.queue.startService)


def stop(in_reactor: Any, dev: Device) -> None:
    within(in_reactor, dev.queue.stopService)


@contextmanager
def running(in_reactor: Any, tmp_path: Path, edge: EdgeRelayStandIn, **kw: Any) -> Iterator[Device]:
    """A started device (`kw` for `Device`) whose relay is `edge`, listening from now on;
    stopped after."""
    port = in_reactor(edge.listen, in_reactor.reactor)
    dev = in_reactor(Device, tmp_path, in_reactor.reactor, f"127.0.0.1:{port}", **kw)
    start(in_reactor, dev)
    try:
        yield dev
    finally:
        stop(in_reactor, dev)


def test_relay_address_defaults_to_the_edge_host_on_2526() -> None:
    assert relay_address("", "https://edge.example.net:8025/") == "edge.example.net:2526"
    assert relay_address("", "http://[fd7a:115c:a1e0::1]:8025") == "[fd7a:115c:a1e0::1]:2526"
    assert relay_address("10.0.0.1:25", "http://edge.example.net") == "10.0.0.1:25"
    assert relay_address("", "") == ""


def test_messages_go_in_order_with_auth_and_starttls_and_leave_the_queue(
    in_reactor: Any, tmp_path: Path, edge: EdgeRelayStandIn
) -> None:
    port = in_reactor(edge.listen, in_reactor.reactor)
    dev = in_reactor(Device, tmp_path, in_reactor.reactor, f"127.0.0.1:{port}")
    items = [
        in_reactor(dev.queue.submit, ALICE, [BOB], message(f"m{i}"), source="api") for i in range(3)
    ]
    start(in_reactor, dev)
    within(in_reactor, dev.queue.when_drained)
    try:
        assert [t.data.split(b"Subject: ")[1][:2] for t in edge.taken] == [b"m0", b"m1", b"m2"]
        assert all(t.sender == ALICE and t.recipients == [BOB] for t in edge.taken)
        # STARTTLS when offered, even on loopback; AUTH PLAIN as the device, once per session.
        assert all(t.tls for t in edge.taken)
        assert edge.logins == [(DEVICE_ID, True)]
        # Sent exactly as queued (the leading dot survives the stuffing).
        queued = dev.maildir.folder("Sent").read(dev.maildir.folder("Sent").messages()[0].id)
        assert edge.taken[0].data == queued
        # Relayed: the message files are gone; the states wait for the edge's outcomes.
        assert dev.files() == sorted(f"{i.id}.state" for i in items)
        state = json.loads((dev.dir / f"{items[0].id}.state").read_text())
        assert state["recipients"][BOB] == {"status": "relayed", "queue_id": "Q1", "detail": ""}
        assert dev.queue.awaiting() == {
            f"Q{n + 1}": [(item.id, BOB)] for n, item in enumerate(items)
        }
        wait_for(lambda: len(dev.log.recent(100)) == 6, "six events")
        relayed = [e for e in reversed(dev.log.recent(100)) if e.status == "relayed"]
        assert [(e.proxy_message_id, e.queue_id) for e in relayed] == [
            (i.id, f"Q{n + 1}") for n, i in enumerate(items)
        ]
    finally:
        stop(in_reactor, dev)


def test_edge_down_then_up_every_message_goes_once_in_order(
    in_reactor: Any, tmp_path: Path, edge: EdgeRelayStandIn
) -> None:
    port = free_port()
    dev = in_reactor(Device, tmp_path, in_reactor.reactor, f"127.0.0.1:{port}")
    start(in_reactor, dev)
    try:
        items = [
            in_reactor(dev.queue.submit, ALICE, [BOB], message(f"m{i}"), source="api")
            for i in range(4)
        ]
        wait_for(lambda: dev.queue.attempts >= 1, "a first attempt")
        # Down: the head waits for its retry; nothing left the queue.
        wait_for(lambda: bool(dev.clock.getDelayedCalls()), "a retry timer")
        assert dev.queue.queued == [i.id for i in items]
        in_reactor(dev.clock.advance, 5)
        wait_for(lambda: dev.queue.attempts >= 2, "a second attempt")
        wait_for(lambda: bool(dev.clock.getDelayedCalls()), "the next retry timer")
        (retry,) = dev.clock.getDelayedCalls()
        assert retry.getTime() - dev.clock.seconds() == 10  # the delay doubled
        # Up again.
        in_reactor(edge.listen, in_reactor.reactor, "127.0.0.1", port)
        in_reactor(dev.clock.advance, 10)
        within(in_reactor, dev.queue.when_drained)
        subjects = [t.data.split(b"Subject: ")[1][:2] for t in edge.taken]
        assert subjects == [b"m0", b"m1", b"m2", b"m3"]
        assert dev.queue.queued == []
    finally:
        stop(in_reactor, dev)


def test_a_restart_relays_what_was_queued_in_order(
    in_reactor: Any, tmp_path: Path, edge: EdgeRelayStandIn
) -> None:
    port = free_port()
    first = in_reactor(Device, tmp_path, in_reactor.reactor, f"127.0.0.1:{port}")
    items = [
        in_reactor(first.queue.submit, ALICE, [BOB, CAROL], message(f"m{i}"), source="api")
        for i in range(3)
    ]
    # The process ends before anything was relayed; the next one finds the edge up.
    in_reactor(edge.listen, in_reactor.reactor, "127.0.0.1", port)
    again = in_reactor(Device, tmp_path, in_reactor.reactor, f"127.0.0.1:{port}")
    assert again.queue.queued == [i.id for i in items]
    start(in_reactor, again)
    try:
        within(in_reactor, again.queue.when_drained)
        assert [t.data.split(b"Subject: ")[1][:2] for t in edge.taken] == [b"m0", b"m1", b"m2"]
        assert all(t.recipients == [BOB, CAROL] for t in edge.taken)
    finally:
        stop(in_reactor, again)


def test_a_message_whose_state_says_relayed_is_never_sent_again(
    in_reactor: Any, tmp_path: Path, edge: EdgeRelayStandIn
) -> None:
    """A crash after the relayed state was written and before the file was removed."""
    port = in_reactor(edge.listen, in_reactor.reactor)
    first = in_reactor(Device, tmp_path, in_reactor.reactor, f"127.0.0.1:{port}")
    item = in_reactor(first.queue.submit, ALICE, [BOB], message("once"), source="api")
    envelope = first.queue._entries[item.id].envelope
    first.queue.outbox.write_state(envelope, {BOB: RecipientState("relayed", "Q77")})
    assert first.files() == [f"{item.id}.msg", f"{item.id}.state"]

    again = in_reactor(Device, tmp_path, in_reactor.reactor, f"127.0.0.1:{port}")
    assert again.files() == [f"{item.id}.state"]
    assert again.queue.queued == [] and again.queue.awaiting() == {"Q77": [(item.id, BOB)]}
    start(in_reactor, again)
    try:
        within(in_reactor, again.queue.when_drained)
        assert edge.taken == []
    finally:
        stop(in_reactor, again)


def test_a_refused_recipient_bounces_with_a_notice_the_others_go(
    in_reactor: Any, tmp_path: Path, edge: EdgeRelayStandIn
) -> None:
    edge.refuse.add(CAROL)
    with running(in_reactor, tmp_path, edge) as dev:
        item = in_reactor(dev.queue.submit, ALICE, [BOB, CAROL], message("x"), source="api")
        within(in_reactor, dev.queue.when_drained)
        assert [t.recipients for t in edge.taken] == [[BOB]]  # Carol refused at RCPT
        (notice,) = dev.maildir.folder("INBOX").messages()
        text = dev.maildir.folder("INBOX").read(notice.id)
        assert b"Undelivered Mail Returned to Sender" in text
        assert f"To: <{ALICE}>".encode() in text
        assert b"Final-Recipient: rfc822; carol@example.org" in text
        assert b"550 5.1.1" in text and b"Status: 5.1.1" in text
        assert b"Hello" not in text  # the header section only, never the body
        state = json.loads((dev.dir / f"{item.id}.state").read_text())["recipients"]
        assert state[BOB]["status"] == "relayed" and state[CAROL]["status"] == "bounced"
        wait_for(lambda: len(dev.log.recent(10)) == 3, "three events")
        assert dev.statuses() == [("submitted", None), ("relayed", None), ("bounced", CAROL)]


def test_every_recipient_refused_removes_the_message(
    in_reactor: Any, tmp_path: Path, edge: EdgeRelayStandIn
) -> None:
    edge.refuse.update({BOB, CAROL})
    with running(in_reactor, tmp_path, edge) as dev:
        in_reactor(dev.queue.submit, ALICE, [BOB, CAROL], message("x"), source="api")
        within(in_reactor, dev.queue.when_drained)
        assert edge.taken == [] and dev.files() == []
        assert len(dev.maildir.folder("INBOX").messages()) == 1


def test_a_temporary_refusal_waits_and_goes_once_later(
    in_reactor: Any, tmp_path: Path, edge: EdgeRelayStandIn
) -> None:
    edge.later.add(CAROL)
    with running(in_reactor, tmp_path, edge) as dev:
        item = in_reactor(dev.queue.submit, ALICE, [BOB, CAROL], message("x"), source="api")
        wait_for(lambda: dev.queue.attempts == 1 and not dev.queue.relaying, "a first attempt")
        assert dev.queue.queued == [item.id]
        assert edge.taken[0].recipients == [BOB]
        edge.later.clear()
        in_reactor(dev.clock.advance, 5)
        within(in_reactor, dev.queue.when_drained)
        # Bob's copy went once; Carol's went on the retry, alone.
        assert [t.recipients for t in edge.taken] == [[BOB], [CAROL]]
        state = json.loads((dev.dir / f"{item.id}.state").read_text())["recipients"]
        assert state[BOB]["queue_id"] == "Q1" and state[CAROL]["queue_id"] == "Q2"


def test_a_wrong_key_sends_nothing_and_waits(
    in_reactor: Any, tmp_path: Path, edge: EdgeRelayStandIn
) -> None:
    with running(in_reactor, tmp_path, edge, creds=(DEVICE_ID, "wrong")) as dev:
        item = in_reactor(dev.queue.submit, ALICE, [BOB], message("x"), source="api")
        wait_for(lambda: bool(dev.clock.getDelayedCalls()), "a retry timer")
        assert edge.taken == [] and dev.queue.queued == [item.id]


def test_an_unlinked_device_waits(in_reactor: Any, tmp_path: Path, edge: EdgeRelayStandIn) -> None:
    with running(in_reactor, tmp_path, edge, creds=None) as dev:
        in_reactor(dev.queue.submit, ALICE, [BOB], message("x"), source="api")
        wait_for(lambda: bool(dev.clock.getDelayedCalls()), "a retry timer")
        assert edge.taken == [] and edge.logins == []


def _outside_address() -> str | None:
    """An address of this machine that is not loopback (None if it has none)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))
            host = str(s.getsockname()[0])
        except OSError:
            return None
    return None if host.startswith("127.") else host


def test_outside_loopback_the_key_goes_only_over_tls(in_reactor: Any, tmp_path: Path) -> None:
    host = _outside_address()
    if host is None:
        pytest.skip("this machine has no address outside loopback")
    plain = EdgeRelayStandIn()  # no STARTTLS
    port = in_reactor(plain.listen, in_reactor.reactor, host)
    dev = in_reactor(Device, tmp_path, in_reactor.reactor, f"{host}:{port}")
    start(in_reactor, dev)
    try:
        in_reactor(dev.queue.submit, ALICE, [BOB], message("x"), source="api")
        wait_for(lambda: bool(dev.clock.getDelayedCalls()), "a retry timer")
        assert plain.logins == [] and plain.taken == []  # the key was never sent
    finally:
        stop(in_reactor, dev)
        within(in_reactor, plain.stop)
    # The same edge address with STARTTLS: relayed, over TLS.
    tls = EdgeRelayStandIn(tls_dir=tmp_path / "tls")
    port = in_reactor(tls.listen, in_reactor.reactor, host)
    dev = in_reactor(Device, tmp_path / "second", in_reactor.reactor, f"{host}:{port}")
    start(in_reactor, dev)
    try:
        in_reactor(dev.queue.submit, ALICE, [BOB], message("y"), source="api")
        within(in_reactor, dev.queue.when_drained)
        assert tls.logins == [(DEVICE_ID, True)] and len(tls.taken) == 1
    finally:
        stop(in_reactor, dev)
        within(in_reactor, tls.stop)


DORA = "dora@example.test"


def message_from(sender: str, subject: str) -> bytes:
    return f"From: <{sender}>\r\nTo: {BOB}\r\nSubject: {subject}\r\n\r\nHi.\r\n".encode()


def test_a_refusal_holds_that_senders_mail_only_and_keeps_its_order(
    in_reactor: Any, tmp_path: Path, edge: EdgeRelayStandIn
) -> None:
    edge.later.add(CAROL)
    port = in_reactor(edge.listen, in_reactor.reactor)
    dev = in_reactor(Device, tmp_path, in_reactor.reactor, f"127.0.0.1:{port}")
    first = in_reactor(dev.queue.submit, ALICE, [CAROL], message_from(ALICE, "a1"), source="api")
    other = in_reactor(dev.queue.submit, DORA, [BOB], message_from(DORA, "d1"), source="api")
    second = in_reactor(dev.queue.submit, ALICE, [BOB], message_from(ALICE, "a2"), source="api")
    start(in_reactor, dev)
    try:
        # Alice's first is refused for now: Dora's goes; Alice's second waits behind it.
        wait_for(lambda: dev.queue.attempts == 2 and not dev.queue.relaying, "Dora's message")
        assert len(edge.taken) == 1
        assert b"Subject: d1" in edge.taken[0].data
        assert dev.queue.queued == [first.id, second.id] and other.id not in dev.queue.queued
        edge.later.clear()
        in_reactor(dev.clock.advance, 5)
        within(in_reactor, dev.queue.when_drained)
        subjects = [t.data.split(b"Subject: ")[1][:2] for t in edge.taken]
        assert subjects == [b"d1", b"a1", b"a2"]
    finally:
        stop(in_reactor, dev)


def test_mail_the_edge_never_takes_bounces_after_its_lifetime(
    in_reactor: Any, tmp_path: Path
) -> None:
    port = free_port()
    dev = in_reactor(Device, tmp_path, in_reactor.reactor, f"127.0.0.1:{port}")
    dev.queue.lifetime = 3600.0
    start(in_reactor, dev)
    try:
        item = in_reactor(dev.queue.submit, ALICE, [BOB], message("late"), source="api")
        wait_for(lambda: bool(dev.clock.getDelayedCalls()), "a retry timer")
        assert dev.queue.queued == [item.id]
        in_reactor(dev.clock.advance, 3600)
        within(in_reactor, dev.queue.when_drained)
        assert dev.files() == []
        (notice,) = dev.maildir.folder("INBOX").messages()
        text = dev.maildir.folder("INBOX").read(notice.id)
        assert b"Status: 5.4.7" in text and b"554 5.4.7 not relayed to the edge in 1 hours;" in text
        wait_for(lambda: len(dev.log.recent(10)) == 2, "two events")
        assert dev.statuses() == [("submitted", None), ("bounced", BOB)]
    finally:
        stop(in_reactor, dev)


@pytest.mark.parametrize("body", [b"\r\nHello\r\n", b""])
def test_a_non_ascii_header_section_asks_for_smtputf8(
    in_reactor: Any, tmp_path: Path, edge: EdgeRelayStandIn, body: bytes
) -> None:
    data = f"From: <{ALICE}>\r\nTo: <{BOB}>\r\nSubject: Grüße\r\n".encode() + body
    with running(in_reactor, tmp_path, edge) as dev:
        in_reactor(dev.queue.submit, ALICE, [BOB], data, source="api")
        within(in_reactor, dev.queue.when_drained)
        (taken,) = edge.taken
        assert taken.smtputf8 is True
        assert "Grüße".encode() in taken.data
