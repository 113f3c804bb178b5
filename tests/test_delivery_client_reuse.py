"""SMTPDeliverer reuses connections per target: against aiosmtpd over loopback TCP.

The peer counts its connections (and the RSETs, QUITs and closes on them) and records on
which connection each transaction arrived, as whom it was authenticated, and its bytes.
"""

from __future__ import annotations

import asyncio
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword
from twisted.internet import defer, task

from edge.delivery.client import SMTPDeliverer
from edge.delivery.outcomes import Outcome
from edge.delivery.routing import Target
from edge.tls import ensure_self_signed
from tests.fakes import AnyPortController, Peer, start_peer

SENDER = "carol@sender.test"
A = "alice@example.com"
B = "bob@example.com"


def body(n: int) -> bytes:
    return (
        f"From: carol@sender.test\r\nTo: alice@example.com\r\nSubject: message {n}\r\n\r\n"
        f".dot line of {n}\r\n.\r\n..\r\nend {n}\r\n"
    ).encode()


@dataclass
class Tx:
    """One transaction as the peer saw it."""

    connection: int
    login: str | None
    password: str | None
    sender: str
    recipients: list[str]
    data: bytes
    tls: bool = False


@dataclass
class CountingMX:
    """An aiosmtpd handler recording connections and transactions; replies as told.

    `data_replies` are used one per DATA (then 250); `on_mail` / `on_data` may act on the
    connection (e.g. close it) and return a reply to send instead of the normal one.
    """

    refuse: dict[str, str] = field(default_factory=dict)
    data_replies: list[str] = field(default_factory=list)
    on_mail: Callable[[Any, int], str | None] | None = None
    on_data: Callable[[Any, int], str | None] | None = None
    connections: int = 0
    open_now: int = 0
    max_open: int = 0
    closed: int = 0
    rsets: int = 0
    quits: int = 0
    transactions: dict[int, int] = field(default_factory=dict)  # per connection: MAIL seen
    seen: list[Tx] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    async def handle_EHLO(
        self, server: Any, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        # A session counts from its first EHLO (aiosmtpd's own readiness probe never says it).
        session.host_name = hostname
        if server.connection_number == 0:
            server.connection_number = self.opened()
        return responses

    def opened(self) -> int:
        with self.lock:
            self.connections += 1
            self.open_now += 1
            self.max_open = max(self.max_open, self.open_now)
            return self.connections

    def lost(self) -> None:
        with self.lock:
            self.open_now -= 1
            self.closed += 1

    async def handle_MAIL(
        self, server: Any, session: Any, envelope: Any, address: str, options: Any
    ) -> str:
        number = server.connection_number
        self.transactions[number] = self.transactions.get(number, 0) + 1
        if self.on_mail is not None:
            reply = self.on_mail(server, self.transactions[number])
            if reply is not None:
                return reply
        envelope.mail_from = address
        return "250 2.1.0 OK"

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: Any
    ) -> str:
        if address in self.refuse:
            return self.refuse[address]
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self.on_data is not None:
            reply = self.on_data(server, self.transactions[server.connection_number])
            if reply is not None:
                return reply
        auth = session.auth_data
        login = auth.login.decode() if isinstance(auth, LoginPassword) else None
        password = auth.password.decode() if isinstance(auth, LoginPassword) else None
        data = envelope.original_content
        assert isinstance(data, bytes)
        self.seen.append(
            Tx(
                server.connection_number,
                login,
                password,
                envelope.mail_from,
                list(envelope.rcpt_tos),
                data,
                session.ssl is not None,
            )
        )
        return self.data_replies.pop(0) if self.data_replies else "250 2.0.0 queued"

    async def handle_RSET(self, server: Any, session: Any, envelope: Any) -> str:
        self.rsets += 1
        return "250 2.0.0 OK"

    async def handle_QUIT(self, server: Any, session: Any, envelope: Any) -> str:
        self.quits += 1
        return "221 2.0.0 Bye"


