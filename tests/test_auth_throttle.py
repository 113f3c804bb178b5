"""Failed logins: the growing delay per address and per user (`edge.auththrottle`), as the
connector's SMTP AUTH and the IMAP server apply it, and the log line fail2ban matches.

The listeners run on real sockets on 127.0.0.1 with their timers on an injected `Clock`;
a reply that must wait for a delay is shown absent before the clock reaches it and present
after (`tests.wire`), never by measuring time.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import defer, threads
from twisted.internet.task import Clock
from twisted.logger import Logger, formatEventAsClassicLogText

from connector.imap import make_imap_factory
from connector.receiver import ConnectorHandler
from edge.auththrottle import AuthThrottle, failure_line, log_safe
from edge.smtp.factory import SMTPServerFactory
from edge.smtp.server import Limits
from maildir import Maildir
from tests.wire import Client, settle

# The sample fail2ban filter of the security document.
DATEPATTERN = r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4}"  # ^%Y-%m-%dT%H:%M:%S%z
FAILREGEX = r"^\s*\[[^\]\s]*\] auth failed: service=\S+ rhost=<HOST> user=\S* reason=\S+ delay=\S+$"
HOST = r"(?:::f{4,6}:)?(?P<host>[\w\-.^_:]*\w)"  # fail2ban's <HOST> (for addresses)


def banned_hosts(lines: list[str]) -> list[str]:
    """What fail2ban would take from `lines`: the date cut out, then the failregex."""
    regex = re.compile(FAILREGEX.replace("<HOST>", HOST))
    hosts = []
    for text in lines:
        for line in text.splitlines():
            date = re.match(DATEPATTERN, line)
            if date is None:
                continue
            found = regex.search(line[date.end() :])
            if found:
                hosts.append(found.group("host"))
    return hosts


class Events:
    """A Logger whose events are kept, and their lines as the edge's log file has them."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        observer: Any = self.events.append
        self.log = Logger(namespace="edge.auththrottle", observer=observer)

    def lines(self) -> list[str]:
        return [formatEventAsClassicLogText(e) or "" for e in self.events]


def throttle(clock: Clock, events: Events | None = None, **kw: Any) -> AuthThrottle:
    return AuthThrottle(clock, log=(events or Events()).log, **kw)


# -- the throttle ---------------------------------------------------------------------------


def failing(calls: list[str], ok: bool = False) -> Any:
    def check() -> bool:
        calls.append("checked")
        return ok

    return check


def outcome(d: Any) -> list[Any]:
    got: list[Any] = []
    if isinstance(d, defer.Deferred):
        d.addBoth(got.append)
    else:
        got.append(d)
    return got


def test_the_delay_doubles_per_failure_up_to_the_cap_and_is_forgotten() -> None:
    clock = Clock()
    t = throttle(clock, base_delay=2, max_delay=30, forget_after=900)
    delays = []
    for _ in range(7):
        got = outcome(t.attempt("imap", "192.0.2.1", "alice", failing([])))
        waited = 0.0
        while not got:
            clock.advance(0.5)
            waited += 0.5
        assert got == [False]
        delays.append(waited)
    assert delays == [2, 4, 8, 16, 30, 30, 30]
    clock.advance(900)  # quiet: forgotten
    got = outcome(t.attempt("imap", "192.0.2.1", "alice", failing([])))
    clock.advance(1.5)
    assert got == []
    clock.advance(0.5)
    assert got == [False]


def test_a_success_is_answered_at_once_and_clears_the_failures() -> None:
    clock = Clock()
    t = throttle(clock)
    assert t.attempt("smtp", "192.0.2.1", "edge", failing([], ok=True)) is True
    outcome(t.attempt("smtp", "192.0.2.1", "edge", failing([])))
    clock.advance(2)
    assert t.attempt("smtp", "192.0.2.1", "edge", failing([], ok=True)) is True
    got = outcome(t.attempt("smtp", "192.0.2.1", "edge", failing([])))
    clock.advance(2)
    assert got == [False]  # 2 s again, not 4: the success cleared the count


@pytest.mark.parametrize(
    ("first", "second"),
    [
        (("192.0.2.1", "alice"), ("192.0.2.1", "bob")),  # same address
        (("192.0.2.1", "alice"), ("198.51.100.7", "ALICE")),  # same user, elsewhere
        (("2001:db8::1", "alice"), ("2001:db8::ffff", "carol")),  # same IPv6 /64
    ],
)
def test_no_attempt_is_checked_while_a_failures_delay_runs(
    first: tuple[str, str], second: tuple[str, str]
) -> None:
    clock = Clock()
    t = throttle(clock)
    outcome(t.attempt("imap", *first, failing([])))
    clock.advance(0.5)
    calls: list[str] = []
    got = outcome(t.attempt("imap", *second, failing(calls, ok=True)))
    clock.advance(1.4)
    assert calls == [] and got == []
    clock.advance(0.1)  # the first failure's 2 s are over: now it is checked, and passes
    assert calls == ["checked"] and got == [True]


