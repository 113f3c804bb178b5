"""Protocol tests of the SMTP server over an in-memory transport and a fake clock."""

from __future__ import annotations

import re
from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from edge.smtp import replies
from edge.smtp.address import Path
from edge.smtp.factory import SMTPServerFactory
from edge.smtp.replies import Reply, SMTPReplyError
from edge.smtp.server import Limits
from edge.smtp.session import Session


class RecordingSink:
    def __init__(self, store: list[bytes], aborted: list[bool]) -> None:
        self.chunks: list[bytes] = []
        self.store = store
        self.aborted = aborted

    def write(self, chunk: bytes) -> None:
        self.chunks.append(chunk)

    def finish(self) -> Reply:
        self.store.append(b"".join(self.chunks))
        return replies.S250_QUEUED.with_text(f"Queued as Q{len(self.store)}")

    def abort(self) -> None:
        self.aborted.append(True)


class FakeHandler:
    auth_offered = False
    auth_required = False

    def __init__(self) -> None:
        self.messages: list[bytes] = []
        self.aborted: list[bool] = []
        self.known = {"user@example.test", "other@example.test"}
        self.hang_rcpt = False

    def connect(self, session: Session) -> None:
        return None

    def authenticate(self, session: Session, username: str, password: str) -> bool:
        return (username, password) == ("edge", "secret")

    def mail_from(self, session: Session, sender: Path) -> None:
        if sender.address == "crash@example.test":
            raise RuntimeError("secret internal detail")
        return None

    def rcpt_to(self, session: Session, recipient: Path) -> Any:
        if self.hang_rcpt:
            return defer.Deferred()
        if recipient.address.lower() not in self.known:
            raise SMTPReplyError(replies.S550_NO_SUCH_USER)
        return None

    def data(self, session: Session) -> RecordingSink:
        return RecordingSink(self.messages, self.aborted)


class Conn:
    def __init__(self, limits: Limits | None = None, handler: FakeHandler | None = None) -> None:
        self.clock = Clock()
        self.handler = handler or FakeHandler()
        self.factory = SMTPServerFactory(
            lambda: self.handler, limits or Limits(), "mx.test", self.clock
        )
        self.proto = self.factory.buildProtocol(None)
        self.transport = StringTransport(
            peerAddress=IPv4Address("TCP", "192.0.2.1", 4444),
            hostAddress=IPv4Address("TCP", "127.0.0.1", 25),
        )
        self.proto.makeConnection(self.transport)

    def send(self, data: bytes) -> list[str]:
        self.transport.clear()
        self.proto.dataReceived(data)
        return self.replies()

    def replies(self) -> list[str]:
        return [
            line
            for line in self.transport.value().decode().split("\r\n")
            if line and line[3] == " "
        ]

    def codes(self, data: bytes) -> list[int]:
        return [int(line[:3]) for line in self.send(data)]


def greeted(limits: Limits | None = None) -> Conn:
    conn = Conn(limits)
    assert conn.transport.value().startswith(b"220 ")
    conn.send(b"EHLO client.test\r\n")
    return conn


def test_every_reply_class_matches_its_enhanced_code() -> None:
    named = replies.all_replies()
    # The servers' replies and delivery's (what the queue, routing and the client record).
    assert {"S550_NO_SUCH_USER", "D451_DNS_FAILED", "D550_NO_ROUTE"} <= set(named)
    for name, reply in named.items():
        if reply.enhanced:
            assert reply.enhanced[0] == str(reply.code)[0], name
            assert re.fullmatch(r"[245]\.\d{1,3}\.\d{1,3}", reply.enhanced), name


def test_ehlo_advertises_extensions() -> None:
    conn = Conn(Limits(max_message_size=1234))
    conn.transport.clear()
    conn.proto.dataReceived(b"EHLO client.test\r\n")
    text = conn.transport.value().decode()
    for ext in ("SIZE 1234", "PIPELINING", "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES"):
        assert f"250-{ext}" in text or f"250 {ext}" in text
    assert "STARTTLS" not in text  # no certificate configured


