"""Delivery resolves every host through the configured resolver, never the system's.

The names used here (`oldmx.split.test`, `laptop.tailnet.test`) exist only in the local DNS
server the test starts: a delivery that asked the system resolver would never reach them.
"""

from __future__ import annotations

import smtplib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import defer, threads

from connector.receiver import ConnectorHandler
from edge.delivery.client import SMTPDeliverer
from edge.delivery.queue import DeliveryQueue
from edge.delivery.routing import NoRoute, Router, route_soon
from edge.dns.resolver import DNSResolver, DNSTemporaryError
from edge.inbound.policy import MXHandler
from edge.smtp.factory import SMTPServerFactory
from edge.smtp.server import Limits
from edge.spool.spool import Spool
from edge.store import Store, open_store
from edge.store.cache import CachedLookups
from edge.store.keyring import StoreKeys
from maildir import Maildir
from tests.dnsserver import HANG
from tests.fakes import DownstreamMX, Peer, start_peer

USER, PASSWORD = "edge-laptop", "laptop secret"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    opened = open_store(f"sqlite:///{tmp_path / 'control.db'}", keys=StoreKeys.generate())
    try:
        yield opened
    finally:
        opened.close()


@pytest.fixture
def resolver(dns_server: Any) -> DNSResolver:
    return DNSResolver(["127.0.0.1"], port=dns_server.port, timeout=1.0)


@dataclass
class Site:
    mx_port: int
    old_mx: Peer
    maildir: Maildir
    queue: DeliveryQueue


