"""Outbound mail survives its processes stopping and crashing, end to end with an edge
(`twistd tailpost-edge`) and a linked device (`twistd tailpost-device`) as two processes
(`tests.outbound_world`). The remote MX counts Message-IDs: every message arrives exactly once.

- The edge down while the device takes several messages: the device retries on its own
  backoff (`[device] relay_retry_initial`, `relay_retry_max`, made short here) and, once the
  edge is back, relays them in order, and every message arrives once.
- SIGKILL of the device after its 250 and before it could relay: after restart, once.
- SIGKILL of the edge after the relay's 250 and before the remote MX took the message:
  after restart, once.
- The same message relayed twice by the device (as after a crash between the edge's 250 and
  the device's own record of it): one queue id, one delivery, also across an edge restart.
- The connection lost after the end of the data, before the device read the relay's 250
  (a proxy between them drops it there, once): the device sends again, the edge answers
  with the first queue id, and the message arrives once.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fakes import DownstreamMX
from tests.outbound_world import (
    ALICE,
    HOSTS,
    World,
    make_world,
    message_ids,
    wait_until,
)
from tests.processes import free_port


def _message(n: int, subject: str = "crash") -> tuple[str, bytes]:
    mid = f"<{subject}-{n}@home.test>"
    data = (
        f"From: Alice <{ALICE}>\r\nTo: bob@far.test\r\nSubject: {subject} {n}\r\n"
        f"Message-ID: {mid}\r\n\r\nMessage {n}.\r\n"
    ).encode()
    return mid, data


def _far(world: World) -> DownstreamMX:
    handler = DownstreamMX()
    world.remote("mx.far.test", HOSTS[0], handler=handler)
    world.domain("far.test", [(10, "mx.far.test")])
    return handler


def _once(world: World, far: DownstreamMX, mids: list[str]) -> None:
    """Each of `mids` arrived, and once everything has settled (the device's queue empty,
    every message the edge took final), once each; nothing else did."""
    wait_until(
        lambda: all(m in message_ids(far.seen) for m in mids),
        lambda: f"{mids} at the remote MX; seen {message_ids(far.seen)}",
    )
    wait_until(lambda: world.device_queue() == [], "the device's queue empty")
    wait_until(world.edge_settled, lambda: f"the edge settled: {world.edge_events()}")
    assert sorted(message_ids(far.seen)) == sorted(mids)


def _delivered(world: World, item: str) -> None:
    wait_until(
        lambda: ("delivered", "bob@far.test") in world.statuses(item),
        lambda: f"{item} delivered: {world.statuses(item)}",
    )


@pytest.fixture
def world(in_reactor: Any, tmp_path: Path) -> Iterator[World]:
    w = make_world(tmp_path, in_reactor)
    try:
        yield w
    finally:
        w.stop()


def test_the_edge_down_then_back_every_message_is_relayed_in_order_and_arrives_once(
    world: World,
) -> None:
    far = _far(world)
    world.start_edge()
    world.start_device()
    world.edge.stop()
    sent = [_message(n, "down") for n in range(1, 6)]
    items = [world.submit(data, ["bob@far.test"]) for _mid, data in sent]
    assert items == sorted(items)
    wait_until(
        lambda: world.device.log().count("is not reachable") >= 2,
        "the device trying the stopped edge again",
    )
    assert far.seen == [] and len(world.device_queue()) >= 5

    world.start_edge()
    mids = [mid for mid, _data in sent]
    _once(world, far, mids)
    for item in items:
        _delivered(world, item)
    assert world.device_queue() == []
    # In order: the device relayed them in the order they were submitted (the edge's queue
    # ids, which increase, and the order of the relay's log lines say so). The edge's
    # delivery queue makes no promise of order between messages it took a moment apart.
    qids = [
        next(
            e["queue_id"]
            for e in world.outbound_events()
            if e["proxy_message_id"] == item and e["status"] == "relayed"
        )
        for item in items
    ]
    assert qids == sorted(qids) and len(set(qids)) == 5
    log = world.edge.log()
    assert sorted(qids, key=lambda q: log.index(f"relay {q}:")) == qids


def test_sigkill_of_the_device_after_its_250_before_the_relay(world: World) -> None:
    far = _far(world)
    world.set_device_relay(f"127.0.0.1:{free_port()}")  # nothing listens there
    world.start_edge()
    world.start_device()
    mid, data = _message(1, "device-kill")
    item = world.submit(data, ["bob@far.test"])
    wait_until(lambda: "is not reachable" in world.device.log(), "a failed relay attempt")
    world.device.kill()
    assert world.device_queue()  # the 250 meant: on disk

    world.set_device_relay(f"127.0.0.1:{world.relay_port}")
    world.start_device()
    _once(world, far, [mid])
    _delivered(world, item)
    assert [s for s, _r in world.statuses(item)] == ["submitted", "relayed", "delivered"]
    assert world.device_queue() == []
    world.device.stop()
    world.start_device()  # nothing is left to send again
    assert world.device_queue() == [] and message_ids(far.seen) == [mid]


def test_sigkill_of_the_edge_after_the_relays_250_before_the_remote_mx(
    world: World,
) -> None:
    world.domain("far.test", [(10, "mx.far.test")])
    world.dns.zone.set("mx.far.test", "A", [HOSTS[0]])  # nothing listens there yet
    world.start_edge()
    world.start_device()
    mid, data = _message(1, "edge-kill")
    item = world.submit(data, ["bob@far.test"])
    wait_until(lambda: ("relayed", None) in world.statuses(item), "the relay's 250")
    world.edge.kill()

    far = DownstreamMX()
    world.remote("mx.far.test", HOSTS[0], handler=far)
    world.start_edge()
    _once(world, far, [mid])
    _delivered(world, item)
    assert [s for s, _r in world.statuses(item)].count("relayed") == 1
    assert message_ids(far.seen) == [mid]


def test_a_resend_by_the_device_is_one_delivery_with_one_queue_id(world: World) -> None:
    far = _far(world)
    world.start_edge()
    mid, data = _message(1, "resend")

    qids: list[str] = []
    for restart in (False, False, True):
        if restart:
            world.edge.kill()
            world.start_edge()
        with world.relay_client() as client:
            assert client.mail(ALICE)[0] == 250
            assert client.rcpt("bob@far.test")[0] == 250
            code, reply = client.data(data)
        assert code == 250, reply
        qids.append(reply.decode().rsplit(" ", 1)[1])
    assert len(set(qids)) == 1, qids
    _once(world, far, [mid])
    wait_until(lambda: "sent message" in world.edge.log(), "the resend in the edge's log")
    assert world.edge.log().count("not spooled again") == 2


class DropFirst250:
    """A TCP proxy to the edge's relay that, the first time the relay answers the end of
    the data ("250 2.0.0 Queued as"), closes both connections instead of passing it on."""

    def __init__(self, upstream: int) -> None:
        self.upstream = upstream
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.dropped = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.upstream))
            threading.Thread(target=self._pipe, args=(client, server, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, True), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, replies: bool) -> None:
        try:
            while chunk := src.recv(65536):
                if replies and b"250 2.0.0 Queued as" in chunk and not self.dropped.is_set():
                    self.dropped.set()
                    break
                dst.sendall(chunk)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def close(self) -> None:
        self.listener.close()


def test_a_lost_250_is_sent_again_and_delivered_once(world: World) -> None:
    far = _far(world)
    proxy = DropFirst250(world.relay_port)
    try:
        world.set_device_relay(f"127.0.0.1:{proxy.port}")
        world.start_edge()
        world.start_device()
        mid, data = _message(1, "lost-250")
        item = world.submit(data, ["bob@far.test"])
        _once(world, far, [mid])
        _delivered(world, item)
    finally:
        proxy.close()
    assert proxy.dropped.is_set()  # the first 250 never reached the device
    assert world.edge.log().count("not spooled again") == 1
    relayed = [
        e
        for e in world.outbound_events()
        if e["proxy_message_id"] == item and e["status"] == "relayed"
    ]
    assert len(relayed) == 1 and relayed[0]["queue_id"] in world.edge.log()
    assert message_ids(far.seen) == [mid]
