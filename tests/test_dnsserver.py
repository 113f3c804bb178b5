"""The test DNS server's port pair: a UDP port already taken means a fresh pair, not a failure."""

from __future__ import annotations

import socket
from typing import Any

import pytest
from twisted.internet.error import CannotListenError

from edge.dns.resolver import DNSResolver
from tests.dnsserver import LocalDNSServer


class TakesUDPAfterTCP:
    """The real reactor, except that the first `times` TCP ports it hands out have their
    number taken for UDP at once (by a real socket), as another process might."""

    def __init__(self, reactor: Any, times: int) -> None:
        self.reactor = reactor
        self.times = times
        self.taken: list[socket.socket] = []

    def listenTCP(self, *args: Any, **kwargs: Any) -> Any:  # noqa: N802
        port = self.reactor.listenTCP(*args, **kwargs)
        if len(self.taken) < self.times:
            blocker = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            blocker.bind(("127.0.0.1", port.getHost().port))
            self.taken.append(blocker)
        return port

    def listenUDP(self, *args: Any, **kwargs: Any) -> Any:  # noqa: N802
        return self.reactor.listenUDP(*args, **kwargs)

    def close(self) -> None:
        for blocker in self.taken:
            blocker.close()


def test_a_taken_udp_port_means_a_fresh_pair(in_reactor: Any) -> None:
    racing = TakesUDPAfterTCP(in_reactor.reactor, times=2)
    try:
        server = in_reactor(LocalDNSServer, racing)
        try:
            taken = {b.getsockname()[1] for b in racing.taken}
            assert len(taken) == 2 and server.port not in taken
            assert server.udp.getHost().port == server.tcp.getHost().port == server.port
            server.zone.set("pair.test", "A", ["192.0.2.9"])
            resolver = DNSResolver(["127.0.0.1"], port=server.port, timeout=2.0)
            assert resolver.addresses("pair.test") == ["192.0.2.9"]
        finally:
            in_reactor(server.stop)
    finally:
        racing.close()


def test_it_gives_up_after_its_tries(in_reactor: Any) -> None:
    racing = TakesUDPAfterTCP(in_reactor.reactor, times=3)
    try:
        with pytest.raises(CannotListenError):
            in_reactor(LocalDNSServer, racing, 3)
    finally:
        racing.close()
