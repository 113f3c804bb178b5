"""SMTPDeliverer's kept connections when things go wrong: a refusal, a transaction ended
mid-way, a connection the server closed or that died, a silent host, a cancelled delivery.
Against the counting aiosmtpd peer of tests/test_delivery_client_reuse.py over loopback TCP.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from twisted.internet import protocol

from edge.delivery.client import SMTPDeliverer
from edge.smtp import replies
from tests.test_delivery_client_reuse import (
    A,
    B,
    CountingMX,
    body,
    deliver,
    deliver_all,
    delivered,
    new_deliverer,
    start,
    target,
    wait_for,
)

# -- errors on a kept connection -------------------------------------------------------------


def test_550_at_end_of_data_then_250_on_the_same_connection(in_reactor: Any) -> None:
    peer = start(CountingMX(data_replies=["550 5.7.1 content refused"]))
    try:
        deliverer = new_deliverer(in_reactor)
        to = target(peer.port)
        first = deliver(in_reactor, deliverer, to, body(1), [A, B])
        second = deliver(in_reactor, deliverer, to, body(2), [A])
    finally:
        peer.controller.stop()

    assert first[A].code == 550 and first[B].code == 550 and first[A].final
    assert "5.7.1" in first[A].text and first[A].connected
    assert delivered(second) and second[A].code == 250
    assert peer.handler.connections == 1
    assert peer.handler.rsets == 0  # the end-of-data reply ended the first transaction
    assert [tx.data for tx in peer.handler.seen] == [body(1), body(2)]


def test_a_transaction_ended_mid_way_is_reset_before_the_next(in_reactor: Any) -> None:
    peer = start(CountingMX(refuse={B: "550 5.1.1 no such user"}))
    try:
        deliverer = new_deliverer(in_reactor)
        to = target(peer.port)
        refused = deliver(in_reactor, deliverer, to, body(1), [B])
        second = deliver(in_reactor, deliverer, to, body(2), [A])
        third = deliver(in_reactor, deliverer, to, body(3), [A])
    finally:
        peer.controller.stop()

    assert refused[B].code == 550 and refused[B].final and "5.1.1" in refused[B].text
    assert delivered(second) and delivered(third)
    assert peer.handler.connections == 1
    assert peer.handler.rsets == 1  # once, after the refused transaction; not after a 250
    assert [(tx.recipients, tx.data) for tx in peer.handler.seen] == [
        ([A], body(2)),
        ([A], body(3)),
    ]


def test_server_closing_an_idle_connection_is_transparent(in_reactor: Any) -> None:
    peer = start(CountingMX(), timeout=0.3)
    try:
        deliverer = new_deliverer(in_reactor)
        to = target(peer.port)
        first = deliver(in_reactor, deliverer, to, body(1), [A])
        wait_for(lambda: peer.handler.closed == 1)  # the server's idle timeout
        wait_for(lambda: deliverer.idle_count(to, "127.0.0.1", peer.port) == 0)
        second = deliver(in_reactor, deliverer, to, body(2), [A])
    finally:
        peer.controller.stop()

    assert delivered(first) and delivered(second), (first, second)
    assert peer.handler.connections == 2
    assert [tx.data for tx in peer.handler.seen] == [body(1), body(2)]


@pytest.mark.parametrize("how", ["silent-close", "421"])
def test_a_dead_kept_connection_is_retried_on_a_new_one(in_reactor: Any, how: str) -> None:
    handler = CountingMX()
    peer = start(handler)

    def second_mail_on_first_connection(server: Any, n: int) -> str | None:
        # The connection dies when it is reused, before the server could take anything.
        if server.connection_number == 1 and n == 2:
            peer.close_connection(server)
            return "421 4.3.2 shutting down" if how == "421" else "250 2.1.0 OK"
        return None

    handler.on_mail = second_mail_on_first_connection
    try:
        deliverer = new_deliverer(in_reactor)
        to = target(peer.port)
        first = deliver(in_reactor, deliverer, to, body(1), [A, B])
        second = deliver(in_reactor, deliverer, to, body(2), [A, B])
    finally:
        peer.controller.stop()

    assert delivered(first)
    assert delivered(second), second  # never reported as a failure of the message
    assert handler.connections == 2
    assert [(tx.connection, tx.data) for tx in handler.seen] == [(1, body(1)), (2, body(2))]


def test_a_dead_kept_connection_is_retried_only_once(in_reactor: Any) -> None:
    handler = CountingMX()
    peer = start(handler)

    def only_the_very_first_mail(server: Any, n: int) -> str | None:
        if (server.connection_number, n) != (1, 1):
            peer.close_connection(server)
            return "421 4.3.2 shutting down"
        return None

    handler.on_mail = only_the_very_first_mail
    try:
        deliverer = new_deliverer(in_reactor)
        to = target(peer.port)
        first = deliver(in_reactor, deliverer, to, body(1), [A])
        second = deliver(in_reactor, deliverer, to, body(2), [A])
    finally:
        peer.controller.stop()

    assert delivered(first)
    # The fresh connection failed too: that is the host's answer, temporary, not a bounce.
    assert second[A].code == 451 and not second[A].final and not second[A].connected
    assert handler.connections == 2  # the kept one, then exactly one fresh one
    assert [tx.data for tx in handler.seen] == [body(1)]


def test_a_new_connection_failing_is_the_hosts_answer(in_reactor: Any) -> None:
    handler = CountingMX()
    peer = start(handler)

    def hang_up(server: Any, n: int) -> str | None:
        peer.close_connection(server)
        return "421 4.3.2 shutting down"

    handler.on_mail = hang_up
    try:
        outcomes = deliver(in_reactor, new_deliverer(in_reactor), target(peer.port), body(1), [A])
    finally:
        peer.controller.stop()

    # Only a kept connection gets a second chance here; the queue retries the rest later.
    assert outcomes[A].code == 451 and not outcomes[A].final and not outcomes[A].connected
    assert handler.connections == 1


def test_a_connection_lost_after_the_data_is_not_sent_again(in_reactor: Any) -> None:
    handler = CountingMX()
    peer = start(handler)
    data_calls: list[int] = []

    def lose_the_reply_to_the_second(server: Any, n: int) -> str | None:
        data_calls.append(n)
        if n == 2:  # the whole message arrived; the reply is lost
            server.transport.abort()
            return "250 2.0.0 never seen"
        return None

    handler.on_data = lose_the_reply_to_the_second
    try:
        deliverer = new_deliverer(in_reactor)
        to = target(peer.port)
        first = deliver(in_reactor, deliverer, to, body(1), [A])
        second = deliver(in_reactor, deliverer, to, body(2), [A])
    finally:
        peer.controller.stop()

    assert delivered(first)
    # Maybe delivered: the queue retries later (the connector deduplicates by queue id);
    # sending it again now, on a fresh connection, is not ours to decide.
    assert second[A].code == 451 and not second[A].final and not second[A].connected
    assert data_calls == [1, 2]
    assert handler.connections == 1


def test_a_silent_host_is_not_waited_on_once_per_delivery(in_reactor: Any) -> None:
    """Accepts TCP, never greets: the waiting deliveries share the first one's timeout."""
    accepted: list[protocol.Protocol] = []

    class Silent(protocol.Protocol):
        def connectionMade(self) -> None:
            accepted.append(self)

    factory = protocol.Factory.forProtocol(Silent)
    port = in_reactor(in_reactor.reactor.listenTCP, 0, factory, interface="127.0.0.1")
    try:
        deliverer = SMTPDeliverer(in_reactor.reactor, "edge.test", timeout=0.5, max_connections=1)
        to = target(port.getHost().port)
        started = time.monotonic()
        results = deliver_all(in_reactor, deliverer, [(to, [A], body(n)) for n in range(4)])
        took = time.monotonic() - started
    finally:
        in_reactor(port.stopListening)

    assert all(r[A].code == 451 and not r[A].final and not r[A].connected for r in results), results
    timed_out = replies.D451_TIMED_OUT.format(where=results[0][A].host)
    assert results[0][A].text == timed_out.detail
    assert len(accepted) == 1
    assert took < 1.5