@pytest.mark.parametrize(
    ("commands", "expected"),
    [
        (b"MAIL FROM:<a@b.test>\r\n", [503]),
        (b"RCPT TO:<user@example.test>\r\n", [503]),
        (b"DATA\r\n", [503]),
        (b"FOO bar\r\n", [500]),
        (b"NOOP\r\n", [250]),
        (b"HELP\r\n", [214]),
        (b"VRFY someone\r\n", [252]),
        (b"QUIT\r\n", [221]),
        (b"HELO\r\n", [501]),
    ],
)
def test_commands_before_greeting(commands: bytes, expected: list[int]) -> None:
    conn = Conn()
    assert conn.codes(commands) == expected


@pytest.mark.parametrize(
    ("commands", "expected"),
    [
        (b"MAIL FROM:<a@b.test>\r\nRCPT TO:<user@example.test>\r\n", [250, 250]),
        (b"MAIL FROM:<>\r\nRCPT TO:<user@example.test>\r\n", [250, 250]),
        (b"MAIL FROM:<a@b.test>\r\nMAIL FROM:<a@b.test>\r\n", [250, 503]),
        (b"MAIL FROM:a@b.test\r\n", [501]),
        (b"MAIL FROM:<a@@b>\r\n", [501]),
        (b"MAIL FROM:<a@b.test> FOO=BAR\r\n", [555]),
        (b"MAIL FROM:<a@b.test> SIZE=999999999999\r\n", [552]),
        ("MAIL FROM:<jos\u00e9@b.test>\r\n".encode(), [553]),
        ("MAIL FROM:<jos\u00e9@b.test> SMTPUTF8\r\n".encode(), [250]),
        (b"MAIL FROM:<a@b.test>\r\nRCPT TO:<nobody@example.test>\r\n", [250, 550]),
        (b"MAIL FROM:<a@b.test>\r\nRCPT TO:<user@example.test\r\n", [250, 501]),
        (b"MAIL FROM:<a@b.test>\r\nDATA\r\n", [250, 554]),
        (b"MAIL FROM:<a@b.test>\r\nRSET\r\nRCPT TO:<user@example.test>\r\n", [250, 250, 503]),
        (b"MAIL FROM:<crash@example.test>\r\n", [451]),
    ],
)
def test_transaction_table(commands: bytes, expected: list[int]) -> None:
    conn = greeted()
    assert conn.codes(commands) == expected


def test_internal_error_text_is_generic() -> None:
    conn = greeted()
    [line] = conn.send(b"MAIL FROM:<crash@example.test>\r\n")
    assert line.startswith("451 4.3.0")
    assert "secret" not in line


def test_unknown_recipient_gets_550_511() -> None:
    conn = greeted()
    conn.send(b"MAIL FROM:<a@b.test>\r\n")
    [line] = conn.send(b"RCPT TO:<nobody@example.test>\r\n")
    assert line.startswith("550 5.1.1")


def deliver(conn: Conn, body: bytes, rcpts: int = 1) -> list[str]:
    conn.send(b"MAIL FROM:<a@b.test>\r\n")
    for _ in range(rcpts):
        conn.send(b"RCPT TO:<user@example.test>\r\n")
    assert conn.codes(b"DATA\r\n") == [354]
    return conn.send(body)


def test_data_is_dot_unstuffed_and_stored() -> None:
    conn = greeted()
    out = deliver(conn, b"Subject: x\r\n\r\n..leading dot\r\n.\r\n")
    assert out[-1].startswith("250 2.0.0 Queued as")
    assert conn.handler.messages == [b"Subject: x\r\n\r\n.leading dot\r\n"]


def test_pipelined_transaction_in_one_packet() -> None:
    conn = greeted()
    codes = conn.codes(
        b"MAIL FROM:<a@b.test>\r\nRCPT TO:<user@example.test>\r\nRCPT TO:<nobody@example.test>\r\n"
        b"DATA\r\nSubject: p\r\n\r\nhi\r\n.\r\nQUIT\r\n"
    )
    assert codes == [250, 250, 550, 354, 250, 221]
    assert conn.handler.messages == [b"Subject: p\r\n\r\nhi\r\n"]


