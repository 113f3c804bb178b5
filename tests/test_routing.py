"""Where each recipient goes: `Router` over a real store and a local DNS server, and split
routing end to end (the edge's MX, a device connector and an aiosmtpd "old MX" in-process)."""

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
from edge.delivery.routing import NoRoute, Router, Target
from edge.dns.resolver import DNSResolver, DNSTemporaryError
from edge.inbound.policy import MXHandler
from edge.smtp.factory import SMTPServerFactory
from edge.smtp.server import Limits
from edge.spool.spool import Spool
from edge.store import Device, Store, open_store
from edge.store.keyring import StoreKeys
from maildir import Maildir, MessageInfo
from tests.dnsserver import HANG
from tests.fakes import DownstreamMX, Peer, start_peer

OLD_MX = [
    {"host": "mx1.old-provider.test", "port": 25, "tls_mode": "starttls"},
    {"host": "mx2.old-provider.test", "port": 2525, "tls_mode": "none"},
]


@dataclass
class World:
    store: Store
    laptop: Device
    router: Router


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


@pytest.fixture
def world(store: Store, resolver: DNSResolver, dns_server: Any) -> World:
    dns_server.zone.set("mx1.old-provider.test", "A", ["192.0.2.1"])
    dns_server.zone.set("mx2.old-provider.test", "A", ["192.0.2.2"])
    dns_server.zone.set("mx2.old-provider.test", "AAAA", ["2001:db8::2"])
    laptop = store.create_device(
        "laptop",
        connector_smtp_addr="100.64.0.7:2525",
        connector_username="edge-laptop",
        connector_secret="laptop-secret",
    )
    store.create_route(
        "example.com",
        type="byod",
        connector_id=laptop.id,
        status="active",
        authoritative_hosts=OLD_MX,
    )
    store.add_byod_address("alice", "example.com", laptop.id)
    return World(store, laptop, Router(store.resolve_recipient, resolver, mx_port=25))


def test_assigned_address_goes_to_its_device(world: World) -> None:
    for kind in ("inbound", "outbound", "dsn"):  # a DSN for a device's mail goes home too
        target = world.router.target("Alice@Example.COM", kind)
        assert target == Target(
            kind="device",
            key=f"device:{world.laptop.id}:100.64.0.7:2525",
            hosts=(("100.64.0.7", 2525),),
            username="edge-laptop",
            secret="laptop-secret",
            starttls=True,  # where offered: this device sent no pin of its connector's key
            device_id=world.laptop.id,
        )
        assert "laptop-secret" not in repr(target)


def test_other_address_on_a_split_domain_goes_to_the_old_mx(world: World) -> None:
    route = world.store.get_route_by_domain("example.com")
    assert route is not None
    target = world.router.target("bob@example.com", "inbound")
    assert target.kind == "upstream"
    assert target.key == f"upstream:{route.id}"
    # Each host's addresses (A, then AAAA) through the configured resolver, in order, with
    # the host's name and TLS mode beside them.
    assert target.hosts == (("192.0.2.1", 25), ("192.0.2.2", 2525), ("2001:db8::2", 2525))
    assert target.names == ("mx1.old-provider.test",) + ("mx2.old-provider.test",) * 2
    assert target.tls_modes == ("starttls", "none", "none")
    assert target.where("2001:db8::2", 2525) == "mx2.old-provider.test[2001:db8::2]:2525"
    assert target.starttls
    assert target.username is None and target.secret is None and target.device_id is None
    # Same target, so the recipients share one transaction.
    assert world.router.target("carol@example.com", "inbound").key == target.key


def test_priority_order_of_the_old_mx_hosts_is_kept(world: World) -> None:
    route = world.store.get_route_by_domain("example.com")
    assert route is not None
    world.store.update_route(route.id, authoritative_hosts=list(reversed(OLD_MX)))
    target = world.router.target("bob@example.com", "inbound")
    assert target.names == ("mx2.old-provider.test",) * 2 + ("mx1.old-provider.test",)
    assert target.hosts == (("192.0.2.2", 2525), ("2001:db8::2", 2525), ("192.0.2.1", 25))


def test_unknown_domain_on_inbound_mail_has_no_route(world: World, dns_server: Any) -> None:
    dns_server.zone.set("unknown.test", "MX", [(10, "mx.unknown.test")])
    with pytest.raises(NoRoute) as caught:
        world.router.target("someone@unknown.test", "inbound")
    assert caught.value.reply.startswith("5")
    assert not caught.value.temporary
    assert dns_server.zone.queries == []  # inbound mail never goes out to an MX


def test_device_without_connector_address_is_a_temporary_no_route(world: World) -> None:
    world.store.update_device(world.laptop.id, connector_smtp_addr="")
    with pytest.raises(NoRoute) as caught:
        world.router.target("alice@example.com", "inbound")
    assert caught.value.temporary
    assert caught.value.reply.startswith("451 ")


