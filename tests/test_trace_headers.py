"""What peers send that ends up in headers: the EHLO argument, the Received header the MX
writes, and the Return-Path and Delivered-To the connector writes as the final delivery."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from connector.receiver import with_trace, without_return_path
from edge.inbound.policy import MXHandler
from edge.smtp.factory import SMTPServerFactory
from edge.smtp.server import Limits
from edge.smtp.trace import header_text, helo_ok, received_header
from edge.spool.spool import Envelope, Spool
from edge.store import RecipientTarget
from tests.fakes import run_sync
from tests.test_connector_receiver import Device, inbox_files, message, traced

RCPT = "alice@example.com"
TARGET = RecipientTarget("device", RCPT, "dev1", "127.0.0.1:2525", "u", "s", None, [])


class MX:
    """The MX's real session policy over an in-memory transport, spooling to `tmp_path`."""

    def __init__(self, root: Path, peer: Any = None) -> None:
        self.spool = Spool(root / "spool")
        self.accepted: list[Envelope] = []
        clock = Clock()
        clock.advance(1_700_000_000)

        def handler() -> MXHandler:
            return MXHandler(
                lambda a: TARGET if a.lower() == RCPT else None,
                self.spool,
                "mx.test",
                clock,
                run_sync,
                self.accepted.append,
            )

        factory = SMTPServerFactory(handler, Limits(own_received=1), "mx.test", clock)
        self.proto = factory.buildProtocol(None)
        self.transport = StringTransport(
            peerAddress=peer or IPv4Address("TCP", "192.0.2.1", 4444),
            hostAddress=IPv4Address("TCP", "127.0.0.1", 25),
        )
        self.proto.makeConnection(self.transport)

    def send(self, data: bytes) -> list[str]:
        self.transport.clear()
        self.proto.dataReceived(data)
        text = self.transport.value().decode("utf-8", "replace")
        return [line for line in text.split("\r\n") if line and line[3:4] == " "]

    def stored(self) -> list[bytes]:
        return [self.spool.read(env.qid) for env in self.accepted]


TRANSACTION = (
    b"MAIL FROM:<carol@sender.test>\r\nRCPT TO:<alice@example.com>\r\nDATA\r\n"
    b"Subject: hi\r\n\r\nhello\r\n.\r\n"
)


@pytest.mark.parametrize(
    "name",
    [
        "mail.example.com",
        "mail.example.com.",
        "localhost",
        "DESKTOP-4F2A",
        "host_with_underscore.example.org",
        "[192.0.2.1]",
        "[IPv6:2001:db8::1]",
        "[ipv6:::1]",
        "192.0.2.1",
        "2001:db8::1",
    ],
)
def test_helo_accepts_domains_and_address_literals(name: str) -> None:
    assert helo_ok(name)


@pytest.mark.parametrize(
    "name",
    [
        "",
        "host\x00name",
        "host\x00",
        "ho\rst",
        "ho\x0bst",
        "host\x7f",
        "ho\tst",
        "hóst.example",
        "ho\u2028st",
        "two words",
        "a..b",
        ".leading.dot",
        "a" * 64 + ".example",
        "[192.0.2]",
        "[192.0.2.1",
        "[IPv6:zz::1]",
        "[IPv6:192.0.2.1]",
        "[]",
        "host;x",
        "<host>",
        "x" * 256,
    ],
)
def test_helo_refuses_control_characters_8bit_and_bad_syntax(name: str) -> None:
    assert not helo_ok(name)


@pytest.mark.parametrize(
    "line",
    [
        b"EHLO host\x00name\r\n",
        b"EHLO ho\rst\r\n",
        b"HELO \x01evil\r\n",
        b"EHLO h\xc3\xb3st.example\r\n",
        b"EHLO host\x1bname\r\n",
        b"EHLO [1.2.3]\r\n",
    ],
)
def test_bad_ehlo_is_501_and_the_session_stays_usable(tmp_path: Path, line: bytes) -> None:
    mx = MX(tmp_path)
    [reply] = mx.send(line)
    assert reply.startswith("501 5.5.4 ")
    assert mx.send(b"MAIL FROM:<carol@sender.test>\r\n")[0].startswith("503")  # no EHLO yet
    assert mx.send(b"EHLO client.example\r\n")[-1].startswith("250 ")
    assert mx.send(TRANSACTION)[-1].startswith("250 ")
    [data] = mx.stored()
    assert data.startswith(b"Received: from client.example ([192.0.2.1])\r\n")


def test_a_good_ehlo_then_a_bad_one_keeps_the_good_one(tmp_path: Path) -> None:
    mx = MX(tmp_path)
    mx.send(b"EHLO good.example\r\n")
    assert mx.send(b"EHLO bad\x00.example\r\n")[0].startswith("501 5.5.4")
    assert mx.send(TRANSACTION)[-1].startswith("250 ")
    [data] = mx.stored()
    assert data.startswith(b"Received: from good.example ([192.0.2.1])\r\n")
    assert b"\x00" not in data