@pytest.mark.parametrize(
    "body",
    [
        b"Subject: x\r\n\r\nbare\nline\r\n.\r\n",
        b"Subject: x\r\n\r\nbare\rcarriage\r\n.\r\n",
    ],
)
def test_bare_newlines_are_refused_and_nothing_stored(body: bytes) -> None:
    conn = greeted()
    out = deliver(conn, body)
    assert out[-1].startswith("550 5.6.0")
    assert conn.handler.messages == []


def test_smuggling_never_yields_a_second_message() -> None:
    conn = greeted()
    smuggled = (
        b"Subject: one\r\n\r\nline\n.\r\nMAIL FROM:<x@y.test>\r\nRCPT TO:<other@example.test>\r\n"
        b"DATA\r\nSubject: smuggled\r\n\r\nevil\r\n.\r\n"
    )
    out = deliver(conn, smuggled)
    assert conn.handler.messages == []
    assert [line[:3] for line in out] == ["550"]
    # The session is still usable and in a clean state.
    assert conn.codes(b"RCPT TO:<user@example.test>\r\n") == [503]


def test_101st_recipient_gets_452_and_100_stay_accepted() -> None:
    conn = greeted(Limits(max_recipients=100))
    conn.send(b"MAIL FROM:<a@b.test>\r\n")
    codes = conn.codes(b"RCPT TO:<user@example.test>\r\n" * 101)
    assert codes == [250] * 100 + [452]
    assert conn.codes(b"DATA\r\n") == [354]
    assert conn.send(b"Subject: many\r\n\r\nx\r\n.\r\n")[-1].startswith("250")


def test_oversize_message_gets_552_without_storing() -> None:
    conn = greeted(Limits(max_message_size=1000))
    out = deliver(conn, b"Subject: big\r\n\r\n" + (b"x" * 80 + b"\r\n") * 20 + b".\r\n")
    assert out[-1].startswith("552 5.3.4")
    assert conn.handler.messages == []
    assert conn.handler.aborted == [True]


def test_long_command_line_is_refused() -> None:
    conn = greeted(Limits(max_line_length=512))
    assert conn.codes(b"NOOP " + b"x" * 600 + b"\r\n") == [500]
    assert conn.codes(b"NOOP\r\n") == [250]


def test_endless_line_is_not_buffered() -> None:
    conn = greeted(Limits(max_line_length=512))
    for _ in range(50):
        conn.proto.dataReceived(b"x" * 100_000)
    assert len(conn.proto._buffer) <= 100_000
    assert conn.codes(b"\r\nNOOP\r\n") == [250]


def test_endless_data_line_is_not_buffered() -> None:
    conn = greeted()
    deliver(conn, b"Subject: x\r\n\r\n")
    for _ in range(50):
        conn.proto.dataReceived(b"y" * 100_000)
    assert len(conn.proto._buffer) <= 100_000
    out = conn.send(b"\r\n.\r\n")
    assert out[-1][:1] == "5"
    assert conn.handler.messages == []


def test_idle_timeout_closes_with_421() -> None:
    conn = greeted(Limits(idle_timeout=30))
    conn.transport.clear()
    conn.clock.advance(31)
    assert conn.transport.value().startswith(b"421 4.4.2")
    assert conn.transport.disconnecting


def test_handler_timeout_becomes_451() -> None:
    conn = greeted(Limits(handler_timeout=5))
    conn.handler.hang_rcpt = True
    conn.send(b"MAIL FROM:<a@b.test>\r\n")
    assert conn.send(b"RCPT TO:<user@example.test>\r\n") == []
    conn.transport.clear()
    conn.clock.advance(6)
    assert conn.replies()[0].startswith("451 4.4.5")


