"""Connection counts for the MX's limits (`edge.smtp.conncount`), alone and shared."""

from __future__ import annotations

import os
from typing import Any

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from edge.smtp.conncount import BUCKETS, LocalCounts, SharedCounts, bucket
from edge.smtp.factory import SMTPServerFactory
from edge.smtp.server import Limits
from tests.test_smtp_server import FakeHandler


def test_local_counts_in_all_and_by_address() -> None:
    counts = LocalCounts()
    assert counts.add("192.0.2.1") == (1, 1)
    assert counts.add("192.0.2.1") == (2, 2)
    assert counts.add("192.0.2.2") == (3, 1)
    counts.remove("192.0.2.1")
    assert counts.add("192.0.2.1") == (3, 2)
    counts.remove("198.51.100.9")  # never counted: nothing changes
    assert (counts.total, counts.per_ip) == (3, {"192.0.2.1": 2, "192.0.2.2": 1})


def test_processes_see_each_others_connections() -> None:
    first = SharedCounts.create(3)
    try:
        second = SharedCounts(first.fd, 1, 3)
        third = SharedCounts(first.fd, 2, 3)
        assert first.add("192.0.2.1") == (1, 1)
        assert second.add("192.0.2.1") == (2, 2)
        assert third.add("192.0.2.2") == (3, 1)
        assert third.add("192.0.2.1") == (4, 3)
        second.remove("192.0.2.1")
        assert first.add("192.0.2.1") == (4, 3)
        # Removing what was never counted here leaves the others' figures alone.
        first.remove("198.51.100.9")
        assert second.add("198.51.100.9") == (5, 1)
    finally:
        os.close(first.fd)


def test_a_cleared_region_no_longer_counts() -> None:
    edge = SharedCounts.create(2)
    try:
        acceptor = SharedCounts(edge.fd, 1, 2)
        for _ in range(5):
            acceptor.add("192.0.2.1")
        assert edge.add("192.0.2.1") == (6, 6)
        edge.clear(1)  # the acceptor ended
        assert edge.add("192.0.2.1") == (2, 2)
        again = SharedCounts(edge.fd, 1, 2)  # its successor starts from nothing
        assert again.add("192.0.2.1") == (3, 3)
    finally:
        os.close(edge.fd)


def test_buckets_are_the_same_in_every_process_and_spread() -> None:
    # crc32, not the salted `hash`: a fixed value for a fixed address.
    assert bucket("192.0.2.1") == 3680567351 % BUCKETS
    assert len({bucket(f"10.0.{i // 256}.{i % 256}") for i in range(1000)}) > 950


def test_a_slot_outside_the_memory_is_refused() -> None:
    edge = SharedCounts.create(2)
    try:
        with pytest.raises(ValueError):
            SharedCounts(edge.fd, 2, 2)
    finally:
        os.close(edge.fd)


def test_the_per_address_limit_holds_over_two_factories_sharing_counts() -> None:
    """Two processes' listeners, as the kernel spreads one client's connections over them."""
    edge = SharedCounts.create(2)
    try:
        limits = Limits(max_connections=4, max_connections_per_ip=2)
        handler = FakeHandler()
        factories = [
            SMTPServerFactory(lambda: handler, limits, "mx.test", Clock(), counts=counts)
            for counts in (edge, SharedCounts(edge.fd, 1, 2))
        ]

        held: dict[str, Any] = {}

        def connect(factory: SMTPServerFactory, ip: str, name: str = "") -> bytes:
            proto = factory.buildProtocol(None)
            transport = StringTransport(peerAddress=IPv4Address("TCP", ip, 1))
            proto.makeConnection(transport)
            code = transport.value()[:3]
            if code == b"421":  # refused and closed, as a real transport would
                proto.connectionLost()
            held[name] = proto
            return code

        assert connect(factories[0], "192.0.2.9") == b"220"
        assert connect(factories[1], "192.0.2.9", "second") == b"220"
        assert connect(factories[0], "192.0.2.9") == b"421"  # a third, in either process
        assert connect(factories[1], "192.0.2.9") == b"421"
        # Other addresses, up to the total of four over both processes.
        assert connect(factories[1], "198.51.100.1") == b"220"
        assert connect(factories[0], "198.51.100.2") == b"220"
        assert connect(factories[1], "198.51.100.3") == b"421"
        # One of the client's connections ends, in the other process: room for one more.
        held["second"].connectionLost()
        assert connect(factories[0], "192.0.2.9") == b"220"
    finally:
        os.close(edge.fd)