def _wait_for(predicate: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("not delivered in time")
        time.sleep(0.02)


@pytest.fixture
def site(
    in_reactor: Any, tmp_path: Path, store: Store, resolver: DNSResolver, dns_server: Any
) -> Iterator[Site]:
    """The edge's MX and queue (routing through `resolver`), a device connector known only
    by a name in the local DNS, and a split domain whose old MX is known only there too."""
    reactor = in_reactor.reactor
    old_mx = start_peer(DownstreamMX())
    maildir = Maildir(tmp_path / "laptop-mail", hostname="laptop.test")
    connector = SMTPServerFactory(
        lambda: ConnectorHandler(maildir, USER, PASSWORD, threads.deferToThread, lambda i: None),
        Limits(),
        "laptop.test",
        reactor,
    )
    connector_port = in_reactor(reactor.listenTCP, 0, connector, interface="127.0.0.1")
    dns_server.zone.set("oldmx.split.test", "A", ["127.0.0.1"])
    dns_server.zone.set("laptop.tailnet.test", "A", ["127.0.0.1"])
    laptop = store.create_device(
        "laptop",
        connector_smtp_addr=f"laptop.tailnet.test:{connector_port.getHost().port}",
        connector_username=USER,
        connector_secret=PASSWORD,
    )
    store.create_route(
        "split.test",
        type="byod",
        connector_id=laptop.id,
        status="active",
        authoritative_hosts=[{"host": "oldmx.split.test", "port": old_mx.port, "tls_mode": "none"}],
    )
    store.add_byod_address("alice", "split.test", laptop.id)
    spool = Spool(tmp_path / "spool")
    lookups = CachedLookups(store)
    router = Router(lookups.resolve_recipient, resolver)
    queue = DeliveryQueue(
        spool,
        router.target,
        SMTPDeliverer(reactor, "edge.test", timeout=10),
        reactor,
        [1.0, 2.0],
        hostname="edge.test",
        route_soon=route_soon(router, lookups, threads.deferToThread),
    )

    def handler() -> MXHandler:
        return MXHandler(
            store.resolve_recipient,
            spool,
            "edge.test",
            reactor,
            threads.deferToThread,
            queue.enqueue,
        )

    mx = SMTPServerFactory(handler, Limits(own_received=1), "edge.test", reactor)
    mx_port = in_reactor(reactor.listenTCP, 0, mx, interface="127.0.0.1")
    try:
        yield Site(mx_port.getHost().port, old_mx, maildir, queue)
    finally:
        in_reactor(queue.stop)
        in_reactor(
            lambda: defer.gatherResults([mx_port.stopListening(), connector_port.stopListening()])
        )
        old_mx.controller.stop()


def _send(port: int, rcpts: list[str], data: bytes) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.ehlo("client.sender.test")
        client.mail("carol@sender.test")
        for rcpt in rcpts:
            assert client.rcpt(rcpt)[0] == 250
        code, text = client.data(data)
        assert code == 250, text


def _inbox(maildir: Maildir) -> list[bytes]:
    new = maildir.root / "new"
    return [p.read_bytes() for p in sorted(new.iterdir())] if new.exists() else []


def test_old_mx_and_device_known_only_to_the_configured_dns_get_their_mail(
    site: Site, dns_server: Any
) -> None:
    data = b"From: carol@sender.test\r\nSubject: split\r\n\r\nhello\r\n"
    _send(site.mx_port, ["bob@split.test", "alice@split.test"], data)

    _wait_for(lambda: len(site.old_mx.handler.seen) == 1 and len(_inbox(site.maildir)) == 1)
    [seen] = site.old_mx.handler.seen
    assert seen.recipients == ["bob@split.test"]
    assert seen.data.endswith(data)
    [stored] = _inbox(site.maildir)
    assert stored.startswith(b"Return-Path: <carol@sender.test>\r\nDelivered-To: alice@split.test")
    assert ("oldmx.split.test", "A") in dns_server.zone.queries
    assert ("laptop.tailnet.test", "A") in dns_server.zone.queries


def test_router_resolves_hosts_through_the_resolver(
    store: Store, resolver: DNSResolver, dns_server: Any
) -> None:
    dns_server.zone.set("oldmx.split.test", "A", ["192.0.2.7"])
    dns_server.zone.set("oldmx.split.test", "AAAA", ["2001:db8::7"])
    laptop = store.create_device("laptop", connector_smtp_addr="localhost:2525")
    store.create_route(
        "split.test",
        type="byod",
        connector_id=laptop.id,
        status="active",
        authoritative_hosts=[
            {"host": "gone.split.test", "port": 25, "tls_mode": "starttls"},
            {"host": "oldmx.split.test", "port": 2525, "tls_mode": "tls"},
            {"host": "192.0.2.9", "port": 25, "tls_mode": "none"},
        ],
    )
    store.add_byod_address("alice", "split.test", laptop.id)
    router = Router(store.resolve_recipient, resolver)

    target = router.target("bob@split.test", "inbound")
    # A host without an address is left out; the others keep their order, port and mode.
    assert target.hosts == (("192.0.2.7", 2525), ("2001:db8::7", 2525), ("192.0.2.9", 25))
    assert target.tls_modes == ("tls", "tls", "none")
    assert target.names == ("oldmx.split.test", "oldmx.split.test", "")
    assert target.where("192.0.2.9", 25) == "192.0.2.9:25"
    # `localhost` is the loopback (RFC 6761), never a DNS question.
    device = router.target("alice@split.test", "inbound")
    assert device.hosts == (("127.0.0.1", 2525), ("::1", 2525))
    assert not any(name == "localhost" for name, _type in dns_server.zone.queries)


def test_dns_failure_is_temporary_and_unknown_hosts_follow_rfc_5321(
    store: Store, resolver: DNSResolver, dns_server: Any
) -> None:
    router = Router(store.resolve_recipient, resolver)
    # An MX host that does not answer now: try again later.
    dns_server.zone.set("slow.test", "MX", [(10, "mx.slow.test")])
    dns_server.zone.set("mx.slow.test", "A", [HANG])
    dns_server.zone.set("mx.slow.test", "AAAA", [HANG])
    with pytest.raises(DNSTemporaryError):
        router.target("carol@slow.test", "dsn")
    # One MX host unknown (NXDOMAIN): the next one is used.
    dns_server.zone.set("half.test", "MX", [(10, "gone.half.test"), (20, "mx.half.test")])
    dns_server.zone.set("mx.half.test", "A", ["192.0.2.30"])
    target = router.target("carol@half.test", "dsn")
    assert target.hosts == (("192.0.2.30", 25),) and target.names == ("mx.half.test",)
    # Every MX host unknown: the MX records are unusable, a permanent error (RFC 5321 §5.1).
    dns_server.zone.set("dead.test", "MX", [(10, "gone.dead.test"), (20, "gone2.dead.test")])
    with pytest.raises(NoRoute) as caught:
        router.target("carol@dead.test", "dsn")
    assert caught.value.reply.startswith("550 5.4.4") and not caught.value.temporary


def test_unknown_old_mx_and_device_host_wait_for_their_route_to_be_fixed(
    store: Store, resolver: DNSResolver
) -> None:
    laptop = store.create_device("laptop", connector_smtp_addr="nowhere.tailnet.test:2525")
    store.create_route(
        "split.test",
        type="byod",
        connector_id=laptop.id,
        status="active",
        authoritative_hosts=[{"host": "gone.split.test", "port": 25, "tls_mode": "none"}],
    )
    store.add_byod_address("alice", "split.test", laptop.id)
    router = Router(store.resolve_recipient, resolver)
    for rcpt in ("bob@split.test", "alice@split.test"):
        with pytest.raises(NoRoute) as caught:
            router.target(rcpt, "inbound")
        assert caught.value.temporary, caught.value.reply
        assert caught.value.reply.startswith("451 4.4.4")


def test_route_soon_resolves_names_off_the_reactor(store: Store, resolver: DNSResolver) -> None:
    laptop = store.create_device("laptop", connector_smtp_addr="laptop.tailnet.test:2525")
    store.create_route("home.test", type="byod", connector_id=laptop.id, status="active")
    store.add_byod_address("alice", "home.test", laptop.id)
    store.add_byod_address("bob", "home.test", laptop.id)
    lookups = CachedLookups(store)
    router = Router(lookups.resolve_recipient, resolver)
    in_thread: list[tuple[Any, ...]] = []

    def run_blocking(fn: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
        in_thread.append(args)
        return defer.Deferred()  # the worker thread's answer, never needed here

    soon = route_soon(router, lookups, run_blocking)
    lookups.resolve_recipient("alice@home.test")  # the store's answer is cached
    assert isinstance(soon("alice@home.test", "inbound"), defer.Deferred)
    assert in_thread == [("alice@home.test", "inbound")]  # a name: DNS, in a thread
    store.update_device(laptop.id, connector_smtp_addr="100.64.0.7:2525")
    lookups.resolve_recipient("bob@home.test")
    target = soon("bob@home.test", "inbound")  # an address: answered at once
    assert not isinstance(target, defer.Deferred) and target.hosts == (("100.64.0.7", 2525),)
    assert len(in_thread) == 1
