"""The IMAP server against a hostile local client: malformed arguments are BAD with a
reason (never an internal error, never a traceback in the log), concurrent sessions are
limited per client address and per user, and APPEND's message is spooled to a file
(never held in memory), with nothing left behind when it is aborted."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.logger import ILogObserver, globalLogPublisher
from zope.interface import implementer

from tests.imapraw import RawIMAP
from tests.test_imap import SIMPLE, Server


@implementer(ILogObserver)
class LogCapture:
    """Twisted log events of the process, as the test saw them."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def __call__(self, event: dict[str, Any]) -> None:
        self.events.append(event)

    def problems(self) -> list[str]:
        """Tracebacks, errors and anything unhandled logged so far."""
        out = []
        for e in list(self.events):
            text = str(e.get("log_format") or e.get("format") or e.get("message") or "")
            failure = e.get("log_failure")
            if failure is not None or e.get("isError") or "Unhandled" in text:
                detail = failure.getTraceback() if failure is not None else text
                out.append(detail)
        return out


@pytest.fixture
def log_events() -> Iterator[LogCapture]:
    capture = LogCapture()
    globalLogPublisher.addObserver(capture)
    yield capture
    globalLogPublisher.removeObserver(capture)


def _server(in_reactor: Any, tmp_path: Path, **kw: Any) -> Iterator[Server]:
    s = Server(in_reactor, tmp_path / "mail", **kw)
    s.maildir.deliver(SIMPLE)
    yield s
    s.stop()


@pytest.fixture
def server(in_reactor: Any, tmp_path: Path) -> Iterator[Server]:
    yield from _server(in_reactor, tmp_path, max_message_size=1 << 20)


def selected(server: Server) -> RawIMAP:
    c = RawIMAP(server.portno, timeout=10)
    c.login()
    _, done = c.command(b"S", b"SELECT INBOX")
    assert done.text.startswith(b"S OK"), done
    return c


def hang_up(c: RawIMAP) -> None:
    """Close the client's side for good (its file object holds the socket open too)."""
    c.file.close()
    c.close()