def test_unrelated_clients_are_not_delayed() -> None:
    clock = Clock()
    t = throttle(clock)
    outcome(t.attempt("imap", "192.0.2.1", "alice", failing([])))
    assert t.attempt("imap", "198.51.100.7", "bob", failing([], ok=True)) is True


def test_the_records_are_bounded_and_the_oldest_go_first() -> None:
    clock = Clock()
    t = throttle(clock, max_keys=10)
    for i in range(100):
        outcome(t.attempt("imap", f"10.0.{i // 250}.{i % 250}", f"user{i}", failing([])))
    assert len(t) == 10
    calls: list[str] = []
    outcome(t.attempt("imap", "10.0.0.99", "someone", failing(calls)))
    assert calls == []  # the latest failures are still remembered: this one waits
    assert t.attempt("imap", "10.0.0.1", "user1", failing(calls, ok=True)) is True  # forgotten


def test_an_exception_of_the_check_is_passed_on_and_not_counted() -> None:
    clock = Clock()
    t = throttle(clock)

    def broken() -> bool:
        raise RuntimeError("store down")

    with pytest.raises(RuntimeError):
        t.attempt("smtp", "192.0.2.1", "edge", broken)
    assert len(t) == 0


@pytest.mark.parametrize(
    "user",
    [
        "alice@example.org",
        "x rhost=6.6.6.6",
        "x\nauth failed: service=imap rhost=6.6.6.6 user=y reason=z delay=2",
        "] auth failed: service=imap rhost=6.6.6.6 user=y reason=z delay=2",
        "\r\x00\u2028\u00e9 rhost=6.6.6.6",
        "y" * 5000 + " rhost=6.6.6.6",
    ],
)
def test_each_failure_is_one_line_naming_the_real_address_whatever_the_user(user: str) -> None:
    clock = Clock()
    events = Events()
    t = throttle(clock, events)
    outcome(t.attempt("imap", "203.0.113.9", user, failing([])))
    [line] = events.lines()
    assert line.count("\n") == 1 and line.endswith("\n")
    assert banned_hosts(events.lines()) == ["203.0.113.9"]
    assert len(line) < 500
    assert f"user={log_safe(user)} " in line


def test_the_user_field_keeps_plain_names_readable() -> None:
    assert failure_line("imap", "203.0.113.9", "Alice.B+tag@example.org", "x", 2) == (
        "auth failed: service=imap rhost=203.0.113.9 user=Alice.B+tag@example.org reason=x delay=2"
    )


# -- the connector's SMTP AUTH ----------------------------------------------------------


class Listener:
    def __init__(self, in_reactor: Any, factory: Any, sessions: Any) -> None:
        self.in_reactor = in_reactor
        self.port = in_reactor(in_reactor.reactor.listenTCP, 0, factory, interface="127.0.0.1")
        self.portno = self.port.getHost().port
        self.sessions = sessions
        self.clients: list[Client] = []

    def connect(self) -> Client:
        client = Client(self.portno)
        self.clients.append(client)
        return client

    def settle(self) -> None:
        settle(self.in_reactor, self.sessions, self.clients)

    def close(self) -> None:
        for client in self.clients:
            client.close()
        self.in_reactor(self.port.stopListening)


def plain(user: str, password: str) -> bytes:
    return base64.b64encode(f"\0{user}\0{password}".encode())


@pytest.fixture
def connector(in_reactor: Any, tmp_path: Path) -> Iterator[tuple[Listener, Clock, Events]]:
    clock, events = Clock(), Events()
    maildir = Maildir(tmp_path / "Maildir", hostname="device.test")

    def handler() -> ConnectorHandler:
        return ConnectorHandler(maildir, "edge", "secret", threads.deferToThread, lambda i: None)

    factory = SMTPServerFactory(
        handler, Limits(), "device.test", clock, auth_throttle=throttle(clock, events)
    )
    listener = Listener(in_reactor, factory, lambda: factory.sessions)
    yield listener, clock, events
    listener.close()


def ehlo(listener: Listener) -> Client:
    client = listener.connect()
    assert client.reply().startswith("220 ")
    client.send(b"EHLO edge.test\r\n")
    assert client.reply().startswith("250 ")
    return client


def test_connector_auth_failures_are_answered_later_and_end_the_connection(
    in_reactor: Any, connector: tuple[Listener, Clock, Events]
) -> None:
    listener, clock, events = connector
    client = ehlo(listener)
    for delay in (2, 4):
        client.send(b"AUTH PLAIN " + plain("edge", "guess") + b"\r\n")
        listener.settle()
        in_reactor(clock.advance, delay - 0.1)
        assert client.arrived() == b""
        in_reactor(clock.advance, 0.1)
        assert client.reply().startswith("535 5.7.8")
    client.send(b"AUTH PLAIN " + plain("edge", "guess") + b"\r\n")
    listener.settle()
    in_reactor(clock.advance, 8)
    assert client.reply().startswith("535 5.7.8")
    assert client.reply() == "421 4.7.0 Too many authentication failures, closing connection"
    assert client.is_closed()
    assert banned_hosts(events.lines()) == ["127.0.0.1"] * 3


