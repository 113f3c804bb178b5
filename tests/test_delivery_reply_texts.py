"""What a failed delivery records and reports says only named replies, never an exception's
text: the queue and the real delivery client over loopback TCP, failing for real (a port
nobody listens on, a TLS handshake with a server that speaks plain SMTP, a deliverer that
raises with its own words), with lifetime 0 so that the first failure is final and the
sender's MX (an aiosmtpd peer) gets the "failed" report at once.

A remote server's own reply may be quoted ("remote said"); the test's peers give none here.
"""

from __future__ import annotations

import email
from collections.abc import Iterator
from dataclasses import dataclass, field
from email import policy
from email.message import EmailMessage, Message
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import protocol

from edge.delivery.client import SMTPDeliverer
from edge.delivery.queue import DeliveryQueue
from edge.delivery.routing import Target
from edge.smtp import replies
from edge.spool.spool import Envelope, Spool
from tests.fakes import DownstreamMX, Peer, closed_port, start_peer
from tests.processes import wait_for

SENDER = "carol@sender.test"
REFUSED = "refused@example.test"  # nothing listens on its host's port
TLS = "tls@example.test"  # TLS from the first octet, to a server that speaks plain SMTP
FAULT = "fault@example.test"  # the deliverer raises a passing fault with its own words
DEFECT = "defect@example.test"  # the deliverer raises a defect with its own words
SECRET = "s3cr3t-/var/lib/tailpost/edge"
"""In every exception the deliverer raises: it must appear in no report and no event."""
LEAKS = (SECRET, "Connection was refused", "rrno", "No space", "SSL routines", "Traceback", "Error")


class PlainGreeter(protocol.Protocol):
    """Speaks plain SMTP to whoever connects, so a TLS handshake with it fails."""

    def connectionMade(self) -> None:  # noqa: N802
        assert self.transport is not None
        self.transport.write(b"220 plain.test ESMTP\r\n")


class RaisingDeliverer:
    """The real delivery client, except for the targets it raises for, with words of its
    own in the exception (as a defect in it, or a passing fault such as a full disk,
    would)."""

    def __init__(self, real: SMTPDeliverer) -> None:
        self.real = real

    def deliver(self, target: Target, sender: str, recipients: list[str], data: bytes, **kw: Any):  # type: ignore[no-untyped-def]
        if target.key == "fault":
            raise OSError(28, f"No space left on device: {SECRET}")
        if target.key == "defect":
            raise RuntimeError(f"a bug, with {SECRET}")
        return self.real.deliver(target, sender, recipients, data, **kw)


@dataclass
class World:
    spool: Spool
    queue: DeliveryQueue
    sender_mx: Peer
    targets: dict[str, Target]
    run: Any
    events: list[tuple[str, str, str, str]] = field(default_factory=list)

    def accept(self, recipients: list[str]) -> Envelope:
        writer = self.spool.writer()
        writer.write(b"From: carol@sender.test\r\nSubject: hello\r\n\r\nHello.\r\n")
        now = self.run(lambda: self.queue.clock.seconds())
        env = Envelope(writer.qid, SENDER, recipients, now)
        self.spool.commit(writer, env)
        self.run(self.queue.enqueue, env)
        return env

    def detail(self, qid: str, rcpt: str, event: str) -> str:
        found = [d for q, r, e, d in list(self.events) if (q, r, e) == (qid, rcpt, event)]
        assert found, (qid, rcpt, event, self.events)
        return found[-1]