def wait_for(condition: Callable[[], bool], what: str, seconds: float = 10) -> None:
    """Wait until `condition` holds (a bound on waiting, not an assertion on time)."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened: {what}")
        time.sleep(0.01)


# -- malformed arguments -----------------------------------------------------------------

MALFORMED = [
    (b"SEARCH {-100}", b"Bad literal size"),
    (b"SEARCH (ALL", b"Unbalanced parentheses"),
    (b"SEARCH ALL)", b"Unbalanced parentheses"),
    (b"SEARCH OR (FROM a) (SUBJECT b))", b"Unbalanced parentheses"),
    (b"FETCH 1 {5}", b"Literal in a place that takes none"),
    (b"SEARCH {99999999999999999999}", b"Bad literal size"),
    (b"SELECT {99999999999999999999}", b"Bad literal size"),
    (b"APPEND INBOX {99999999999999999999}", b"Bad literal size"),
    (b"NO\x00OP", b"NUL octet"),
    (b"FETCH 1 (FLAGS\x00)", b"NUL octet"),
    (b"FETCH 0 (FLAGS)", b"Bad message number"),
    (b"FETCH 4294967296 (FLAGS)", b"Bad message number"),
    (b"UID FETCH 1:4294967296 (FLAGS)", b"Bad message number"),
    (b"FETCH 1:*:2 (FLAGS)", b"Bad message set"),
    (b"SEARCH 4294967296", b"bad message set"),
    (b"SEARCH " + b"(" * 5000 + b"ALL" + b")" * 5000, b"Too deeply nested"),
    (b"SEARCH " + b"NOT " * 5000 + b"ALL", b"nested too deeply"),
    (b"SEARCH " + b"OR ALL " * 5000 + b"ALL", b"nested too deeply"),
    (b"FETCH 1 " + b"(" * 5000 + b"FLAGS" + b")" * 5000, b"Too deeply nested"),
    (b"SELECT &Jjo", b"Invalid mailbox name encoding"),
    (b'SELECT "INBOX', b"Unterminated quoted string"),
    (b"SELECT", b"Missing argument"),
]


@pytest.mark.parametrize(("command", "reason"), MALFORMED)
def test_malformed_arguments_are_bad_with_a_reason(
    server: Server, log_events: LogCapture, command: bytes, reason: bytes
) -> None:
    c = selected(server)
    _, done = c.command(b"A1", command)
    assert done.text.startswith(b"A1 BAD "), done
    assert reason in done.text, done
    # The session goes on.
    _, done = c.command(b"A2", b"NOOP")
    assert done.text.startswith(b"A2 OK"), done
    hang_up(c)
    assert log_events.problems() == []


def test_sequence_sets_up_to_the_largest_number(server: Server) -> None:
    c = selected(server)
    untagged, done = c.command(b"A1", b"FETCH 1:4294967295 (FLAGS)")
    assert done.text.startswith(b"A1 OK"), done
    assert [x.text[:12] for x in untagged] == [b"* 1 FETCH (F"]
    _, done = c.command(b"A2", b"UID FETCH 4294967295 (FLAGS)")
    assert done.text.startswith(b"A2 OK"), done
    hang_up(c)


def test_a_long_sequence_set_is_parsed_once(server: Server) -> None:
    """A 60 KiB set of 15,000 ranges: sorted and merged once, and matched by binary search
    (merging at each range, as Twisted's parser does, took the reactor minutes)."""
    for _ in range(19):
        server.maildir.deliver(SIMPLE)
    odd = b",".join(b"%d" % i for i in range(1, 30000, 2))[:60000].rsplit(b",", 1)[0]
    c = selected(server)
    untagged, done = c.command(b"A1", b"FETCH " + odd + b" (UID)")
    assert done.text.startswith(b"A1 OK"), done
    assert [x.text.split()[1] for x in untagged] == [b"%d" % i for i in range(1, 21, 2)]
    untagged, done = c.command(b"A2", b"UID SEARCH UID " + odd.replace(b"1,", b"2,", 1))
    assert done.text.startswith(b"A2 OK"), done
    assert (
        untagged[0].text == b"* SEARCH 2 " + b" ".join(b"%d" % i for i in range(3, 21, 2)) + b"\r\n"
    )
    hang_up(c)


@pytest.mark.parametrize(
    ("line", "answer"),
    [
        (b" NOOP", b"* BAD Empty tag"),
        (b"A*B NOOP", b"* BAD Invalid characters in tag"),
        (b"A{ NOOP", b"* BAD Invalid characters in tag"),
        (b"A+ NOOP", b"* BAD Invalid characters in tag"),
        (b'"A" NOOP', b"* BAD Invalid characters in tag"),
        (b"A\xff NOOP", b"* BAD Invalid characters in tag"),
    ],
)
def test_bad_tags(server: Server, log_events: LogCapture, line: bytes, answer: bytes) -> None:
    c = RawIMAP(server.portno, timeout=10)
    c.send(line)
    assert c.line().text == answer + b"\r\n"
    _, done = c.command(b"A2", b"NOOP")
    assert done.text.startswith(b"A2 OK"), done
    hang_up(c)
    assert log_events.problems() == []


def test_non_ascii_command_name_before_login(server: Server, log_events: LogCapture) -> None:
    c = RawIMAP(server.portno, timeout=10)
    _, done = c.command(b"A1", "LÖGIN bob secret".encode())
    assert done.text == b"A1 BAD Invalid arguments: Invalid command name\r\n"
    hang_up(c)
    assert log_events.problems() == []


def test_unknown_search_charset(server: Server) -> None:
    c = selected(server)
    _, done = c.command(b"A1", b"SEARCH CHARSET KOI8-R ALL")
    assert done.text.startswith(b"A1 NO [BADCHARSET"), done
    _, done = c.command(b"A2", b'SEARCH CHARSET "UTF-8" ALL')
    assert done.text.startswith(b"A2 OK"), done
    hang_up(c)


def test_search_reads_its_literals(server: Server, log_events: LogCapture) -> None:
    """A literal in SEARCH is read as the string it is, not as the next command."""
    c = selected(server)
    c.send(b"A1 SEARCH CHARSET UTF-8 SUBJECT {5}")
    assert c.line().text.startswith(b"+ ")
    c.send(b"Hello FROM {5}")
    assert c.line().text.startswith(b"+ ")
    c.send(b"alice")
    untagged, done = c.until_tagged(b"A1")
    assert done.text.startswith(b"A1 OK"), done
    assert [x.text for x in untagged] == [b"* SEARCH 1\r\n"]
    hang_up(c)
    assert log_events.problems() == []


# -- session limits ---------------------------------------------------------------------


@pytest.fixture
def limited(in_reactor: Any, tmp_path: Path) -> Iterator[Server]:
    yield from _server(in_reactor, tmp_path, max_sessions_per_user=2, max_sessions_per_address=3)


def test_connections_past_the_per_address_limit_get_bye(limited: Server) -> None:
    held = [RawIMAP(limited.portno, timeout=10) for _ in range(3)]
    s = socket.create_connection(("127.0.0.1", limited.portno), timeout=10)
    f = s.makefile("rb")
    assert f.readline() == b"* BYE Too many connections\r\n"
    assert f.readline() == b""  # closed
    s.close()
    # A place is given back when a session ends, however it ends.
    hang_up(held.pop())
    wait_for(lambda: sum(limited.factory.limits.addresses.values()) == 2, "a place freed")
    again = RawIMAP(limited.portno, timeout=10)
    again.login()
    for c in [again, *held]:
        hang_up(c)
    wait_for(lambda: not limited.factory.limits.addresses, "every place freed")


def test_logins_past_the_per_user_limit_get_no_limit(limited: Server) -> None:
    first, second, third = (RawIMAP(limited.portno, timeout=10) for _ in range(3))
    first.login()
    second.login()
    _, done = third.command(b"L", b"LOGIN bob secret")
    assert done.text == b"L NO [LIMIT] Too many sessions\r\n"
    third.send(b"A AUTHENTICATE PLAIN")
    assert third.line().text.startswith(b"+")
    third.send(b"AGJvYgBzZWNyZXQ=")  # \0bob\0secret
    _, done = third.until_tagged(b"A")
    assert done.text == b"A NO [LIMIT] Too many sessions\r\n"
    _, done = third.command(b"S", b"SELECT INBOX")  # still not logged in
    assert done.text.startswith(b"S BAD"), done
    _, done = first.command(b"O", b"LOGOUT")
    assert done.text.startswith(b"O OK")
    hang_up(first)
    wait_for(lambda: limited.factory.limits.users["bob"] == 1, "LOGOUT gave the place back")
    third.login()
    hang_up(second)
    hang_up(third)
    wait_for(lambda: not limited.factory.limits.users, "every user place freed")


def test_limits_are_configurable_off(in_reactor: Any, tmp_path: Path) -> None:
    for s in _server(in_reactor, tmp_path, max_sessions_per_user=0, max_sessions_per_address=0):
        many = [RawIMAP(s.portno, timeout=10) for _ in range(60)]
        for c in many[:25]:
            c.login()
        for c in many:
            hang_up(c)


# -- APPEND ---------------------------------------------------------------------------------


def spool_files(server: Server) -> list[Path]:
    return sorted(p for p in server.maildir.root.rglob("tmp/*") if p.is_file())


def session_of(server: Server) -> Any:
    (p,) = list(server.factory.sessions)
    return p


def test_append_literal_goes_to_a_file_as_it_arrives(server: Server) -> None:
    c = RawIMAP(server.portno, timeout=10)
    c.login()
    body = b"Subject: big\r\n\r\n" + b"x" * (900 * 1024 - 16)
    c.send(b"A1 APPEND INBOX (\\Seen) {%d}" % len(body))
    assert c.line().text.startswith(b"+ ")
    half = len(body) // 2
    c.sock.sendall(body[:half])
    wait_for(
        lambda: sum(p.stat().st_size for p in spool_files(server)) >= half - 64 * 1024,
        "the literal written to a spool file",
    )
    (spool,) = spool_files(server)
    assert spool.parent == server.maildir.root / "tmp"
    # What the session holds in memory stays small while the literal is in flight.
    session = session_of(server)
    assert len(session._buffer) < 64 * 1024
    c.sock.sendall(body[half:] + b"\r\n")
    _, done = c.until_tagged(b"A1")
    assert done.text.startswith(b"A1 OK"), done
    (info,) = [m for m in server.maildir.folder("INBOX").messages() if m.flags == {"\\Seen"}]
    assert info.path.read_bytes() == body
    assert spool_files(server) == []
    hang_up(c)


def test_append_aborted_by_a_disconnect_leaves_nothing(server: Server) -> None:
    c = RawIMAP(server.portno, timeout=10)
    c.login()
    c.send(b"A1 APPEND INBOX {500000}")
    assert c.line().text.startswith(b"+ ")
    c.sock.sendall(b"y" * 300000)
    wait_for(lambda: bool(spool_files(server)), "a spool file")
    hang_up(c)
    wait_for(lambda: not server.factory.sessions, "the session gone")
    assert spool_files(server) == []
    assert len(server.maildir.folder("INBOX").messages()) == 1


def test_append_over_the_limit_is_refused_before_any_data(server: Server) -> None:
    c = RawIMAP(server.portno, timeout=10)
    c.login()
    _, done = c.command(b"A1", b"APPEND INBOX {%d}" % ((1 << 20) + 1))
    assert done.text.startswith(b"A1 NO [TOOBIG]"), done
    assert spool_files(server) == []
    hang_up(c)


@pytest.mark.parametrize(
    ("command", "answer"),
    [
        (b"APPEND Nope {5}", b"A1 NO [TRYCREATE]"),
        (b'APPEND INBOX "bad date" {5}', b"A1 BAD"),
    ],
)
def test_append_refused_after_the_literal_leaves_nothing(
    server: Server, command: bytes, answer: bytes
) -> None:
    c = RawIMAP(server.portno, timeout=10)
    c.login()
    c.send(b"A1 " + command)
    assert c.line().text.startswith(b"+ ")
    c.send(b"hello")
    _, done = c.until_tagged(b"A1")
    assert done.text.startswith(answer), done
    assert spool_files(server) == []
    hang_up(c)


def test_append_with_arguments_after_the_literal_leaves_nothing(server: Server) -> None:
    c = RawIMAP(server.portno, timeout=10)
    c.login()
    c.send(b"A1 APPEND INBOX {5}")
    assert c.line().text.startswith(b"+ ")
    c.send(b"hello EXTRA")
    _, done = c.until_tagged(b"A1")
    assert done.text.startswith(b"A1 BAD"), done
    assert spool_files(server) == []
    assert len(server.maildir.folder("INBOX").messages()) == 1
    hang_up(c)


def test_session_limits_in_the_configuration(tmp_path: Path) -> None:
    from edge.config import ConfigError, load_config

    path = tmp_path / "tailpost.toml"
    path.write_text("[device]\nimap_max_sessions_per_user = 3\nimap_max_sessions_per_address = 0\n")
    d = load_config(path).device
    assert (d.imap_max_sessions_per_user, d.imap_max_sessions_per_address) == (3, 0)
    assert load_config(None).device.imap_max_sessions_per_user == 20
    assert load_config(None).device.imap_max_sessions_per_address == 50
    path.write_text("[device]\nimap_max_sessions_per_user = -1\n")
    with pytest.raises(ConfigError, match="imap_max_sessions_per_user"):
        load_config(path)