def test_dsn_to_an_outside_sender_goes_to_its_mx(world: World, dns_server: Any) -> None:
    dns_server.zone.set("sender.test", "MX", [(20, "backup.sender.test"), (10, "mx.sender.test")])
    dns_server.zone.set("mx.sender.test", "A", ["192.0.2.10"])
    dns_server.zone.set("backup.sender.test", "AAAA", ["2001:db8::20"])
    target = world.router.target("carol@Sender.Test", "dsn")
    assert target == Target(
        kind="mx",
        key="mx:sender.test",
        hosts=(("192.0.2.10", 25), ("2001:db8::20", 25)),
        starttls=True,
        tls_modes=("starttls", "starttls"),
        names=("mx.sender.test", "backup.sender.test"),
    )
    assert ("sender.test", "MX") in dns_server.zone.queries


def test_mx_port_comes_from_the_router(
    store: Store, resolver: DNSResolver, dns_server: Any
) -> None:
    dns_server.zone.set("sender.test", "MX", [(10, "mx.sender.test")])
    dns_server.zone.set("mx.sender.test", "A", ["192.0.2.10"])
    target = Router(store.resolve_recipient, resolver, mx_port=2526).target("c@sender.test", "dsn")
    assert target.hosts == (("192.0.2.10", 2526),)


def test_domain_without_mx_falls_back_to_its_address(world: World, dns_server: Any) -> None:
    dns_server.zone.set("plain.test", "A", ["192.0.2.80"])
    target = world.router.target("carol@plain.test", "outbound")
    assert target.kind == "mx"
    assert target.hosts == (("192.0.2.80", 25),)
    assert target.names == ("plain.test",)


def test_domain_without_mx_or_address_has_no_route(world: World, dns_server: Any) -> None:
    with pytest.raises(NoRoute) as caught:
        world.router.target("carol@nowhere.test", "dsn")  # NXDOMAIN
    assert not caught.value.temporary
    assert caught.value.reply.startswith("550 5.1.2")


def test_null_mx_is_a_permanent_no_route(world: World, dns_server: Any) -> None:
    dns_server.zone.set("nullmx.test", "MX", [(0, "")])  # RFC 7505: exchange "." (root)
    dns_server.zone.set("nullmx.test", "A", ["192.0.2.81"])  # the A record must not be used
    with pytest.raises(NoRoute) as caught:
        world.router.target("carol@nullmx.test", "dsn")
    assert not caught.value.temporary
    assert caught.value.reply.startswith("556 5.1.10")


def test_dns_timeout_is_a_temporary_error(world: World, dns_server: Any) -> None:
    dns_server.zone.set("slow.test", "MX", [HANG])
    started = time.monotonic()
    with pytest.raises(DNSTemporaryError):
        world.router.target("carol@slow.test", "dsn")
    assert time.monotonic() - started < 10


# -- split routing end to end ----------------------------------------------------------------

USER = "edge-laptop"
PASSWORD = "laptop secret"


@dataclass
class Site:
    """The edge's MX and queue, the laptop's connector, and the domain's old MX."""

    mx_port: int
    maildir: Maildir
    old_mx: Peer
    queue: DeliveryQueue


