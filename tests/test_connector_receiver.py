"""The device connector's SMTP receiver: AUTH, Maildir delivery, deduplication by queue id.

Protocol tests drive the server over an in-memory transport and a fake clock; the
end-to-end tests deliver with the edge's real `SMTPDeliverer` over loopback TCP.
"""

from __future__ import annotations

import base64
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from connector.receiver import ConnectorHandler, dedup_key
from edge.delivery.client import SMTPDeliverer
from edge.delivery.outcomes import Outcome
from edge.delivery.routing import Target
from edge.smtp.factory import SMTPServerFactory
from edge.smtp.server import Limits
from maildir import Maildir, MessageInfo
from tests.fakes import run_sync

USER = "edge-dev1"
PASSWORD = "correct horse battery staple"
A = "alice@example.test"
B = "bob@example.test"


def plain(username: str, password: str) -> bytes:
    return base64.b64encode(f"\0{username}\0{password}".encode())


def message(qid: str | None, body: str = "hello") -> bytes:
    head = f"X-Tailpost-Queue-ID: {qid}\r\n".encode() if qid else b""
    return head + f"Received: by mx.test\r\nSubject: {body}\r\n\r\n{body}\r\n".encode()


def traced(data: bytes, *rcpts: str, sender: str = "sender@example.net") -> bytes:
    """What the connector stores: the envelope's trace fields on top of the data."""
    top = f"Return-Path: <{sender}>\r\n" + "".join(f"Delivered-To: {r}\r\n" for r in rcpts)
    return top.encode() + data


def inbox_files(maildir: Maildir) -> list[bytes]:
    return sorted(p.read_bytes() for p in (maildir.root / "new").iterdir())


class Device:
    """A connector factory over a real Maildir."""

    def __init__(self, root: Path, password: str = PASSWORD) -> None:
        self.maildir = Maildir(root / "mail", hostname="device.test")
        self.delivered: list[MessageInfo] = []
        self.clock = Clock()
        self.factory = SMTPServerFactory(
            lambda: ConnectorHandler(self.maildir, USER, password, run_sync, self.delivered.append),
            Limits(),
            "device.test",
            self.clock,
        )

    def connect(self) -> Conn:
        return Conn(self)


class Conn:
    def __init__(self, device: Device) -> None:
        self.proto = device.factory.buildProtocol(None)
        self.transport = StringTransport(
            peerAddress=IPv4Address("TCP", "100.64.0.1", 40000),
            hostAddress=IPv4Address("TCP", "100.64.0.2", 2525),
        )
        self.proto.makeConnection(self.transport)
        assert self.transport.value().startswith(b"220 ")

    def send(self, data: bytes) -> list[str]:
        self.transport.clear()
        self.proto.dataReceived(data)
        text = self.transport.value().decode()
        return [line for line in text.split("\r\n") if line and line[3] == " "]

    def codes(self, data: bytes) -> list[int]:
        return [int(line[:3]) for line in self.send(data)]

    def login(self, password: str = PASSWORD) -> list[int]:
        return self.codes(b"EHLO edge.test\r\nAUTH PLAIN " + plain(USER, password) + b"\r\n")

    def transaction(self, data: bytes, rcpts: tuple[str, ...] = (A,)) -> list[str]:
        head = b"MAIL FROM:<sender@example.net>\r\n"
        head += b"".join(f"RCPT TO:<{r}>\r\n".encode() for r in rcpts)
        codes = self.codes(head + b"DATA\r\n")
        assert codes == [250] * (1 + len(rcpts)) + [354]
        return self.send(data + b".\r\n")


@pytest.fixture
def device(tmp_path: Path) -> Device:
    return Device(tmp_path)


def test_ehlo_offers_auth_plain(device: Device) -> None:
    conn = device.connect()
    conn.transport.clear()
    conn.proto.dataReceived(b"EHLO edge.test\r\n")
    assert b"250-AUTH PLAIN" in conn.transport.value() or b"250 AUTH PLAIN" in (
        conn.transport.value()
    )


def test_mail_without_auth_is_refused(device: Device) -> None:
    conn = device.connect()
    assert conn.codes(b"EHLO edge.test\r\n") == [250]
    [line] = conn.send(b"MAIL FROM:<sender@example.net>\r\n")
    assert line.startswith("530 5.7.0")
    assert conn.codes(b"RCPT TO:<alice@example.test>\r\nDATA\r\n") == [503, 503]
    assert inbox_files(device.maildir) == []


@pytest.mark.parametrize(
    ("username", "password"),
    [(USER, "wrong"), ("someone-else", PASSWORD), (USER, ""), (USER, PASSWORD + "x")],
)
def test_wrong_credentials_get_535(device: Device, username: str, password: str) -> None:
    conn = device.connect()
    codes = conn.codes(b"EHLO edge.test\r\nAUTH PLAIN " + plain(username, password) + b"\r\n")
    assert codes == [250, 535]
    assert conn.codes(b"MAIL FROM:<sender@example.net>\r\n") == [530]