def test_connector_auth_from_another_connection_waits_for_the_delay_then_succeeds(
    in_reactor: Any, connector: tuple[Listener, Clock, Events]
) -> None:
    listener, clock, _ = connector
    right = ehlo(listener)
    right.send(b"AUTH PLAIN " + plain("edge", "secret") + b"\r\n")
    assert right.reply().startswith("235 ")  # no failure yet: answered at once
    attacker, edge = ehlo(listener), ehlo(listener)
    attacker.send(b"AUTH PLAIN " + plain("edge", "guess") + b"\r\n")
    listener.settle()
    in_reactor(clock.advance, 1)
    edge.send(b"AUTH PLAIN " + plain("edge", "secret") + b"\r\n")
    listener.settle()
    assert edge.arrived() == b""  # not even checked while the failure's delay runs
    in_reactor(clock.advance, 1)
    assert attacker.reply().startswith("535 ")
    assert edge.reply().startswith("235 ")


# -- IMAP LOGIN and AUTHENTICATE ----------------------------------------------------------


@pytest.fixture
def imap(in_reactor: Any, tmp_path: Path) -> Iterator[tuple[Listener, Clock, Events, list[str]]]:
    clock, events = Clock(), Events()
    checked: list[str] = []

    def authenticate(user: str, password: str) -> bool:
        checked.append(password)
        return (user, password) == ("bob", "secret")

    factory: Any = make_imap_factory(
        Maildir(tmp_path / "Maildir", hostname="device.test"),
        authenticate,
        throttle=throttle(clock, events),
    )
    listener = Listener(in_reactor, factory, lambda: factory.sessions)
    yield listener, clock, events, checked
    listener.close()


def imap_client(listener: Listener) -> Client:
    client = listener.connect()
    assert client.line().startswith(b"* OK")
    return client


def test_imap_login_failures_are_answered_after_the_delay(
    in_reactor: Any, imap: tuple[Listener, Clock, Events, list[str]]
) -> None:
    listener, clock, events, _ = imap
    client = imap_client(listener)
    client.send(b'a1 LOGIN "x rhost=6.6.6.6" wrong\r\n')
    listener.settle()
    in_reactor(clock.advance, 1.9)
    assert client.arrived() == b""
    in_reactor(clock.advance, 0.1)
    assert client.line() == b"a1 NO [AUTHENTICATIONFAILED] Authentication failed"
    client.send(b"a2 AUTHENTICATE PLAIN\r\n")
    assert client.line().startswith(b"+")
    client.send(plain("bob", "wrong") + b"\r\n")
    listener.settle()
    in_reactor(clock.advance, 3.9)  # the address's second failure: 4 s
    assert client.arrived() == b""
    in_reactor(clock.advance, 0.1)
    assert client.line().startswith(b"a2 NO [AUTHENTICATIONFAILED]")
    assert banned_hosts(events.lines()) == ["127.0.0.1", "127.0.0.1"]
    assert "user=x%20rhost%3D6.6.6.6 " in events.lines()[0]


def test_pipelined_imap_logins_are_checked_one_at_a_time_and_refused_after_three(
    in_reactor: Any, imap: tuple[Listener, Clock, Events, list[str]]
) -> None:
    listener, clock, _, checked = imap
    client = imap_client(listener)
    client.send(b"".join(b"a%d LOGIN bob guess%d\r\n" % (i, i) for i in range(1, 6)))
    client.send(b"a6 LOGIN bob secret\r\n")
    listener.settle()
    assert checked == ["guess1"]  # the others wait their turn
    assert client.line() == b"a4 NO [AUTHENTICATIONFAILED] Authentication failed"
    assert client.line().startswith(b"a5 NO ") and client.line().startswith(b"a6 NO ")
    in_reactor(clock.advance, 2)
    in_reactor(clock.advance, 4)
    in_reactor(clock.advance, 8)
    assert [client.line()[:5] for _ in range(3)] == [b"a1 NO", b"a2 NO", b"a3 NO"]
    assert checked == ["guess1", "guess2", "guess3"]  # the right password was never tried


def test_imap_login_with_the_right_password_is_answered_at_once(
    imap: tuple[Listener, Clock, Events, list[str]],
) -> None:
    listener, _, _, _ = imap
    client = imap_client(listener)
    client.send(b"a1 LOGIN bob secret\r\n")
    assert client.line().startswith(b"a1 OK")
