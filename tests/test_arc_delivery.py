"""The edge's ARC seal is made when a message is forwarded, not when it is accepted.

The deliverer seals the message as stored (the edge's Authentication-Results on top) right
before its data goes out to a device or an upstream host: the delivered copy carries an ARC
set that verifies against the edge's key, and an attempt that ends before DATA (target
unreachable, recipients refused) makes no signature at all.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
from twisted.internet import defer

from connector.receiver import dedup_key
from edge.checks import authresults
from edge.checks.arc import ARCSealer, verify_chain
from edge.checks.base import ARCResult, DKIMResult, DMARCResult, SPFResult, Transaction
from edge.delivery.client import SMTPDeliverer
from edge.delivery.outcomes import Outcome
from edge.delivery.routing import Target
from edge.dns.resolver import DNSResolver
from edge.spool.spool import QUEUE_ID_HEADER
from tests.fakes import DownstreamMX, Peer, closed_port, start_peer
from tests.test_checks_dkim import rsa_key

HOST = "mx.tailpost.test"
SENDER = "ann@good.test"
A = "alice@example.com"
B = "bob@example.com"


class CountingSealer(ARCSealer):
    """The edge's sealer, counting its seals (and failing them, when told to)."""

    def __init__(self, pem: bytes, fail: bool = False) -> None:
        super().__init__(pem, "tailpost", HOST, HOST)
        self.calls = 0
        self.threads: list[str] = []
        self.fail = fail

    def seal(self, message: bytes, timestamp: int | None = None) -> list[bytes]:
        self.calls += 1
        self.threads.append(threading.current_thread().name)
        if self.fail:
            raise RuntimeError("sealing broke")
        return super().seal(message, timestamp)


def stored_message() -> bytes:
    """A message as the MX spools it: the edge's headers on top of what the client sent."""
    tx = Transaction("192.0.2.1")
    tx.spf = SPFResult("pass", "good.test", "mailfrom", SENDER)
    tx.dkim = [DKIMResult("pass", "good.test", "s1", "abc+/def0123", "rsa-sha256")]
    tx.dmarc = DMARCResult("pass", "good.test", "none", "reject")
    tx.arc = ARCResult("none")
    return (
        authresults.header_bytes(HOST, tx)
        + b"X-Tailpost-Verdict: action=accept; spf=pass; dkim=pass; dmarc=pass; arc=none\r\n"
        + b"Received: from client.good.test ([192.0.2.1])\r\n\tby mx.tailpost.test (tailpost)"
        + b" with ESMTP id Q1; Fri, 20 Nov 2026 10:00:00 +0000\r\n"
        + b"From: Ann <ann@good.test>\r\nTo: alice@example.com\r\nSubject: sealed\r\n"
        + b"Date: Fri, 20 Nov 2026 10:00:00 +0000\r\nMessage-ID: <m1@good.test>\r\n\r\n"
        + b"Hello.\r\n.a line with a leading dot\r\n..\r\nBye.\r\n"
    )


def device_target(port: int) -> Target:
    return Target(
        kind="device",
        key=f"device:dev_1:127.0.0.1:{port}",
        hosts=(("127.0.0.1", port),),
        device_id="dev_1",
    )


@pytest.fixture(scope="module")
def key() -> tuple[bytes, str]:
    return rsa_key()


@pytest.fixture
def resolver(dns_server: Any, key: tuple[bytes, str]) -> DNSResolver:
    dns_server.zone.set(f"tailpost._domainkey.{HOST}", "TXT", [key[1]])
    return DNSResolver(["127.0.0.1"], dns_server.port, timeout=1.0)


@pytest.fixture
def peer() -> Iterator[Peer]:
    started = start_peer(DownstreamMX())
    try:
        yield started
    finally:
        started.controller.stop()


def deliver(
    in_reactor: Any, sealer: ARCSealer | None, target: Target, data: bytes, rcpts: list[str]
) -> dict[str, Outcome]:
    deliverer = SMTPDeliverer(in_reactor.reactor, "edge.test", timeout=10, sealer=sealer)

    def run() -> defer.Deferred[dict[str, Outcome]]:
        return defer.ensureDeferred(deliverer.deliver(target, SENDER, rcpts, data))

    outcomes: dict[str, Outcome] = in_reactor(run)
    in_reactor(deliverer.close)
    return outcomes


def test_delivered_copy_carries_an_arc_set_that_verifies(
    in_reactor: Any, resolver: DNSResolver, peer: Peer, key: tuple[bytes, str]
) -> None:
    sealer = CountingSealer(key[0])
    stored = stored_message()
    data = QUEUE_ID_HEADER + b": Q1\r\n" + stored

    outcomes = deliver(in_reactor, sealer, device_target(peer.port), data, [A, B])

    assert all(o.delivered for o in outcomes.values())
    [seen] = peer.handler.seen
    # The queue id stays the first line (the connector reads it there); the ARC set comes
    # next, on top of the message exactly as stored (dot lines and all).
    first, rest = seen.data.split(b"\r\n", 1)
    assert first == b"X-Tailpost-Queue-ID: Q1"
    assert rest.startswith(b"ARC-Seal: i=1; cv=none; a=rsa-sha256; d=mx.tailpost.test;")
    assert rest.endswith(stored)
    arc_set = rest[: -len(stored)]
    assert [line.split(b":")[0] for line in arc_set.split(b"\r\n") if line[:1].isalpha()] == [
        b"ARC-Seal",
        b"ARC-Message-Signature",
        b"ARC-Authentication-Results",
    ]
    assert b"ARC-Authentication-Results: i=1; mx.tailpost.test;\r\n spf=pass" in arc_set
    chain = verify_chain(resolver, rest)
    assert (chain.result, chain.instances) == ("pass", 1), chain.reason
    chain = verify_chain(resolver, seen.data)  # the queue id line is not signed
    assert (chain.result, chain.instances) == ("pass", 1), chain.reason
    assert verify_chain(resolver, rest.replace(b"Hello.", b"Hello!")).result == "fail"
    assert dedup_key(seen.data, [A, B]) == dedup_key(data, [A, B])
    # One seal for the delivery, made off the reactor thread.
    assert sealer.calls == 1
    assert sealer.threads != ["reactor"]