def test_received_of_an_ipv6_client_names_an_ipv6_literal(tmp_path: Path) -> None:
    mx = MX(tmp_path, IPv6Address("TCP", "2001:db8::25", 4444))
    mx.send(b"EHLO [IPv6:2001:db8::25]\r\n")
    assert mx.send(TRANSACTION)[-1].startswith("250 ")
    [data] = mx.stored()
    assert data.startswith(b"Received: from [IPv6:2001:db8::25] ([IPv6:2001:db8::25])\r\n")


def test_received_never_carries_a_line_break_or_control_character() -> None:
    # Values that got past every parser still cannot start a header field of their own.
    header = received_header(
        helo="evil\r\nX-Injected: 1",
        peer_host="192.0.2.1\nX-Injected: 2",
        hostname="mx.test",
        protocol="ESMTPS",
        qid="Q1",
        tls="TLSv1.3\r\nX-Injected: 3\x00",
        recipient="a\u2028b\x85c@example.com",
        now=1_700_000_000,
    )
    lines = header.split(b"\r\n")
    assert lines[-1] == b""
    assert all(line.startswith((b"Received:", b"\t")) for line in lines[:-1])
    assert b"X-Injected" in header  # as text inside the field, not as a field
    assert not any(c in header.replace(b"\r\n", b"") for c in (b"\r", b"\n", b"\x00"))
    assert "\u2028".encode() not in header and "\x85".encode() not in header
    assert header_text("ok text") == "ok text"
    assert header_text("a\tb\x7fc") == "a?b?c"


# -- the connector: Return-Path and Delivered-To ------------------------------------------------


def test_stored_copy_starts_with_return_path_and_delivered_to(tmp_path: Path) -> None:
    device = Device(tmp_path)
    conn = device.connect()
    conn.login()
    data = message("0000000000000TRACE1")
    assert conn.transaction(data, ("alice@example.test", "bob@example.test"))[-1].startswith("250")
    [stored] = inbox_files(device.maildir)
    assert stored == (
        b"Return-Path: <sender@example.net>\r\n"
        b"Delivered-To: alice@example.test\r\n"
        b"Delivered-To: bob@example.test\r\n" + data
    )
    assert stored == traced(data, "alice@example.test", "bob@example.test")


def test_null_sender_gets_an_empty_return_path(tmp_path: Path) -> None:
    device = Device(tmp_path)
    conn = device.connect()
    conn.login()
    conn.transport.clear()
    conn.proto.dataReceived(b"MAIL FROM:<>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n")
    data = message("0000000000000TRACE2")
    assert conn.send(data + b".\r\n")[-1].startswith("250")
    [stored] = inbox_files(device.maildir)
    assert stored.startswith(b"Return-Path: <>\r\nDelivered-To: alice@example.test\r\n")


def test_a_return_path_from_outside_is_replaced(tmp_path: Path) -> None:
    device = Device(tmp_path)
    conn = device.connect()
    conn.login()
    qid = b"X-Tailpost-Queue-ID: 0000000000000TRACE3\r\n"
    rest = (
        b"Received: by mx.test\r\n"
        b"return-path : <forged@evil.test>\r\n"
        b"Return-Path:\r\n <folded@evil.test>\r\n"
        b"Subject: hi\r\n\r\n"
        b"Return-Path: <in-the-body@example.net>\r\n"
    )
    assert conn.transaction(qid + rest)[-1].startswith("250")
    [stored] = inbox_files(device.maildir)
    assert stored == (
        b"Return-Path: <sender@example.net>\r\nDelivered-To: alice@example.test\r\n"
        + qid
        + b"Received: by mx.test\r\nSubject: hi\r\n\r\n"
        b"Return-Path: <in-the-body@example.net>\r\n"
    )
    assert stored.count(b"evil.test") == 0
    # Redelivered after a lost reply: still stored once (the queue id line is read first).
    assert conn.transaction(qid + rest)[-1].startswith("250")
    assert len(inbox_files(device.maildir)) == 1


@pytest.mark.parametrize(
    "data",
    [
        b"Subject: x\r\n\r\nbody\r\n",
        b"\r\nReturn-Path: <body@example.net>\r\n",  # no header section at all
        b"Subject: no body\r\n",
    ],
)
def test_messages_without_a_return_path_are_kept_as_they_are(data: bytes) -> None:
    assert without_return_path(data) == data
    assert with_trace(
        data, "", ["a@b.test"]
    ) == b"Return-Path: <>\r\nDelivered-To: a@b.test\r\n" + (data)
