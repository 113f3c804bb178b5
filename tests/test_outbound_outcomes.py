"""The outcomes of relayed mail: the device polls its edge's `GET /v1/outbound/events`.

The edge is a remote peer here: a small twisted.web server answering the contract's shape
(with the device key as Bearer); the messages are relayed first to the SMTP stand-in of
tests/edgerelay.py, so the queue ids are the ones the relay gave.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from twisted.internet import threads
from twisted.internet.task import Clock
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from connector.edgeclient import EdgeClient
from connector.outbound.events import OutboundEventLog, OutboundEvents
from connector.outbound.poller import OutcomePoller
from connector.outbound.queue import OutboundQueue
from connector.outbound.relay import EdgeRelay
from maildir import Maildir
from tests.edgerelay import DEVICE_ID, DEVICE_KEY, EdgeRelayStandIn, within
from tests.test_outbound_relay import ALICE, BOB, CAROL, message, wait_for


class EventsResource(Resource):
    """`/v1/outbound/events` as the contract has it."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.events: list[dict[str, Any]] = []
        self.asked: list[tuple[int, int]] = []

    def add(self, queue_id: str, recipient: str, event: str, detail: str = "") -> None:
        self.events.append(
            {
                "id": len(self.events) + 1,
                "queue_id": queue_id,
                "recipient": recipient,
                "event": event,
                "detail": detail,
                "created_at": "2026-12-07T12:00:00.000000Z",
            }
        )

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        if request.getHeader(b"authorization") != f"Bearer {DEVICE_KEY}".encode():
            request.setResponseCode(401)
            return b'{"error": "unauthorized"}'
        query = parse_qs((request.uri or b"").decode().partition("?")[2])
        after = int(query.get("after", ["0"])[0])
        limit = int(query.get("limit", ["100"])[0])
        self.asked.append((after, limit))
        page = [e for e in self.events if e["id"] > after][:limit]
        next_after = page[-1]["id"] if page else after
        return json.dumps({"events": page, "next_after": next_after}).encode()


class Device:
    def __init__(self, root: Path, reactor: Any, relay_port: int, http_port: int, **kw: Any):
        self.clock = Clock()
        self.maildir = Maildir(root / "mail", hostname="device.test")
        self.log = OutboundEventLog(root / "device" / "outbound-events.jsonl", time.time)
        events = OutboundEvents(self.log, threads.deferToThread)
        relay = EdgeRelay(
            reactor,
            "device.test",
            lambda: f"127.0.0.1:{relay_port}",
            lambda: (DEVICE_ID, DEVICE_KEY),
            clock=self.clock,
        )
        self.queue = OutboundQueue(
            root / "device" / "outbound",
            self.maildir,
            events,
            clock=self.clock,
            run_blocking=threads.deferToThread,
            hostname="device.test",
            relay=relay,
        )
        client = EdgeClient(f"http://127.0.0.1:{http_port}", lambda: DEVICE_KEY, reactor=reactor)
        self.poller = OutcomePoller(
            self.queue,
            client,
            root / "device" / "outbound" / "edge-cursor.json",
            clock=self.clock,
            run_blocking=threads.deferToThread,
            interval=5.0,
            **kw,
        )
        self.dir = root / "device" / "outbound" / "queue"

    def start(self) -> None:
        self.queue.startService()
        self.poller.startService()

    def stop(self) -> Any:
        self.poller.stopService()
        return self.queue.stopService()

    def outcomes(self) -> list[tuple[str, str | None, str | None]]:
        return [
            (e.status, e.recipient, e.detail)
            for e in reversed(self.log.recent(100))
            if e.status not in ("submitted", "relayed")
        ]


def _serve(in_reactor: Any, resource: Resource) -> Any:
    root = Resource()
    v1 = Resource()
    outbound = Resource()
    root.putChild(b"v1", v1)
    v1.putChild(b"outbound", outbound)
    outbound.putChild(b"events", resource)
    return in_reactor(in_reactor.reactor.listenTCP, 0, Site(root), interface="127.0.0.1")