def test_client_vanishing_in_data_aborts_the_sink() -> None:
    conn = greeted()
    deliver(conn, b"Subject: x\r\n\r\npartial")
    conn.proto.connectionLost(None)  # type: ignore[arg-type]
    assert conn.handler.aborted == [True]
    assert conn.handler.messages == []


def test_too_many_connections_per_ip_get_421() -> None:
    limits = Limits(max_connections_per_ip=2)
    clock = Clock()
    handler = FakeHandler()
    factory = SMTPServerFactory(lambda: handler, limits, "mx.test", clock)
    seen = []
    for _ in range(3):
        proto = factory.buildProtocol(None)
        transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.9", 1))
        proto.makeConnection(transport)
        seen.append(transport.value()[:3])
    assert seen == [b"220", b"220", b"421"]


def test_auth_plain_required_when_handler_requires_it() -> None:
    handler = FakeHandler()
    handler.auth_offered = True
    handler.auth_required = True
    conn = Conn(handler=handler)
    conn.transport.clear()
    conn.proto.dataReceived(b"EHLO edge.test\r\n")
    assert b"AUTH PLAIN" in conn.transport.value()
    assert conn.codes(b"MAIL FROM:<a@b.test>\r\n") == [530]
    assert conn.codes(b"AUTH PLAIN AGVkZ2UAd3Jvbmc=\r\n") == [535]  # \0edge\0wrong
    assert conn.codes(b"AUTH PLAIN\r\n") == [334]
    assert conn.codes(b"AGVkZ2UAc2VjcmV0\r\n") == [235]  # \0edge\0secret
    assert conn.codes(b"MAIL FROM:<a@b.test>\r\n") == [250]


def test_header_section_limit_gets_552() -> None:
    conn = greeted(Limits(max_header_size=2000))
    headers = b"".join(b"X-Filler-%d: %s\r\n" % (i, b"v" * 60) for i in range(40))
    out = deliver(conn, headers + b"\r\nbody\r\n.\r\n")
    assert out[-1].startswith("552 5.3.4")
    assert conn.handler.messages == []


def test_body_lines_do_not_count_against_the_header_limit() -> None:
    conn = greeted(Limits(max_header_size=200, max_received_headers=2))
    body = b"Received: in the body is fine\r\n" * 100
    out = deliver(conn, b"Subject: ok\r\n\r\n" + body + b".\r\n")
    assert out[-1].startswith("250")


