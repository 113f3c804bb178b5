"""Every host name the reactor connects to goes through the configured resolver."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import pytest
from twisted.internet import defer, protocol
from twisted.internet.endpoints import HostnameEndpoint

from edge.dns.namehosts import use_configured_names
from edge.dns.resolver import DNSResolver


class Hello(protocol.Protocol):
    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(b"hello")
        self.transport.loseConnection()


class Collect(protocol.Protocol):
    def __init__(self) -> None:
        self.got = b""
        self.done: defer.Deferred[bytes] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.got += data

    def connectionLost(self, reason: Any = None) -> None:
        self.done.callback(self.got)


class CollectFactory(protocol.ClientFactory):
    def __init__(self) -> None:
        self.result: defer.Deferred[bytes] = defer.Deferred()

    def buildProtocol(self, addr: Any) -> Collect:
        proto = Collect()
        proto.done.chainDeferred(self.result)
        return proto

    def clientConnectionFailed(self, connector: Any, reason: Any) -> None:
        self.result.errback(reason)


@pytest.fixture
def named(in_reactor: Any, dns_server: Any) -> Iterator[tuple[Any, int]]:
    """The test reactor resolving through a resolver on the local DNS server (its own
    resolvers put back afterwards), and a server on 127.0.0.1 that says hello."""
    reactor = in_reactor.reactor
    saved = (reactor.nameResolver, reactor.resolver)
    resolver = DNSResolver(["127.0.0.1"], dns_server.port, 2.0, reactor=reactor)
    in_reactor(use_configured_names, reactor, resolver)
    factory = protocol.Factory.forProtocol(Hello)
    port = in_reactor(reactor.listenTCP, 0, factory, interface="127.0.0.1")
    try:
        yield dns_server, port.getHost().port
    finally:
        in_reactor(port.stopListening)

        def restore() -> None:
            reactor._nameResolver, reactor.resolver = saved

        in_reactor(restore)


def connect_tcp(in_reactor: Any, host: str, port: int) -> bytes:
    factory = CollectFactory()

    def start() -> defer.Deferred[bytes]:
        in_reactor.reactor.connectTCP(host, port, factory, timeout=5)
        return factory.result

    result: bytes = in_reactor(start)
    return result


def connect_endpoint(in_reactor: Any, host: str, port: int) -> bytes:
    async def run() -> bytes:
        endpoint = HostnameEndpoint(in_reactor.reactor, host, port, timeout=5)
        proto = Collect()
        await endpoint.connect(protocol.Factory.forProtocol(lambda: proto))
        return await proto.done

    result: bytes = in_reactor(lambda: defer.ensureDeferred(run()))
    return result


@pytest.mark.parametrize("connect", [connect_tcp, connect_endpoint])
def test_a_name_only_the_configured_dns_knows_is_reached(
    in_reactor: Any, named: tuple[Any, int], connect: Any
) -> None:
    dns_server, port = named
    dns_server.zone.set("web.names.test", "A", ["127.0.0.1"])
    assert connect(in_reactor, "web.names.test", port) == b"hello"
    assert ("web.names.test", "A") in dns_server.zone.queries


@pytest.mark.parametrize("connect", [connect_tcp, connect_endpoint])
def test_a_name_only_the_system_knows_is_not_reached(
    in_reactor: Any, named: tuple[Any, int], connect: Any
) -> None:
    """The machine's own name is in its hosts file, which the system resolver reads; the
    configured DNS has no record of it, and nothing falls back to the system."""
    dns_server, port = named
    own = socket.gethostname()
    try:
        system = socket.gethostbyname(own)
    except OSError:
        pytest.skip(f"the system resolver does not know {own} either")
    assert system
    with pytest.raises(Exception):  # noqa: B017 (Twisted reports it in several ways)
        connect(in_reactor, own, port)
    assert (own.lower(), "A") in dns_server.zone.queries


def test_localhost_and_addresses_are_never_asked(in_reactor: Any, named: tuple[Any, int]) -> None:
    dns_server, port = named
    assert connect_tcp(in_reactor, "localhost", port) == b"hello"
    assert connect_endpoint(in_reactor, "127.0.0.1", port) == b"hello"
    assert not any(name in ("localhost", "127.0.0.1") for name, _ in dns_server.zone.queries)