@dataclass
class Edge:
    """The edge as the device sees it: its relay listener and its outcome events API."""

    events: EventsResource
    relay_port: int
    http_port: int


@contextmanager
def edge_up(in_reactor: Any, tls_dir: Any = None) -> Iterator[Edge]:
    """Both of the edge's listeners, listening until the block ends."""
    smtp = EdgeRelayStandIn(tls_dir=tls_dir)
    relay_port = in_reactor(smtp.listen, in_reactor.reactor)
    events = EventsResource()
    http = _serve(in_reactor, events)
    try:
        yield Edge(events, relay_port, http.getHost().port)
    finally:
        within(in_reactor, smtp.stop)
        in_reactor(http.stopListening)


def device(in_reactor: Any, tmp_path: Path, peers: Edge, **kw: Any) -> Device:
    """A device (`kw` for `Device`) of the edge `peers`, not started."""
    return in_reactor(Device, tmp_path, in_reactor.reactor, peers.relay_port, peers.http_port, **kw)


@contextmanager
def running(in_reactor: Any, dev: Device) -> Iterator[Device]:
    """`dev` started, and stopped when the block ends."""
    in_reactor(dev.start)
    try:
        yield dev
    finally:
        within(in_reactor, dev.stop)


def test_outcomes_are_polled_recorded_and_the_cursor_kept(in_reactor: Any, tmp_path: Path) -> None:
    with edge_up(in_reactor, tls_dir=tmp_path / "tls") as peers:
        edge = peers.events
        with running(in_reactor, device(in_reactor, tmp_path, peers)) as dev:
            one = in_reactor(dev.queue.submit, ALICE, [BOB, CAROL], message("one"), source="api")
            two = in_reactor(dev.queue.submit, ALICE, [BOB, CAROL], message("two"), source="api")
            within(in_reactor, dev.queue.when_drained)
            assert sorted(dev.queue.awaiting()) == ["Q1", "Q2"]

            edge.add("Q1", BOB, "accepted")
            edge.add("Q1", BOB, "delivered", "250 2.0.0 ok")
            edge.add("Q1", CAROL, "deferred", "451 4.2.0 try later")
            edge.add("Q9", BOB, "delivered")  # another message: not this queue's
            edge.add("Q2", BOB, "bounced", "550 5.1.1 no such user")
            edge.add("Q2", CAROL.upper(), "delivered")
            in_reactor(dev.clock.advance, 5)
            wait_for(lambda: dev.poller.after == 6, "the first page")
            assert dev.outcomes() == [
                ("delivered", BOB, "250 2.0.0 ok"),
                ("deferred", CAROL, "451 4.2.0 try later"),
                ("bounced", BOB, "550 5.1.1 no such user"),
                ("delivered", CAROL, None),
            ]
            # Two is final for every recipient: forgotten. One still waits for Carol.
            assert sorted(p.name for p in dev.dir.iterdir()) == [f"{one.id}.state"]
            assert dev.queue.awaiting() == {"Q1": [(one.id, CAROL)]}
            cursor = tmp_path / "device" / "outbound" / "edge-cursor.json"
            assert json.loads(cursor.read_text()) == {"after": 6}
            assert two.id not in {i for pairs in dev.queue.awaiting().values() for i, _ in pairs}

            edge.add("Q1", CAROL, "deferred", "451 4.2.0 try later")  # the same again: no event
            edge.add("Q1", CAROL, "expired")
            in_reactor(dev.clock.advance, 5)
            wait_for(lambda: dev.poller.after == 8, "the second page")
            assert dev.outcomes()[-1] == ("bounced", CAROL, "expired on the edge")
            assert len(dev.outcomes()) == 5
            assert list(dev.dir.iterdir()) == [] and dev.queue.awaiting() == {}
            # Nothing waits: no more requests.
            asked = len(edge.asked)
            in_reactor(dev.clock.advance, 50)
            assert len(edge.asked) == asked
            assert edge.asked[0] == (0, 100) and edge.asked[1] == (6, 100)


