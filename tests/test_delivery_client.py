"""SMTPDeliverer against a real SMTP peer outside tailpost (aiosmtpd) over loopback TCP, and its
mapping of Twisted's client results to per-recipient outcomes."""

from __future__ import annotations

import socket
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import defer
from twisted.mail.smtp import SMTPDeliveryError
from twisted.python.failure import Failure

from edge.delivery.client import SMTPDeliverer
from edge.delivery.outcomes import Outcome
from edge.delivery.outcomes import accepted as outcomes_accepted
from edge.delivery.outcomes import failed as outcomes_failed
from edge.delivery.routing import Target, routed_target
from edge.store.records import RecipientTarget
from edge.tls import ensure_self_signed
from tests.fakes import DownstreamMX, Peer, closed_port, mx_target, start_peer

SENDER = "carol@sender.test"
A = "alice@example.com"
B = "bob@example.com"
BODY = b"From: carol@sender.test\r\nTo: alice@example.com\r\nSubject: hi\r\n\r\nhello\r\n"


@pytest.fixture
def peer() -> Iterator[Peer]:
    started = start_peer(DownstreamMX())
    try:
        yield started
    finally:
        started.controller.stop()


def deliver(in_reactor: Any, target: Target, data: bytes, rcpts: list[str]) -> dict[str, Outcome]:
    deliverer = SMTPDeliverer(in_reactor.reactor, "edge.test", timeout=10)

    def run() -> defer.Deferred[dict[str, Outcome]]:
        return defer.ensureDeferred(deliverer.deliver(target, SENDER, rcpts, data))

    result: dict[str, Outcome] = in_reactor(run)
    return result


def test_delivers_the_exact_bytes(in_reactor: Any, peer: Peer) -> None:
    data = BODY + b".leading dot\r\n.\r\n..\r\n...three\r\n. \r\nend\r\n"

    outcomes = deliver(in_reactor, mx_target(peer.port), data, [A, B])

    assert set(outcomes) == {A, B}
    assert all(o.delivered and o.host == f"127.0.0.1:{peer.port}" for o in outcomes.values())
    [seen] = peer.handler.seen
    assert (seen.sender, seen.recipients) == (SENDER, [A, B])
    assert seen.data == data
    assert not seen.tls  # none offered


@pytest.mark.parametrize("shift", [0, 1, 2], ids=["dot-starts-chunk", "lf-dot", "crlf-dot"])
def test_a_dot_line_at_the_16k_boundary_does_not_end_the_data(
    in_reactor: Any, peer: Peer, shift: int
) -> None:
    # Twisted sends the data in 2**14-byte chunks; the "." line starts at the boundary, or
    # its CR LF (or the CR LF before it) is cut by it.
    head = BODY
    filler = []
    remaining = 2**14 - len(head) + shift
    while remaining > 0:
        n = min(remaining, 900)
        if 0 < remaining - n < 3:
            n -= 3
        filler.append(b"y" * (n - 2) + b"\r\n")
        remaining -= n
    data = head + b"".join(filler) + b".\r\nQUIT\r\nafter the dot line\r\n"
    assert data.index(b"\r\n.\r\n") + 2 == 2**14 + shift

    outcomes = deliver(in_reactor, mx_target(peer.port), data, [A])

    assert outcomes[A].delivered, outcomes
    [seen] = peer.handler.seen
    assert seen.data == data


def test_first_host_refusing_connections_falls_through_to_the_second(
    in_reactor: Any, peer: Peer
) -> None:
    dead = closed_port()

    outcomes = deliver(in_reactor, mx_target(dead, peer.port), BODY, [A])

    assert outcomes[A].delivered
    assert outcomes[A].host == f"127.0.0.1:{peer.port}"
    assert [s.data for s in peer.handler.seen] == [BODY]


def test_no_host_answering_is_temporary_and_not_connected(in_reactor: Any) -> None:
    outcomes = deliver(in_reactor, mx_target(closed_port(), closed_port()), BODY, [A, B])
    assert set(outcomes) == {A, B}
    assert all(o.code == 451 and not o.final and not o.connected for o in outcomes.values())


def test_550_at_rcpt_is_final_for_that_recipient_only(in_reactor: Any) -> None:
    handler = DownstreamMX(refuse={B: "550 5.1.1 <bob@example.com>: no such user"})
    peer = start_peer(handler)
    try:
        outcomes = deliver(in_reactor, mx_target(peer.port), BODY, [A, B])
    finally:
        peer.controller.stop()

    assert outcomes[A].delivered
    assert outcomes[B].code == 550 and outcomes[B].final and not outcomes[B].delivered
    assert "5.1.1" in outcomes[B].text
    [seen] = handler.seen
    assert seen.recipients == [A]
    assert seen.data == BODY