def test_empty_configured_password_never_authenticates(tmp_path: Path) -> None:
    conn = Device(tmp_path, password="").connect()
    assert conn.codes(b"EHLO edge.test\r\nAUTH PLAIN " + plain(USER, "") + b"\r\n") == [250, 535]


def test_auth_plain_in_two_steps(device: Device) -> None:
    conn = device.connect()
    assert conn.codes(b"EHLO edge.test\r\nAUTH PLAIN\r\n") == [250, 334]
    assert conn.codes(plain(USER, PASSWORD) + b"\r\n") == [235]
    assert conn.codes(b"MAIL FROM:<sender@example.net>\r\n") == [250]


def test_authenticated_message_lands_in_inbox_new_with_exact_bytes(device: Device) -> None:
    conn = device.connect()
    assert conn.login() == [250, 235]
    data = message("0000000000000AQID1", "exact") + b"..dot-stuffed line\r\n\tfolded\r\n"

    [line] = conn.transaction(data)

    assert line.startswith("250 2.0.0 Stored as ")
    expected = data.replace(b"\r\n..dot", b"\r\n.dot")
    assert inbox_files(device.maildir) == [traced(expected, A)]
    [info] = device.delivered
    assert info.folder == "INBOX"
    assert line.endswith(info.id)
    assert device.maildir.folder("INBOX").read(info.id) == traced(expected, A)


def test_redelivery_of_the_same_queue_id_is_stored_once(device: Device) -> None:
    data = message("00000000000001DUPE1")
    first = device.connect()
    first.login()
    [reply1] = first.transaction(data, (A, B))
    # The edge lost the reply and delivers again on a new connection.
    second = device.connect()
    second.login()
    [reply2] = second.transaction(data, (B, A))

    assert reply1.startswith("250 ") and reply2.startswith("250 ")
    assert reply1 == reply2  # the same stored message
    assert inbox_files(device.maildir) == [traced(data, A, B)]


def test_same_connection_redelivery_is_stored_once(device: Device) -> None:
    conn = device.connect()
    conn.login()
    data = message("00000000000001DUPE2")
    assert conn.transaction(data)[0].startswith("250 ")
    assert conn.transaction(data)[0].startswith("250 ")
    assert inbox_files(device.maildir) == [traced(data, A)]


def test_redelivery_after_a_restart_is_stored_once(tmp_path: Path) -> None:
    data = message("00000000000001DUPE3")
    conn = Device(tmp_path).connect()
    conn.login()
    conn.transaction(data)
    restarted = Device(tmp_path)  # a new Maildir object: the index comes from the files
    conn = restarted.connect()
    conn.login()
    assert conn.transaction(data)[0].startswith("250 ")
    assert inbox_files(restarted.maildir) == [traced(data, A)]


def test_different_queue_id_stores_a_second_message(device: Device) -> None:
    conn = device.connect()
    conn.login()
    one, two = message("00000000000001AAAA"), message("00000000000001BBBB")
    conn.transaction(one)
    conn.transaction(two)
    assert inbox_files(device.maildir) == sorted([traced(one, A), traced(two, A)])


def test_same_queue_id_for_other_recipients_is_another_delivery(device: Device) -> None:
    conn = device.connect()
    conn.login()
    data = message("00000000000001CCCC")
    conn.transaction(data, (A,))
    conn.transaction(data, (B,))
    assert inbox_files(device.maildir) == sorted([traced(data, A), traced(data, B)])


def test_without_queue_id_nothing_is_deduplicated(device: Device) -> None:
    conn = device.connect()
    conn.login()
    data = message(None)
    conn.transaction(data)
    conn.transaction(data)
    assert inbox_files(device.maildir) == [traced(data, A)] * 2


def test_dedup_key() -> None:
    data = message("0000000000000ABCDEF")
    key = dedup_key(data, [A, B])
    assert key is not None and key.startswith("0000000000000ABCDEF-")
    assert dedup_key(data, [B, A]) == key  # recipient order does not matter
    assert dedup_key(data, [A]) != key
    assert dedup_key(data.replace(b"X-Tailpost-Queue-ID", b"x-tailpost-queue-id"), [A, B]) == key
    assert dedup_key(message("0000000000000ABCDEE"), [A, B]) != key


@pytest.mark.parametrize(
    "data",
    [
        message(None),
        b"",
        # The header further down (e.g. forged by the original sender) does not count.
        b"Received: by mx.test\r\nX-Tailpost-Queue-ID: 0000000000000ABCDEF\r\n\r\nbody\r\n",
        b"Subject: x\r\n\r\nX-Tailpost-Queue-ID: 0000000000000ABCDEF\r\n",
        # Malformed values are ignored rather than trusted.
        b"X-Tailpost-Queue-ID: ../../etc\r\nSubject: x\r\n\r\n",
        b"X-Tailpost-Queue-ID: " + b"A" * 41 + b"\r\nSubject: x\r\n\r\n",
        b"X-Tailpost-Queue-ID: 0000000000000ABCDEF\nSubject: x\n\n",
        b" X-Tailpost-Queue-ID: 0000000000000ABCDEF\r\n",
    ],
)
def test_dedup_key_needs_a_valid_first_header(data: bytes) -> None:
    assert dedup_key(data, [A]) is None