def test_pages_are_asked_for_at_once_and_a_restart_resumes(in_reactor: Any, tmp_path: Path) -> None:
    with edge_up(in_reactor) as peers:
        edge = peers.events
        with running(in_reactor, device(in_reactor, tmp_path, peers, limit=2)) as dev:
            item = in_reactor(dev.queue.submit, ALICE, [BOB, CAROL], message("x"), source="api")
            within(in_reactor, dev.queue.when_drained)
            for _ in range(4):
                edge.add("Q7", BOB, "delivered")  # not ours
            edge.add("Q1", BOB, "delivered")
            in_reactor(dev.clock.advance, 5)
            wait_for(lambda: dev.poller.after == 5, "three pages")
            assert edge.asked == [(0, 2), (2, 2), (4, 2)]
            assert dev.queue.awaiting() == {"Q1": [(item.id, CAROL)]}
        # The next start asks from where the last one ended.
        again = device(in_reactor, tmp_path, peers, limit=2)
        assert again.poller.after == 5
        assert again.queue.awaiting() == {"Q1": [(item.id, CAROL)]}
        edge.add("Q1", CAROL, "delivered")
        with running(in_reactor, again):
            in_reactor(again.clock.advance, 5)
            wait_for(lambda: again.queue.awaiting() == {}, "the last outcome")
            assert edge.asked[-1] == (5, 2)


def test_an_edge_that_refuses_the_key_is_asked_again_later(in_reactor: Any, tmp_path: Path) -> None:
    with edge_up(in_reactor) as peers:
        edge = peers.events
        dev = device(in_reactor, tmp_path, peers)
        dev.poller.client._key = lambda: "not-the-key"
        with running(in_reactor, dev):
            in_reactor(dev.queue.submit, ALICE, [BOB], message("x"), source="api")
            within(in_reactor, dev.queue.when_drained)
            edge.add("Q1", BOB, "delivered")
            in_reactor(dev.clock.advance, 5)
            wait_for(lambda: dev.poller.polls == 1 and dev.poller._timer is not None, "a refusal")
            assert dev.poller.after == 0 and dev.outcomes() == []
            # Refused again: the wait doubles (10 s, then 20 s).
            in_reactor(dev.clock.advance, 9)
            assert dev.poller.polls == 1
            in_reactor(dev.clock.advance, 1)
            wait_for(lambda: dev.poller.polls == 2 and dev.poller._timer is not None, "again")
            (timer,) = [
                c
                for c in dev.clock.getDelayedCalls()
                if getattr(c, "func", None) == dev.poller._tick
            ]
            assert timer.getTime() - dev.clock.seconds() == 20
            dev.poller.client._key = lambda: DEVICE_KEY
            in_reactor(dev.clock.advance, 20)
            wait_for(lambda: dev.queue.awaiting() == {} and dev.poller._polling is None, "outcome")
            assert dev.outcomes() == [("delivered", BOB, None)]
            assert dev.poller._failures == 0


def test_outcomes_are_not_waited_for_forever(in_reactor: Any, tmp_path: Path) -> None:
    with edge_up(in_reactor) as peers:
        with running(in_reactor, device(in_reactor, tmp_path, peers)) as dev:
            item = in_reactor(dev.queue.submit, ALICE, [BOB], message("x"), source="api")
            within(in_reactor, dev.queue.when_drained)
            assert [p.name for p in dev.dir.iterdir()] == [f"{item.id}.state"]
            in_reactor(dev.clock.advance, 5)  # asked; the edge has nothing yet
            wait_for(lambda: dev.poller.polls == 1 and dev.poller._timer is not None, "a poll")
            in_reactor(dev.clock.advance, 7 * 86400)
            wait_for(lambda: list(dev.dir.iterdir()) == [], "the state forgotten")
            assert dev.queue.awaiting() == {}
            polls = dev.poller.polls
            in_reactor(dev.clock.advance, 60)
            assert dev.poller.polls == polls