@pytest.mark.parametrize("refuse_b", [False, True])
def test_4xx_at_end_of_data_is_temporary_for_all(in_reactor: Any, refuse_b: bool) -> None:
    refuse = {B: "550 5.1.1 no such user"} if refuse_b else {}
    handler = DownstreamMX(refuse=refuse, data_reply="451 4.3.0 queue file write error")
    second = start_peer(DownstreamMX())
    peer = start_peer(handler)
    try:
        outcomes = deliver(in_reactor, mx_target(peer.port, second.port), BODY, [A, B])
    finally:
        peer.controller.stop()
        second.controller.stop()

    assert outcomes[A].code == 451 and not outcomes[A].final and not outcomes[A].delivered
    assert "4.3.0" in outcomes[A].text
    if refuse_b:
        assert outcomes[B].code == 550 and outcomes[B].final  # its own RCPT reply stands
    else:
        assert outcomes[B].code == 451 and not outcomes[B].final
    # The host answered the transaction: its word stands, the next host is not tried.
    assert second.handler.seen == []


def test_starttls_is_used_when_the_server_offers_it(in_reactor: Any, tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    ensure_self_signed(cert, key, "old-mx.test")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    handler = DownstreamMX()
    peer = start_peer(handler, context)
    try:
        outcomes = deliver(in_reactor, mx_target(peer.port), BODY, [A])
        plain = deliver(in_reactor, mx_target(peer.port, starttls=False), BODY, [A])
    finally:
        peer.controller.stop()

    assert outcomes[A].delivered and plain[A].delivered
    assert [s.tls for s in handler.seen] == [True, False]
    assert all(s.data == BODY for s in handler.seen)


def server_context(tmp_path: Path) -> ssl.SSLContext:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    ensure_self_signed(cert, key, "old-mx.test")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context


def upstream(*hosts: tuple[int, str]) -> Target:
    """A split domain's old MX hosts as the store gives them, each with its TLS mode."""
    found = RecipientTarget(
        kind="upstream",
        address=A,
        device_id=None,
        connector_smtp_addr="",
        connector_username=None,
        connector_secret=None,
        route_id="route_example_com",
        upstream_hosts=[{"host": "127.0.0.1", "port": p, "tls_mode": m} for p, m in hosts],
    )
    return routed_target(found)


def test_an_upstream_host_in_tls_mode_gets_tls_from_the_first_octet(
    in_reactor: Any, tmp_path: Path
) -> None:
    handler = DownstreamMX()
    peer = start_peer(handler, server_context(tmp_path), implicit=True)
    try:
        outcomes = deliver(in_reactor, upstream((peer.port, "tls")), BODY, [A])
    finally:
        peer.controller.stop()
    assert outcomes[A].delivered
    assert [s.tls for s in handler.seen] == [True]
    assert handler.seen[0].data == BODY


def test_an_upstream_host_in_none_mode_gets_no_starttls_even_if_offered(
    in_reactor: Any, tmp_path: Path
) -> None:
    handler = DownstreamMX()
    peer = start_peer(handler, server_context(tmp_path))
    try:
        plain = deliver(in_reactor, upstream((peer.port, "none")), BODY, [A])
        secured = deliver(in_reactor, upstream((peer.port, "starttls")), BODY, [A])
    finally:
        peer.controller.stop()
    assert plain[A].delivered and secured[A].delivered
    assert [s.tls for s in handler.seen] == [False, True]


def test_each_upstream_host_keeps_its_own_tls_mode(in_reactor: Any, tmp_path: Path) -> None:
    # The first host speaks plain SMTP but is listed with "tls": the handshake fails (a
    # temporary failure of that host), and the second, with STARTTLS, takes the message.
    first, second = DownstreamMX(), DownstreamMX()
    plain = start_peer(first)
    secured = start_peer(second, server_context(tmp_path))
    try:
        target = upstream((plain.port, "tls"), (secured.port, "starttls"))
        assert [target.tls_for("127.0.0.1", p) for p in (plain.port, secured.port)] == [
            "tls",
            "starttls",
        ]
        outcomes = deliver(in_reactor, target, BODY, [A])
    finally:
        plain.controller.stop()
        secured.controller.stop()
    assert outcomes[A].delivered and outcomes[A].host == f"127.0.0.1:{secured.port}"
    assert first.seen == [] and [s.tls for s in second.seen] == [True]


def test_the_client_sends_without_nagle(in_reactor: Any, peer: Peer) -> None:
    """The end of the data is a small write right after the data: held back by Nagle's
    algorithm until the peer acknowledges, it cost every transaction about 40 ms."""
    deliverer = SMTPDeliverer(in_reactor.reactor, "edge.test", timeout=10)
    target = mx_target(peer.port)

    def run() -> defer.Deferred[dict[str, Outcome]]:
        return defer.ensureDeferred(deliverer.deliver(target, SENDER, [A], BODY))

    assert in_reactor(run)[A].delivered
    [pool] = deliverer._pools.values()
    [session] = pool.idle  # kept for the next transaction
    transport: Any = session.transport
    sock = transport.getHandle()
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    in_reactor(deliverer.close)


def test_a_failure_without_a_reply_gives_no_exception_text_to_its_outcome() -> None:
    """An outcome's text can reach the sender in a report: an exception that came with no
    SMTP reply (a defect in setting up the session, say) is named, never quoted."""
    err = KeyError("connector secret s3cr3t at /var/lib/tailpost/data")
    outcomes = outcomes_failed(Failure(err), ["a@example.test"], "mx.example.test:25")
    [outcome] = outcomes.values()
    assert (outcome.code, outcome.final, outcome.connected) == (451, False, False)
    assert outcome.text == "4.4.1 delivery to mx.example.test:25 failed"


# -- SMTPDeliverer's mapping of Twisted's client results ------------------------------------

WHERE = "mx.x.test:25"


def test_accepted_result_maps_each_recipient() -> None:
    outcomes = outcomes_accepted(
        (1, [(b"a@x.test", 250, b"2.1.5 OK"), (b"<b@x.test>", 550, b"5.1.1 unknown")]), WHERE
    )
    assert outcomes == {
        "a@x.test": Outcome(250, "2.1.5 OK", WHERE),
        "b@x.test": Outcome(550, "5.1.1 unknown", WHERE),
    }
    assert outcomes["a@x.test"].delivered and outcomes["b@x.test"].final
    assert all(o.connected for o in outcomes.values())


def test_connection_error_is_temporary_for_every_recipient() -> None:
    outcomes = outcomes_failed(
        Failure(ConnectionRefusedError("refused")), ["a@x.test", "b@x.test"], WHERE
    )
    assert set(outcomes) == {"a@x.test", "b@x.test"}
    assert all(o.code == 451 and not o.final for o in outcomes.values())
    assert all(not o.connected and o.host == WHERE for o in outcomes.values())


def test_all_recipients_refused_keeps_their_codes() -> None:
    err = SMTPDeliveryError(
        550,
        b"No recipients accepted",
        b"",
        [(b"a@x.test", 550, b"no"), (b"b@x.test", 452, b"full")],
    )
    outcomes = outcomes_failed(Failure(err), ["a@x.test", "b@x.test"], WHERE)
    assert outcomes == {
        "a@x.test": Outcome(550, "no", WHERE),
        "b@x.test": Outcome(452, "full", WHERE),
    }


@pytest.mark.parametrize("code", [451, 554])
def test_failure_at_end_of_data_is_not_delivered(code: int) -> None:
    # Twisted's client: RCPT accepted (250) for one, refused for the other, then the
    # reply to the end of DATA is a refusal.
    err = SMTPDeliveryError(
        code,
        b"end of data refused",
        b"",
        [(b"a@x.test", 250, b"2.1.5 OK"), (b"b@x.test", 550, b"5.1.1 unknown")],
    )
    outcomes = outcomes_failed(Failure(err), ["a@x.test", "b@x.test"], WHERE)
    assert outcomes == {
        "a@x.test": Outcome(code, "end of data refused", WHERE),
        "b@x.test": Outcome(550, "5.1.1 unknown", WHERE),
    }
    assert not outcomes["a@x.test"].delivered


def test_failure_before_the_transaction_is_temporary() -> None:
    # e.g. AUTH refused (535) with no recipient tried: worth another try, never a bounce.
    err = SMTPDeliveryError(535, b"5.7.8 bad credentials", b"")
    outcomes = outcomes_failed(Failure(err), ["a@x.test"], WHERE)
    assert outcomes["a@x.test"].code == 451
    assert not outcomes["a@x.test"].final
    assert not outcomes["a@x.test"].connected  # the next host may be tried
