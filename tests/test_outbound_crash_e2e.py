"""Outbound mail survives its processes stopping and crashing, end to end with an edge
(`twistd tailpost-edge`) and a linked device (`twistd tailpost-device`) as two processes
(`tests.outbound_world`). The remote MX counts Message-IDs: every message arrives exactly once.

- The edge down while the device takes several messages: the device retries on its own
  backoff (`[device] relay_retry_initial`, `relay_retry_max`, made short here) and, once the
  edge is back, every message arrives once, in order.
- SIGKILL of the device after its 250 and before it could relay: after restart, once.
- SIGKILL of the edge after the relay's 250 and before the remote MX took the message:
  after restart, once.
- The same message relayed twice by the device (as after a crash between the edge's 250 and
  the device's own record of it): one queue id, one delivery, also across an edge restart.
"""

from __future__ import annotations

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


def _queue_files(world: World) -> list[Path]:
    queue = world.device.data_dir / "device" / "outbound" / "queue"
    return [p for p in queue.rglob("*") if p.is_file()] if queue.exists() else []


def _once(far: DownstreamMX, mids: list[str]) -> None:
    """Each of `mids` arrived, once each; nothing else did."""
    wait_until(
        lambda: all(m in message_ids(far.seen) for m in mids),
        lambda: f"{mids} at the remote MX; seen {message_ids(far.seen)}",
    )
    assert sorted(message_ids(far.seen)) == sorted(mids)


def _delivered(world: World, item: str) -> None:
    wait_until(
        lambda: ("delivered", "bob@far.test") in world.statuses(item),
        lambda: f"{item} delivered: {world.statuses(item)}",
    )


@pytest.fixture
def world(in_reactor: Any, tmp_path: Path) -> Iterator[World]:
    w = make_world(tmp_path, in_reactor, edge_extra="delivery_connections = 1")
    try:
        yield w
    finally:
        w.stop()


def test_the_edge_down_then_back_every_message_arrives_once_in_order(world: World) -> None:
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
    assert far.seen == [] and len(_queue_files(world)) >= 5

    world.start_edge()
    mids = [mid for mid, _data in sent]
    _once(far, mids)
    assert message_ids(far.seen) == mids  # in the order they were submitted
    for item in items:
        _delivered(world, item)
    assert _queue_files(world) == []


def test_sigkill_of_the_device_after_its_250_before_the_relay(world: World) -> None:
    far = _far(world)
    world.set_device_relay(f"127.0.0.1:{free_port()}")  # nothing listens there
    world.start_edge()
    world.start_device()
    mid, data = _message(1, "device-kill")
    item = world.submit(data, ["bob@far.test"])
    wait_until(lambda: "is not reachable" in world.device.log(), "a failed relay attempt")
    world.device.kill()
    assert _queue_files(world)  # the 250 meant: on disk

    world.set_device_relay(f"127.0.0.1:{world.relay_port}")
    world.start_device()
    _once(far, [mid])
    _delivered(world, item)
    assert [s for s, _r in world.statuses(item)] == ["submitted", "relayed", "delivered"]
    assert _queue_files(world) == []
    world.device.stop()
    world.start_device()  # nothing is left to send again
    assert _queue_files(world) == [] and message_ids(far.seen) == [mid]


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
    _once(far, [mid])
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
    _once(far, [mid])
    wait_until(lambda: "sent message" in world.edge.log(), "the resend in the edge's log")
    assert world.edge.log().count("not spooled again") == 2