class CountingSMTP(SMTP):
    """aiosmtpd's server, numbered (from 1) by its handler at the first EHLO."""

    connection_number = 0

    def connection_lost(self, error: Exception | None) -> None:
        super().connection_lost(error)
        if self.connection_number:
            self.event_handler.lost()


class CountingController(AnyPortController):
    def factory(self) -> SMTP:
        return CountingSMTP(self.handler, **self.SMTP_kwargs)


def accept_any(server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> AuthResult:
    return AuthResult(success=True, auth_data=data)


class CountingPeer(Peer):
    def close_connection(self, server: Any) -> None:
        """Close `server`'s connection from the peer's loop, after what it is writing now."""
        loop: asyncio.AbstractEventLoop = self.controller.loop
        loop.call_soon(server.transport.close)


def start(handler: CountingMX, **kwargs: Any) -> CountingPeer:
    started = start_peer(
        handler,
        controller=CountingController,
        server_hostname="mx.test",
        authenticator=accept_any,
        auth_require_tls=False,
        **kwargs,
    )
    return CountingPeer(started.handler, started.controller)


@pytest.fixture
def peer() -> Iterator[CountingPeer]:
    started = start(CountingMX())
    try:
        yield started
    finally:
        started.controller.stop()


def target(
    port: int, username: str | None = None, secret: str | None = None, starttls: bool = False
) -> Target:
    return Target(
        kind="device" if username else "mx",
        key=f"t:{port}:{username}",
        hosts=(("127.0.0.1", port),),
        username=username,
        secret=secret,
        starttls=starttls,
    )


def deliver_all(
    in_reactor: Any,
    deliverer: SMTPDeliverer,
    jobs: list[tuple[Target, list[str], bytes]],
    sender: str = SENDER,
) -> list[dict[str, Outcome]]:
    """Start every delivery at once (in the reactor) and wait for all of them."""

    def run() -> defer.Deferred[list[dict[str, Outcome]]]:
        return defer.gatherResults(
            [defer.ensureDeferred(deliverer.deliver(t, sender, r, d)) for t, r, d in jobs]
        )

    result: list[dict[str, Outcome]] = in_reactor(run)
    return result


def deliver(
    in_reactor: Any, deliverer: SMTPDeliverer, to: Target, data: bytes, rcpts: list[str]
) -> dict[str, Outcome]:
    [outcomes] = deliver_all(in_reactor, deliverer, [(to, rcpts, data)])
    return outcomes


def new_deliverer(in_reactor: Any, **kwargs: Any) -> SMTPDeliverer:
    return SMTPDeliverer(in_reactor.reactor, "edge.test", timeout=10, **kwargs)


def wait_for(check: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)


def delivered(outcomes: dict[str, Outcome]) -> bool:
    return bool(outcomes) and all(o.delivered for o in outcomes.values())


# -- reuse -----------------------------------------------------------------------------------


def test_messages_one_after_another_share_one_connection(
    in_reactor: Any, peer: CountingPeer
) -> None:
    deliverer = new_deliverer(in_reactor)
    to = target(peer.port)

    results = [deliver(in_reactor, deliverer, to, body(n), [A]) for n in range(10)]

    assert all(delivered(r) for r in results), results
    assert peer.handler.connections == 1
    assert [tx.data for tx in peer.handler.seen] == [body(n) for n in range(10)]
    assert peer.handler.rsets == 0  # every transaction completed: nothing to reset
    assert deliverer.idle_count(to, "127.0.0.1", peer.port) == 1


def test_twenty_messages_at_once_use_at_most_four_connections(
    in_reactor: Any, peer: CountingPeer
) -> None:
    deliverer = new_deliverer(in_reactor)
    to = target(peer.port)
    jobs = [(to, [f"user{n}@example.com"], body(n)) for n in range(20)]

    results = deliver_all(in_reactor, deliverer, jobs)

    assert all(delivered(r) for r in results), results
    handler = peer.handler
    assert 1 <= handler.connections <= 4
    assert handler.max_open <= 4
    # Every message arrived once, exactly, with its own envelope.
    got = sorted((tx.recipients[0], tx.data) for tx in handler.seen)
    assert got == sorted((f"user{n}@example.com", body(n)) for n in range(20))
    assert all(tx.sender == SENDER for tx in handler.seen)


def test_more_deliveries_than_connections_wait_their_turn(
    in_reactor: Any, peer: CountingPeer
) -> None:
    deliverer = new_deliverer(in_reactor, max_connections=2)
    to = target(peer.port)

    results = deliver_all(in_reactor, deliverer, [(to, [A], body(n)) for n in range(12)])

    assert all(delivered(r) for r in results), results
    assert peer.handler.max_open <= 2
    assert peer.handler.connections <= 2
    assert sorted(tx.data for tx in peer.handler.seen) == sorted(body(n) for n in range(12))


def test_different_credentials_and_targets_do_not_share(
    in_reactor: Any, peer: CountingPeer
) -> None:
    other = start(CountingMX())
    try:
        deliverer = new_deliverer(in_reactor)
        dev1 = target(peer.port, "edge-dev1", "secret-1")
        dev2 = target(peer.port, "edge-dev2", "secret-2")
        dev1_new_secret = target(peer.port, "edge-dev1", "secret-1b")
        anonymous = target(peer.port)
        elsewhere = target(other.port, "edge-dev1", "secret-1")
        order = [dev1, dev2, dev1, anonymous, dev2, dev1_new_secret, elsewhere, dev1]

        for n, to in enumerate(order):
            assert delivered(deliver(in_reactor, deliverer, to, body(n), [A]))
    finally:
        other.controller.stop()

    seen = peer.handler.seen
    assert peer.handler.connections == 4  # dev1, dev2, anonymous, dev1 with the new secret
    assert other.handler.connections == 1
    expected = [(t.username, t.secret) for t in order if t is not elsewhere]
    assert [(tx.login, tx.password) for tx in seen] == expected
    # Each connection carried the mail of one set of credentials only.
    by_connection: dict[int, set[tuple[str | None, str | None]]] = {}
    for tx in seen:
        by_connection.setdefault(tx.connection, set()).add((tx.login, tx.password))
    assert all(len(creds) == 1 for creds in by_connection.values())
    assert [tx.connection for tx in seen] == [1, 2, 1, 3, 2, 4, 1]
    assert [tx.login for tx in other.handler.seen] == ["edge-dev1"]


def test_a_kept_connection_stays_tls(in_reactor: Any, tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    ensure_self_signed(cert, key, "mx.test")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    peer = start(CountingMX(), tls_context=context, require_starttls=False)
    try:
        deliverer = new_deliverer(in_reactor)
        tls, plain = target(peer.port, starttls=True), target(peer.port)
        order = [tls, tls, plain, tls, plain]
        results = [deliver(in_reactor, deliverer, to, body(n), [A]) for n, to in enumerate(order)]
    finally:
        peer.controller.stop()

    assert all(delivered(r) for r in results)
    assert peer.handler.connections == 2
    assert [(tx.connection, tx.tls) for tx in peer.handler.seen] == [
        (1, True),
        (1, True),
        (2, False),
        (1, True),
        (2, False),
    ]


def test_cancelled_deliveries_give_their_place_and_connection_back(
    in_reactor: Any, peer: CountingPeer
) -> None:
    deliverer = new_deliverer(in_reactor, max_connections=1)
    to = target(peer.port)
    slow = threading.Event()

    def hold_the_first_data(server: Any, n: int) -> str | None:
        if server.connection_number == 1:
            slow.wait(5)  # blocks the peer's loop: the transaction stays open
        return None

    peer.handler.on_data = hold_the_first_data

    def start_three() -> list[defer.Deferred[dict[str, Outcome]]]:
        return [defer.ensureDeferred(deliverer.deliver(to, SENDER, [A], body(n))) for n in range(3)]

    busy, waiting, last = in_reactor(start_three)
    time.sleep(0.3)
    in_reactor(waiting.cancel)  # waiting for the one connection
    in_reactor(busy.cancel)  # in the middle of its transaction
    slow.set()
    outcomes: dict[str, Outcome] = in_reactor(lambda: last)

    assert delivered(outcomes), outcomes
    failures: list[Any] = []
    in_reactor(lambda: busy.addErrback(failures.append) and None)
    in_reactor(lambda: waiting.addErrback(failures.append) and None)
    assert [f.check(defer.CancelledError) for f in failures] == [
        defer.CancelledError,
        defer.CancelledError,
    ]
    # The cancelled transaction's connection was dropped, never used again.
    assert [tx.connection for tx in peer.handler.seen if tx.data == body(2)] == [2]
    assert body(1) not in [tx.data for tx in peer.handler.seen]


# -- bounds ----------------------------------------------------------------------------------


def test_max_transactions_per_connection(in_reactor: Any, peer: CountingPeer) -> None:
    deliverer = new_deliverer(in_reactor, max_transactions=3)
    to = target(peer.port)

    results = [deliver(in_reactor, deliverer, to, body(n), [A]) for n in range(7)]

    assert all(delivered(r) for r in results)
    assert peer.handler.connections == 3
    assert [tx.connection for tx in peer.handler.seen] == [1, 1, 1, 2, 2, 2, 3]
    assert peer.handler.transactions == {1: 3, 2: 3, 3: 1}
    wait_for(lambda: peer.handler.quits == 2)  # each full connection said goodbye


def test_idle_connections_are_closed_after_the_idle_timeout(
    in_reactor: Any, peer: CountingPeer
) -> None:
    clock = task.Clock()
    deliverer = new_deliverer(in_reactor, idle_timeout=30.0, clock=clock)
    to = target(peer.port)

    assert delivered(deliver(in_reactor, deliverer, to, body(1), [A]))
    in_reactor(clock.advance, 29)
    assert deliverer.idle_count(to, "127.0.0.1", peer.port) == 1
    assert delivered(deliver(in_reactor, deliverer, to, body(2), [A]))  # resets the timer
    in_reactor(clock.advance, 29)
    assert deliverer.idle_count(to, "127.0.0.1", peer.port) == 1
    assert peer.handler.quits == 0 and peer.handler.connections == 1

    in_reactor(clock.advance, 2)

    assert deliverer.idle_count(to, "127.0.0.1", peer.port) == 0
    wait_for(lambda: peer.handler.quits == 1 and peer.handler.closed == 1)
    assert delivered(deliver(in_reactor, deliverer, to, body(3), [A]))
    assert peer.handler.connections == 2


def test_close_says_quit_on_every_idle_connection(in_reactor: Any, peer: CountingPeer) -> None:
    other = start(CountingMX())
    try:
        deliverer = new_deliverer(in_reactor)
        jobs = [(target(peer.port), [A], body(n)) for n in range(6)]
        jobs.append((target(other.port), [A], body(9)))
        assert all(delivered(r) for r in deliver_all(in_reactor, deliverer, jobs))
        assert peer.handler.connections >= 1

        in_reactor(deliverer.close)

        assert peer.handler.quits == peer.handler.connections
        assert other.handler.quits == 1
        wait_for(lambda: peer.handler.open_now == 0 and other.handler.open_now == 0)
        # Still delivers afterwards, without keeping the connection.
        assert delivered(deliver(in_reactor, deliverer, target(other.port), body(10), [A]))
        assert deliverer.idle_count(target(other.port), "127.0.0.1", other.port) == 0
    finally:
        other.controller.stop()