def test_too_many_received_headers_is_a_loop() -> None:
    conn = greeted(Limits(max_received_headers=3))
    hops = b"Received: from a by b; Mon, 1 Jan 2024 00:00:00 +0000\r\n" * 4
    out = deliver(conn, hops + b"Subject: loop\r\n\r\nx\r\n.\r\n")
    assert out[-1].startswith("554 5.4.6")
    assert conn.handler.messages == []
    conn2 = greeted(Limits(max_received_headers=3))
    out = deliver(conn2, hops[: len(hops) * 3 // 4] + b"Subject: ok\r\n\r\nx\r\n.\r\n")
    assert out[-1].startswith("250")


class DeferredHandler(FakeHandler):
    """Answers MAIL and RCPT through Deferreds: fired, pending, or failed."""

    def __init__(self) -> None:
        super().__init__()
        self.pending: list[defer.Deferred[None]] = []
        self.hold = False

    def mail_from(self, session: Session, sender: Path) -> Any:
        if sender.address == "refused@example.test":
            return defer.fail(SMTPReplyError(replies.S550_NO_SUCH_USER))
        return defer.succeed(None)

    def rcpt_to(self, session: Session, recipient: Path) -> Any:
        if self.hold:
            d: defer.Deferred[None] = defer.Deferred()
            self.pending.append(d)
            return d
        return super().rcpt_to(session, recipient)


def test_handler_answers_by_deferred_fired_or_not() -> None:
    handler = DeferredHandler()
    conn = Conn(handler=handler)
    conn.send(b"EHLO client.test\r\n")
    assert conn.codes(b"MAIL FROM:<refused@example.test>\r\n") == [550]
    assert conn.codes(b"MAIL FROM:<a@example.test>\r\n") == [250]
    handler.hold = True
    # While RCPT waits, the pipelined DATA stays unread; both are answered in order later.
    assert conn.codes(b"RCPT TO:<user@example.test>\r\nDATA\r\n") == []
    assert len(handler.pending) == 1
    handler.pending[0].callback(None)
    assert [int(line[:3]) for line in conn.replies()] == [250, 354]


def test_each_waiting_answer_has_its_own_full_timeout() -> None:
    handler = DeferredHandler()
    conn = Conn(Limits(handler_timeout=5), handler=handler)
    conn.send(b"EHLO client.test\r\n")
    assert conn.codes(b"MAIL FROM:<a@example.test>\r\n") == [250]
    handler.hold = True
    assert conn.codes(b"RCPT TO:<user@example.test>\r\n") == []
    conn.clock.advance(4)
    handler.pending[0].callback(None)  # in time
    assert [int(line[:3]) for line in conn.replies()] == [250]
    assert conn.codes(b"RCPT TO:<user@example.test>\r\n") == []
    conn.clock.advance(4)  # 8 s after the first began, 4 after this one: not late yet
    assert conn.replies() == []
    conn.clock.advance(1.5)
    assert conn.replies()[0].startswith("451 4.4.5")
    assert handler.pending[1].called  # cancelled: nothing answers it twice
    conn.proto.connectionLost(None)  # type: ignore[arg-type]
    assert conn.clock.getDelayedCalls() == []  # no timer outlives the session


def test_coroutine_handler_that_refuses_synchronously() -> None:
    class CoroutineHandler(FakeHandler):
        async def rcpt_to(self, session: Session, recipient: Path) -> None:  # type: ignore[override]
            raise SMTPReplyError(replies.S550_NO_SUCH_USER, "nobody")

    conn = Conn(handler=CoroutineHandler())
    conn.send(b"EHLO client.test\r\n")
    conn.send(b"MAIL FROM:<a@example.test>\r\n")
    assert conn.codes(b"RCPT TO:<user@example.test>\r\n") == [550]


def test_sink_whose_finish_fails_later_is_aborted_and_tempfails() -> None:
    finished: list[defer.Deferred[Reply]] = []
    aborted: list[bool] = []

    class LaterSink:
        def write(self, chunk: bytes) -> None:
            pass

        def finish(self) -> defer.Deferred[Reply]:
            d: defer.Deferred[Reply] = defer.Deferred()
            finished.append(d)
            return d

        def abort(self) -> None:
            aborted.append(True)

    class Handler(FakeHandler):
        def data(self, session: Session) -> Any:
            return LaterSink()

    conn = Conn(handler=Handler())
    conn.send(b"EHLO client.test\r\nMAIL FROM:<a@example.test>\r\nRCPT TO:<user@example.test>\r\n")
    assert conn.codes(b"DATA\r\nSubject: x\r\n\r\nbody\r\n.\r\n") == [354]
    finished[0].errback(OSError("disk full"))
    assert [int(line[:3]) for line in conn.replies()] == [354, 451]
    assert aborted == [True]
    assert "disk full" not in conn.transport.value().decode()


def test_commands_that_move_no_mail_cannot_hold_a_session_for_ever() -> None:
    """NOOP, RSET, VRFY and HELP past the limit close the session; an accepted message
    starts the count again, so a client sending mail with RSET between messages is fine."""
    conn = greeted(Limits(max_junk_commands=5))
    for verb in (b"NOOP", b"RSET", b"VRFY x", b"HELP", b"NOOP"):
        assert conn.codes(verb + b"\r\n")[0] < 400
    assert deliver(conn, b"Subject: one\r\n\r\nx\r\n.\r\n")[-1].startswith("250")
    for _ in range(5):
        assert conn.codes(b"RSET\r\n") == [250]
    assert conn.send(b"NOOP\r\n") == [
        "421 4.7.0 Too many commands without mail, closing connection"
    ]
    assert conn.transport.disconnecting
    assert len(conn.handler.messages) == 1