def test_upstream_target_is_sealed_and_mx_target_is_not(
    in_reactor: Any, resolver: DNSResolver, peer: Peer, key: tuple[bytes, str]
) -> None:
    sealer = CountingSealer(key[0])
    stored = stored_message()
    upstream = Target(kind="upstream", key="upstream:r1", hosts=(("127.0.0.1", peer.port),))
    deliver(in_reactor, sealer, upstream, stored, [A])
    mx = Target(kind="mx", key="mx:example.com", hosts=(("127.0.0.1", peer.port),))
    deliver(in_reactor, sealer, mx, stored, [A])

    sealed, plain = peer.handler.seen
    assert sealed.data.startswith(b"ARC-Seal: i=1;")
    chain = verify_chain(resolver, sealed.data)
    assert (chain.result, chain.instances) == ("pass", 1), chain.reason
    assert plain.data == stored
    assert sealer.calls == 1


def test_message_without_the_edge_results_goes_unsealed(
    in_reactor: Any, peer: Peer, key: tuple[bytes, str]
) -> None:
    sealer = CountingSealer(key[0])
    dsn = b"From: postmaster@mx.tailpost.test\r\nTo: ann@good.test\r\nSubject: x\r\n\r\nbody\r\n"
    deliver(in_reactor, sealer, device_target(peer.port), dsn, [A])
    [seen] = peer.handler.seen
    assert seen.data == dsn


@pytest.mark.parametrize("why", ["unreachable", "refused", "deferred"])
def test_an_attempt_that_ends_before_data_makes_no_signature(
    in_reactor: Any, key: tuple[bytes, str], why: str
) -> None:
    sealer = CountingSealer(key[0])
    data = QUEUE_ID_HEADER + b": Q2\r\n" + stored_message()
    if why == "unreachable":  # the device is offline
        outcomes = deliver(in_reactor, sealer, device_target(closed_port()), data, [A])
        assert outcomes[A].code == 451 and not outcomes[A].connected
    else:
        reply = "550 5.1.1 no such user" if why == "refused" else "450 4.2.1 try again later"
        peer = start_peer(DownstreamMX(refuse={A: reply, B: reply}))
        try:
            outcomes = deliver(in_reactor, sealer, device_target(peer.port), data, [A, B])
        finally:
            peer.controller.stop()
        assert {o.code for o in outcomes.values()} == {int(reply[:3])}
        assert peer.handler.seen == []
    assert sealer.calls == 0


def test_a_failing_seal_still_delivers_the_message_unsealed(
    in_reactor: Any, peer: Peer, key: tuple[bytes, str]
) -> None:
    sealer = CountingSealer(key[0], fail=True)
    stored = stored_message()
    outcomes = deliver(in_reactor, sealer, device_target(peer.port), stored, [A])
    assert outcomes[A].delivered
    [seen] = peer.handler.seen
    assert seen.data == stored
    assert sealer.calls == 1


def test_without_a_sealer_nothing_is_added(in_reactor: Any, peer: Peer) -> None:
    stored = stored_message()
    deliver(in_reactor, None, device_target(peer.port), stored, [A])
    [seen] = peer.handler.seen
    assert seen.data == stored


@pytest.mark.parametrize(
    "extra",
    [
        b"",
        b"Authentication-Results: other.test; spf=pass smtp.mailfrom=a@b.test\r\n",
        b"Authentication-Results: mx.tailpost.test; none\r\n",
        b"Authentication-Results: (c) mx.tailpost.test 1; spf=fail\r\n",  # authres's to read
        b'Authentication-Results: mx.tailpost.test; spf=pass smtp.mailfrom="a b"@x.test\r\n',
    ],
)
def test_seal_makes_the_same_set_as_dkimpy_sign(extra: bytes, key: tuple[bytes, str]) -> None:
    """The sealer's shortcut (key parsed once, the edge's own results read without authres)
    gives the very bytes of dkimpy's ARC.sign (PKCS#1 v1.5 signatures are deterministic)."""
    from edge.checks.arc import _SealingARC

    sealer = ARCSealer(key[0], "tailpost", HOST, HOST)
    message = extra + stored_message()
    fast = _SealingARC(message, sealer.key)
    slow = _SealingARC(message, sealer.key)
    assert fast.seal(sealer.selector, sealer.domain, key[0], sealer.authserv_id, 1700000000) == (
        slow.sign(
            sealer.selector,
            sealer.domain,
            key[0],
            sealer.authserv_id,
            slow.default_sign_headers(),
            timestamp=1700000000,
        )
    )