@pytest.fixture
def world(in_reactor: Any, tmp_path: Path) -> Iterator[World]:
    reactor = in_reactor.reactor
    sender_mx = start_peer(DownstreamMX())
    plain = in_reactor(
        reactor.listenTCP, 0, protocol.Factory.forProtocol(PlainGreeter), interface="127.0.0.1"
    )
    tls_port = plain.getHost().port
    targets = {
        REFUSED: Target("mx", "refused", (("127.0.0.1", closed_port()),)),
        TLS: Target("mx", "tls", (("127.0.0.1", tls_port),), tls_modes=("tls",)),
        FAULT: Target("mx", "fault", (("127.0.0.1", 1),)),
        DEFECT: Target("mx", "defect", (("127.0.0.1", 1),)),
    }

    def route(rcpt: str, kind: str) -> Target:
        if kind == "dsn":
            return Target("mx", "mx:senders", (("127.0.0.1", sender_mx.port),), starttls=False)
        return targets[rcpt]

    spool = Spool(tmp_path / "spool")
    real = SMTPDeliverer(reactor, "edge.test", timeout=10)
    events: list[tuple[str, str, str, str]] = []
    queue = DeliveryQueue(
        spool,
        route,
        RaisingDeliverer(real),
        reactor,
        [3600.0],
        lifetime=0.0,
        hostname="edge.test",
        on_event=lambda *event: events.append(event),
    )
    in_reactor(queue.start)
    try:
        yield World(spool, queue, sender_mx, targets, in_reactor, events)
    finally:
        in_reactor(queue.stop)
        in_reactor(real.close)
        in_reactor(plain.stopListening)
        sender_mx.controller.stop()


def report_blocks(data: bytes) -> tuple[str, dict[str, dict[str, str]]]:
    """The report's human part, and its per-recipient fields by recipient."""
    msg = email.message_from_bytes(data, policy=policy.default)
    assert isinstance(msg, EmailMessage)
    human, status, _headers = list(msg.iter_parts())
    assert isinstance(human, EmailMessage)
    blocks: dict[str, dict[str, str]] = {}
    payload: list[Message] = status.get_payload()  # type: ignore[assignment]
    for block in payload[1:]:
        fields = {k: " ".join(str(v).split()) for k, v in block.items()}
        blocks[fields["Final-Recipient"].rpartition(";")[2].strip()] = fields
    return human.get_content(), blocks


def test_reports_and_events_say_only_named_replies(world: World) -> None:
    env = world.accept([REFUSED, TLS, FAULT])
    wait_for(lambda: len(world.sender_mx.handler.seen) == 1, timeout=20)
    [dsn] = world.sender_mx.handler.seen
    assert dsn.recipients == [SENDER]
    human, blocks = report_blocks(dsn.data)

    def where(rcpt: str) -> str:
        target = world.targets[rcpt]
        return target.where(*target.hosts[0])

    expected = {
        REFUSED: replies.D451_NO_CONNECTION.format(where=where(REFUSED)).status,
        TLS: replies.D451_TLS_FAILED.format(where=where(TLS)).status,
        FAULT: replies.D451_PASSING_FAULT.status,
    }
    assert set(blocks) == set(expected)
    for rcpt, reply in expected.items():
        assert blocks[rcpt]["Diagnostic-Code"] == f"smtp; {reply}", rcpt
        assert f"<{rcpt}>: {reply}" in human
        assert world.detail(env.qid, rcpt, "expired") == reply
    for leak in LEAKS:
        assert leak not in dsn.data.decode("utf-8", "replace"), leak
        assert not any(leak in detail for *_, detail in list(world.events)), leak


def test_a_defect_is_recorded_as_held_without_its_words(world: World) -> None:
    env = world.accept([DEFECT])
    wait_for(lambda: world.run(lambda: world.spool.entry(env.qid).held))
    held = replies.D451_HELD.status
    assert world.detail(env.qid, DEFECT, "deferred") == held
    assert world.run(lambda: dict(world.queue.states[env.qid].last_errors)) == {DEFECT: held}
    # The defect's words are the operator's (`queue show`), never a sender's.
    assert SECRET in world.run(lambda: world.spool.entry(env.qid).held_reason)
    assert not any(SECRET in detail for *_, detail in list(world.events))
    assert world.sender_mx.handler.seen == []  # held: no report