def _wait_for(predicate: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("not delivered in time")
        time.sleep(0.02)


@pytest.fixture
def site(in_reactor: Any, tmp_path: Path, store: Store) -> Iterator[Site]:
    reactor = in_reactor.reactor
    old_mx = start_peer(DownstreamMX())
    maildir = Maildir(tmp_path / "laptop-mail", hostname="laptop.test")
    delivered: list[MessageInfo] = []
    connector = SMTPServerFactory(
        lambda: ConnectorHandler(maildir, USER, PASSWORD, threads.deferToThread, delivered.append),
        Limits(),
        "laptop.test",
        reactor,
    )
    connector_port = in_reactor(reactor.listenTCP, 0, connector, interface="127.0.0.1")
    laptop = store.create_device(
        "laptop",
        connector_smtp_addr=f"127.0.0.1:{connector_port.getHost().port}",
        connector_username=USER,
        connector_secret=PASSWORD,
    )
    store.create_route(
        "example.com",
        type="byod",
        connector_id=laptop.id,
        status="active",
        authoritative_hosts=[{"host": "127.0.0.1", "port": old_mx.port, "tls_mode": "none"}],
    )
    store.add_byod_address("alice", "example.com", laptop.id)

    spool = Spool(tmp_path / "spool")
    router = Router(store.resolve_recipient, None)
    queue = DeliveryQueue(
        spool,
        router.target,
        SMTPDeliverer(reactor, "edge.test", timeout=10),
        reactor,
        [1.0, 2.0],
        hostname="edge.test",
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

    mx = SMTPServerFactory(handler, Limits(), "edge.test", reactor)
    mx_port = in_reactor(reactor.listenTCP, 0, mx, interface="127.0.0.1")
    try:
        yield Site(mx_port.getHost().port, maildir, old_mx, queue)
    finally:
        in_reactor(queue.stop)
        in_reactor(
            lambda: defer.gatherResults([mx_port.stopListening(), connector_port.stopListening()])
        )
        old_mx.controller.stop()


def _inbox(maildir: Maildir) -> list[bytes]:
    return [p.read_bytes() for p in sorted((maildir.root / "new").iterdir())]


def _message(to: str) -> bytes:
    return (
        f"From: carol@sender.test\r\nTo: {to}\r\nSubject: for {to}\r\n\r\nhello {to}\r\n".encode()
    )


def _send(port: int, rcpts: list[str], data: bytes) -> dict[str, tuple[int, bytes]]:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.ehlo("client.sender.test")
        code, _ = client.mail("carol@sender.test")
        assert code == 250
        refused = {}
        accepted = []
        for rcpt in rcpts:
            code, text = client.rcpt(rcpt)
            if code == 250:
                accepted.append(rcpt)
            else:
                refused[rcpt] = (code, text)
        if accepted:
            code, text = client.data(data)
            assert code == 250, text
    return refused


def test_byod_address_reaches_the_device_maildir(site: Site) -> None:
    data = _message("alice@example.com")
    assert _send(site.mx_port, ["alice@example.com"], data) == {}

    _wait_for(lambda: len(_inbox(site.maildir)) == 1)
    [stored] = _inbox(site.maildir)
    assert stored.startswith(
        b"Return-Path: <carol@sender.test>\r\nDelivered-To: alice@example.com\r\n"
        b"X-Tailpost-Queue-ID: "
    )
    assert stored.endswith(data)
    assert b"\r\nReceived: from client.sender.test" in stored
    assert site.old_mx.handler.seen == []


def test_unknown_domain_is_refused_at_rcpt(site: Site) -> None:
    refused = _send(site.mx_port, ["someone@unknown.test"], _message("someone@unknown.test"))
    [(code, text)] = refused.values()
    assert code == 550
    assert text.startswith(b"5.1.1")
    time.sleep(0.2)
    assert _inbox(site.maildir) == [] and site.old_mx.handler.seen == []


def test_other_address_on_the_split_domain_reaches_the_old_mx(site: Site) -> None:
    data = _message("bob@example.com")
    assert _send(site.mx_port, ["bob@example.com", "alice@example.com"], data) == {}

    _wait_for(lambda: len(site.old_mx.handler.seen) == 1 and len(_inbox(site.maildir)) == 1)
    [seen] = site.old_mx.handler.seen
    assert seen.sender == "carol@sender.test"
    assert seen.recipients == ["bob@example.com"]
    assert not seen.data.startswith(b"X-Tailpost-Queue-ID")  # only for the device
    assert seen.data.startswith(b"Received: from client.sender.test")
    assert seen.data.endswith(data)
    [stored] = _inbox(site.maildir)
    assert stored.endswith(data)


def test_route_soon_answers_from_the_cache_and_loads_in_a_thread_otherwise(
    store: Store, world: World, resolver: DNSResolver
) -> None:
    from edge.delivery.routing import route_soon
    from edge.store.cache import CachedLookups

    lookups = CachedLookups(store)
    router = Router(lookups.resolve_recipient, resolver, mx_port=25)
    loaded: list[tuple[str, str]] = []

    def in_thread(fn: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
        loaded.append(args)
        return defer.execute(fn, *args)  # the thread's work, done here for the test

    soon = route_soon(router, lookups, in_thread)
    first = soon("alice@example.com", "inbound")  # cold cache: loaded off the reactor
    assert loaded == [("alice@example.com", "inbound")]
    second = soon("alice@example.com", "inbound")  # warm: answered at once, no thread
    assert loaded == [("alice@example.com", "inbound")]
    assert isinstance(first, defer.Deferred) and first.called
    results: list[Any] = []
    first.addCallback(results.append)
    assert isinstance(second, Target) and results == [second]
    assert second.device_id == world.laptop.id
    # A device the cache knows to be unreachable: NoRoute at once, no thread, no Deferred.
    world.store.update_device(world.laptop.id, connector_smtp_addr="")
    lookups.resolve_recipient("alice@example.com")
    with pytest.raises(NoRoute) as caught:
        soon("alice@example.com", "inbound")
    assert caught.value.temporary and len(loaded) == 1
    # Unknown to the store (cached as such): the MX route needs DNS, so it goes to a thread.
    lookups.resolve_recipient("someone@elsewhere.test")
    failed = soon("someone@elsewhere.test", "inbound")
    assert isinstance(failed, defer.Deferred)
    assert loaded[-1] == ("someone@elsewhere.test", "inbound")
    errors: list[Any] = []
    failed.addErrback(errors.append)
    assert errors and errors[0].check(NoRoute)
