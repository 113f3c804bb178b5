"""One message's failure never holds back another's: the queue and the real delivery client
over loopback TCP, with an aiosmtpd peer standing for the device.

The device's queue keeps arrival order only while the device cannot be reached. Here it is
reachable, and the oldest message is one that cannot be delivered as it is (or, before,
could not be sent at all): the hundred messages after it must all arrive while it is
delivered, bounced or held, never waited behind.
"""

from __future__ import annotations

import email
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from edge.delivery.client import SMTPDeliverer
from edge.delivery.queue import DeliveryQueue
from edge.delivery.routing import Target
from edge.spool.spool import Envelope, Spool
from tests.fakes import DownstreamMX, Peer, start_peer
from tests.processes import wait_for

DEVICE_RCPT = "alice@home.test"
ORDINARY = 100


class Device(DownstreamMX):
    """The device's connector as a peer: refuses at end of data what carries `refuse_mark`."""

    refuse_mark = b"X-Refuse-Me: yes"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self.refuse_mark in envelope.original_content:
            return "451 4.3.0 cannot store this one right now"
        return await super().handle_DATA(server, session, envelope)


def start(handler: DownstreamMX, *, smtputf8: bool) -> Peer:
    return start_peer(handler, enable_SMTPUTF8=smtputf8)


@dataclass
class World:
    spool: Spool
    queue: DeliveryQueue
    deliverer: SMTPDeliverer
    device: Peer
    sender_mx: Peer
    run: Any

    def accept(self, sender: str, data: bytes, *, smtputf8: bool = False) -> Envelope:
        writer = self.spool.writer()
        writer.write(data)
        now = self.run(lambda: self.queue.clock.seconds())
        env = Envelope(writer.qid, sender, [DEVICE_RCPT], now, smtputf8=smtputf8)
        self.spool.commit(writer, env)
        self.run(self.queue.enqueue, env)
        return env

    def subjects(self) -> list[str]:
        out = []
        for seen in list(self.device.handler.seen):
            out.append(str(email.message_from_bytes(seen.data.split(b"\r\n", 1)[1])["Subject"]))
        return out


@pytest.fixture
def world(in_reactor: Any, tmp_path: Path) -> Iterator[World]:
    reactor = in_reactor.reactor
    device = start(Device(), smtputf8=False)  # a peer without SMTPUTF8
    sender_mx = start(DownstreamMX(), smtputf8=True)

    def route(rcpt: str, kind: str) -> Target:
        if kind == "dsn":
            return Target("mx", "mx:senders", (("127.0.0.1", sender_mx.port),))
        return Target(
            "device",
            f"device:dev_1:127.0.0.1:{device.port}",
            (("127.0.0.1", device.port),),
            device_id="dev_1",
        )

    spool = Spool(tmp_path / "spool")
    deliverer = SMTPDeliverer(reactor, "edge.test", timeout=10)
    queue = DeliveryQueue(spool, route, deliverer, reactor, [3600.0], hostname="edge.test")
    in_reactor(queue.start)
    try:
        yield World(spool, queue, deliverer, device, sender_mx, in_reactor)
    finally:
        in_reactor(queue.stop)
        in_reactor(deliverer.close)
        device.controller.stop()
        sender_mx.controller.stop()


def ordinary(n: int) -> bytes:
    return f"From: carol@sender.test\r\nSubject: ordinary {n}\r\n\r\nHello {n}.\r\n".encode()


def send_the_hundred(world: World) -> None:
    for n in range(ORDINARY):
        world.accept("carol@sender.test", ordinary(n))
    wait_for(lambda: len([s for s in world.subjects() if s.startswith("ordinary")]) >= ORDINARY)
    got = [s for s in world.subjects() if s.startswith("ordinary")]
    assert sorted(got) == sorted(f"ordinary {n}" for n in range(ORDINARY))  # each once


def state(world: World, qid: str) -> dict[str, Any]:
    def read() -> dict[str, Any]:
        entry = world.spool.entry(qid) if qid in world.spool.queued_ids() else None
        st = world.queue.states.get(qid)
        return {
            "queued": entry is not None,
            "held": entry.held if entry else False,
            "reason": entry.held_reason if entry else "",
            "errors": dict(st.last_errors) if st else {},
        }

    result: dict[str, Any] = world.run(read)
    return result


def test_a_domain_literal_sender_is_delivered_and_holds_nothing_back(world: World) -> None:
    bad = world.accept("foo@[1.2.3.5]", b"Subject: literal\r\n\r\nfrom a literal\r\n")
    send_the_hundred(world)
    wait_for(lambda: "literal" in world.subjects())
    [seen] = [s for s in world.device.handler.seen if b"from a literal" in s.data]
    assert seen.sender == "foo@[1.2.3.5]"
    wait_for(lambda: not state(world, bad.qid)["queued"])


def test_a_utf8_sender_to_a_peer_without_smtputf8_bounces_at_once(world: World) -> None:
    sender = "ü@bücher.example"
    bad = world.accept(sender, "Subject: grüße\r\n\r\nHallo\r\n".encode(), smtputf8=True)
    send_the_hundred(world)
    wait_for(lambda: not state(world, bad.qid)["queued"])  # bounced: finished, gone
    assert "grüße" not in " ".join(world.subjects())  # never sent without SMTPUTF8
    [dsn] = wait_for(lambda: list(world.sender_mx.handler.seen))
    assert (dsn.sender, dsn.recipients) == ("<>", [sender])  # (aiosmtpd says "<>")
    assert b"553 5.6.7" in dsn.data and b"message/global-delivery-status" in dsn.data
    assert "utf-8; " + DEVICE_RCPT not in dsn.data.decode()  # an ASCII recipient stays rfc822


def test_a_message_refused_for_its_own_reasons_holds_nothing_back(world: World) -> None:
    bad = world.accept("carol@sender.test", b"Subject: refused\r\nX-Refuse-Me: yes\r\n\r\nx\r\n")
    wait_for(lambda: state(world, bad.qid)["errors"])
    send_the_hundred(world)
    now = state(world, bad.qid)
    assert now["queued"] and not now["held"]  # retried on its own schedule
    assert now["errors"][DEVICE_RCPT].startswith("451 4.3.0 cannot store")


def test_a_message_the_client_cannot_send_is_held_and_holds_nothing_back(world: World) -> None:
    # A path no SMTP command can carry (the MX never takes one; a damaged spool could hold
    # one): sending it raises in the client, a defect, so the message is held.
    bad = world.accept("evil\r\nRCPT TO:<x@y.test>@sender.test", b"Subject: bad\r\n\r\nx\r\n")
    send_the_hundred(world)
    wait_for(lambda: state(world, bad.qid)["held"])
    now = state(world, bad.qid)
    assert "ValueError" in now["reason"] and "cannot be sent" in now["reason"]
    assert now["errors"][DEVICE_RCPT].startswith("451 4.3.0 held")
    assert all(b"RCPT TO:<x@y.test>" not in s.data for s in world.device.handler.seen)
    assert "bad" not in world.subjects()