# -- end to end over loopback with the edge's real deliverer -------------------------------


@pytest.fixture
def listening(in_reactor: Any, tmp_path: Path) -> Iterator[tuple[Device, int]]:
    device = Device(tmp_path)
    device.factory.clock = in_reactor.reactor  # real time for the real connection
    port = in_reactor(in_reactor.reactor.listenTCP, 0, device.factory, interface="127.0.0.1")
    try:
        yield device, port.getHost().port
    finally:
        in_reactor(port.stopListening)


def target(port: int, secret: str = PASSWORD) -> Target:
    return Target(
        kind="device",
        key=f"device:dev1:127.0.0.1:{port}",
        hosts=(("127.0.0.1", port),),
        username=USER,
        secret=secret,
        device_id="dev1",
    )


def deliver(in_reactor: Any, to: Target, data: bytes, rcpts: list[str]) -> dict[str, Outcome]:
    deliverer = SMTPDeliverer(in_reactor.reactor, "edge.test", timeout=10)

    def run() -> defer.Deferred[dict[str, Outcome]]:
        return defer.ensureDeferred(deliverer.deliver(to, "sender@example.net", rcpts, data))

    result: dict[str, Outcome] = in_reactor(run)
    return result


def test_e2e_delivery_stores_the_exact_message(
    in_reactor: Any, listening: tuple[Device, int]
) -> None:
    device, port = listening
    data = message("00000000000002E2E1", "end to end") + b".leading dot\r\n.\r\n..\r\n"

    outcomes = deliver(in_reactor, target(port), data, [A, B])

    assert set(outcomes) == {A, B}
    assert all(o.code == 250 and o.delivered for o in outcomes.values()), outcomes
    assert inbox_files(device.maildir) == [traced(data, A, B)]

    again = deliver(in_reactor, target(port), data, [A, B])  # a retry after a lost reply
    assert all(o.delivered for o in again.values())
    assert inbox_files(device.maildir) == [traced(data, A, B)]


@pytest.mark.parametrize("shift", [0, 1], ids=["dot-line-starts-a-chunk", "crlf-split"])
def test_e2e_dot_line_at_a_chunk_boundary_is_stuffed(
    in_reactor: Any, listening: tuple[Device, int], shift: int
) -> None:
    device, port = listening
    head = message("00000000000002E2E3", "boundary")
    # SMTPDeliverer sends the (stuffed) data as it is; Twisted reads 2**14 bytes at a time.
    # The "." line starts exactly at the chunk boundary, or its CR LF is cut in two.
    filler_lines = []
    remaining = 2**14 - len(head) + shift
    while remaining > 0:
        n = min(remaining, 900)
        if 0 < remaining - n < 3:
            n -= 3  # keep every line non-empty and under the line limit
        filler_lines.append(b"x" * (n - 2) + b"\r\n")
        remaining -= n
    smuggled = b"MAIL FROM:<evil@example.net>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n"
    data = head + b"".join(filler_lines) + b".\r\n" + smuggled + b"forged\r\n"
    assert data.index(b"\r\n.\r\n") + 2 == 2**14 + shift

    outcomes = deliver(in_reactor, target(port), data, [A])

    assert all(o.delivered for o in outcomes.values()), outcomes
    assert inbox_files(device.maildir) == [traced(data, A)]


def test_e2e_partly_refused_recipients(in_reactor: Any, listening: tuple[Device, int]) -> None:
    device, port = listening
    data = message("00000000000002E2E2")
    outcomes = deliver(in_reactor, target(port), data, [A, "bad address"])
    assert outcomes[A].delivered
    assert outcomes["bad address"].code == 501  # refused at RCPT: the syntax reply
    assert inbox_files(device.maildir) == [traced(data, A)]


def test_e2e_wrong_secret_is_temporary_and_stores_nothing(
    in_reactor: Any, listening: tuple[Device, int]
) -> None:
    device, port = listening
    outcomes = deliver(in_reactor, target(port, "wrong"), message("00000000000002BAD1"), [A, B])
    assert set(outcomes) == {A, B}
    assert all(not o.delivered for o in outcomes.values()), outcomes
    assert all(400 <= o.code < 500 for o in outcomes.values()), outcomes
    assert inbox_files(device.maildir) == []


def test_e2e_refusal_at_end_of_data_is_not_a_delivery(
    in_reactor: Any, listening: tuple[Device, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    device, port = listening

    def broken(*args: Any, **kwargs: Any) -> MessageInfo:
        raise OSError("disk full")

    monkeypatch.setattr(device.maildir, "deliver", broken)
    outcomes = deliver(in_reactor, target(port), message("00000000000002BAD2"), [A])
    assert outcomes[A].code == 451
    assert not outcomes[A].final


def test_e2e_closed_port_is_a_temporary_failure(in_reactor: Any) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    outcomes = deliver(in_reactor, target(port), message("00000000000002BAD3"), [A, B])
    assert set(outcomes) == {A, B}
    assert all(400 <= o.code < 500 and not o.final for o in outcomes.values()), outcomes
