"""STARTTLS on the MX over real TLS on 127.0.0.1: advertised, injection-proof, state reset.

The server runs in the test reactor (the `in_reactor` fixture) with the MX policy and a real
spool; clients are blocking sockets and smtplib in the test thread.
"""

from __future__ import annotations

import email
import re
import smtplib
import socket
import ssl
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import threads

from edge.inbound.policy import MXHandler
from edge.runtime.nowlater import NowOrLater
from edge.smtp.address import Path as SMTPPath
from edge.smtp.factory import SMTPServerFactory
from edge.smtp.proxy import ProxyProtocolFactory, trusted_networks
from edge.smtp.replies import Reply
from edge.smtp.server import Limits
from edge.smtp.session import Session
from edge.spool.spool import Envelope, Spool
from edge.store import RecipientTarget
from edge.tls import ensure_self_signed, server_context

KNOWN = "user@example.test"


def target(address: str) -> RecipientTarget | None:
    if address.lower() != KNOWN:
        return None
    return RecipientTarget(
        kind="device",
        address=address,
        device_id="dev_t",
        connector_smtp_addr="127.0.0.1:1",
        connector_username="edge",
        connector_secret="s",
        route_id="r",
        upstream_hosts=[],
    )


class RecordingMXHandler(MXHandler):
    """The real MX policy, noting every sender and recipient it was asked about."""

    def __init__(self, calls: list[str], *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.calls = calls

    def mail_from(self, session: Session, sender: SMTPPath) -> NowOrLater[Reply | None]:
        self.calls.append(f"MAIL {sender.address}")
        return super().mail_from(session, sender)

    def rcpt_to(self, session: Session, recipient: SMTPPath) -> NowOrLater[Reply | None]:
        self.calls.append(f"RCPT {recipient.address}")
        return super().rcpt_to(session, recipient)


@dataclass
class Server:
    port: int
    spool: Spool
    calls: list[str] = field(default_factory=list)
    accepted: list[Envelope] = field(default_factory=list)

    def messages(self) -> list[bytes]:
        return [self.spool.read(env.qid) for env in self.accepted]


def start_server(in_reactor: Any, tmp: Path, *, tls: bool = True, proxy: bool = False) -> Any:
    reactor = in_reactor.reactor
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    ensure_self_signed(cert, key, "mx.tls.test")
    context = server_context(cert, key) if tls else None
    spool = Spool(tmp / "spool")
    server = Server(0, spool)

    def handler() -> MXHandler:
        return RecordingMXHandler(
            server.calls,
            target,
            spool,
            "mx.tls.test",
            reactor,
            threads.deferToThread,
            server.accepted.append,
        )

    factory: Any = SMTPServerFactory(handler, Limits(), "mx.tls.test", reactor, context)
    if proxy:
        factory = ProxyProtocolFactory(factory, trusted_networks(["127.0.0.1/32"]), reactor)
    port = in_reactor(reactor.listenTCP, 0, factory, interface="127.0.0.1")
    server.port = port.getHost().port
    return server, port


@pytest.fixture
def tls_server(in_reactor: Any, tmp_path: Path) -> Iterator[Server]:
    server, port = start_server(in_reactor, tmp_path)
    yield server
    in_reactor(port.stopListening)


def client_context() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # the certificate is self-signed
    return ctx


class LineReader:
    """Reads SMTP replies from a socket (plain or TLS), one complete reply at a time."""

    def __init__(self, sock: socket.socket | ssl.SSLSocket) -> None:
        self.sock = sock
        self.buffer = b""

    def reply(self, timeout: float = 10.0) -> tuple[int, str]:
        self.sock.settimeout(timeout)
        lines: list[bytes] = []
        while True:
            while b"\r\n" not in self.buffer:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise ConnectionError(f"closed; got {lines!r} {self.buffer!r}")
                self.buffer += chunk
            line, self.buffer = self.buffer.split(b"\r\n", 1)
            lines.append(line)
            if line[3:4] == b" ":
                text = b"\n".join(entry[4:] for entry in lines).decode()
                return int(line[:3]), text

    def nothing_pending(self, wait: float = 0.5) -> bool:
        """True if the server sent nothing more within `wait` seconds."""
        if self.buffer:
            return False
        self.sock.settimeout(wait)
        try:
            data = self.sock.recv(65536)
        except (TimeoutError, ssl.SSLWantReadError):
            return True
        self.buffer += data
        return False

    def command(self, line: bytes) -> tuple[int, str]:
        self.sock.sendall(line)
        return self.reply()


def open_plain(port: int) -> tuple[socket.socket, LineReader]:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    reader = LineReader(sock)
    assert reader.reply()[0] == 220
    return sock, reader


def upgrade(sock: socket.socket, reader: LineReader) -> tuple[ssl.SSLSocket, LineReader]:
    assert reader.buffer == b"", "the server sent something after its 220 to STARTTLS"
    tls = client_context().wrap_socket(sock, server_hostname="mx.tls.test")
    return tls, LineReader(tls)


def test_starttls_is_advertised_with_a_certificate(tls_server: Server) -> None:
    sock, reader = open_plain(tls_server.port)
    code, text = reader.command(b"EHLO client.test\r\n")
    assert code == 250
    assert "STARTTLS" in text.split("\n")
    sock.close()


def test_starttls_is_not_advertised_without_a_certificate(in_reactor: Any, tmp_path: Path) -> None:
    server, port = start_server(in_reactor, tmp_path, tls=False)
    try:
        sock, reader = open_plain(server.port)
        code, text = reader.command(b"EHLO client.test\r\n")
        assert code == 250 and "STARTTLS" not in text
        assert reader.command(b"STARTTLS\r\n")[0] == 454
        sock.close()
    finally:
        in_reactor(port.stopListening)


def test_starttls_is_not_advertised_again_inside_tls(tls_server: Server) -> None:
    sock, reader = open_plain(tls_server.port)
    reader.command(b"EHLO client.test\r\n")
    assert reader.command(b"STARTTLS\r\n")[0] == 220
    tls, reader = upgrade(sock, reader)
    code, text = reader.command(b"EHLO client.test\r\n")
    assert code == 250 and "STARTTLS" not in text
    assert reader.command(b"STARTTLS\r\n")[0] == 503
    tls.close()


def test_commands_pipelined_after_starttls_are_discarded(tls_server: Server) -> None:
    sock, reader = open_plain(tls_server.port)
    reader.command(b"EHLO client.test\r\n")
    # One plaintext packet: STARTTLS and a whole injected transaction behind it.
    sock.sendall(
        b"STARTTLS\r\nMAIL FROM:<evil@attacker.test>\r\nRCPT TO:<" + KNOWN.encode() + b">\r\n"
        b"DATA\r\nSubject: injected\r\n\r\nevil\r\n.\r\n"
    )
    assert reader.reply() == (220, "2.0.0 Ready to start TLS")
    tls, reader = upgrade(sock, reader)
    # Nothing was answered for the injected commands, before or after the handshake.
    assert reader.nothing_pending()
    # The injected MAIL left no transaction behind: RCPT has no sender to belong to.
    assert reader.command(b"EHLO client.test\r\n")[0] == 250
    assert reader.command(b"RCPT TO:<" + KNOWN.encode() + b">\r\n")[0] == 503
    assert reader.command(b"QUIT\r\n")[0] == 221
    tls.close()
    assert tls_server.calls == []
    assert tls_server.accepted == []


def test_session_state_resets_after_the_handshake(tls_server: Server) -> None:
    sock, reader = open_plain(tls_server.port)
    reader.command(b"EHLO client.test\r\n")
    assert reader.command(b"STARTTLS\r\n")[0] == 220
    tls, reader = upgrade(sock, reader)
    # HELO/EHLO is forgotten: MAIL before a new EHLO is out of sequence.
    code, text = reader.command(b"MAIL FROM:<a@sender.test>\r\n")
    assert (code, text[:5]) == (503, "5.5.1")
    assert reader.command(b"EHLO client.test\r\n")[0] == 250
    assert reader.command(b"MAIL FROM:<a@sender.test>\r\n")[0] == 250
    tls.close()


def test_transaction_before_starttls_is_forgotten(tls_server: Server) -> None:
    sock, reader = open_plain(tls_server.port)
    reader.command(b"EHLO client.test\r\n")
    assert reader.command(b"MAIL FROM:<early@sender.test>\r\n")[0] == 250
    assert reader.command(b"STARTTLS\r\n")[0] == 220
    tls, reader = upgrade(sock, reader)
    assert reader.command(b"EHLO client.test\r\n")[0] == 250
    # The sender given in plaintext is gone: RCPT is out of sequence, a new MAIL is fine.
    assert reader.command(b"RCPT TO:<" + KNOWN.encode() + b">\r\n")[0] == 503
    assert reader.command(b"MAIL FROM:<late@sender.test>\r\n")[0] == 250
    tls.close()


def send_over_tls(port: int) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
        smtp.ehlo("client.test")
        smtp.starttls(context=client_context())
        smtp.ehlo("client.test")
        refused = smtp.sendmail(
            "a@sender.test", [KNOWN], b"Subject: over tls\r\n\r\nencrypted body\r\n"
        )
        assert refused == {}


def test_mail_over_tls_is_accepted_and_marked_esmtps(tls_server: Server) -> None:
    send_over_tls(tls_server.port)
    [raw] = tls_server.messages()
    msg = email.message_from_bytes(raw)
    assert msg["Subject"] == "over tls"
    assert " with ESMTPS id " in " ".join(msg["Received"].split())
    assert raw.endswith(b"\r\n\r\nencrypted body\r\n")


def test_received_header_records_tls_version_and_cipher(tls_server: Server) -> None:
    send_over_tls(tls_server.port)
    [raw] = tls_server.messages()
    received = " ".join(email.message_from_bytes(raw)["Received"].split())
    assert re.search(r"\(using TLSv1\.[23] with cipher [A-Z0-9_-]+ \(\d+/\d+ bits\)\)", received)


def test_starttls_behind_the_proxy_protocol(in_reactor: Any, tmp_path: Path) -> None:
    server, port = start_server(in_reactor, tmp_path, proxy=True)
    try:
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        sock.sendall(b"PROXY TCP4 198.51.100.20 192.0.2.1 40000 25\r\n")
        reader = LineReader(sock)
        assert reader.reply()[0] == 220
        reader.command(b"EHLO client.test\r\n")
        assert reader.command(b"STARTTLS\r\n")[0] == 220
        tls, reader = upgrade(sock, reader)
        assert reader.command(b"EHLO client.test\r\n")[0] == 250
        assert reader.command(b"MAIL FROM:<a@sender.test>\r\n")[0] == 250
        assert reader.command(b"RCPT TO:<" + KNOWN.encode() + b">\r\n")[0] == 250
        assert reader.command(b"DATA\r\n")[0] == 354
        assert reader.command(b"Subject: proxied\r\n\r\nhi\r\n.\r\n")[0] == 250
        reader.command(b"QUIT\r\n")
        tls.close()
        [raw] = server.messages()
        received = " ".join(email.message_from_bytes(raw)["Received"].split())
        assert "[198.51.100.20]" in received and "ESMTPS" in received
        assert server.accepted[0].client_ip == "198.51.100.20"
    finally:
        in_reactor(port.stopListening)


@pytest.mark.parametrize("utf8", [True, False])
def test_the_envelope_records_whether_mail_came_with_smtputf8(
    in_reactor: Any, tmp_path: Path, utf8: bool
) -> None:
    server, port = start_server(in_reactor, tmp_path, tls=False)
    try:
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        reader = LineReader(sock)
        assert reader.reply()[0] == 220
        assert reader.command(b"EHLO client.test\r\n")[0] == 250
        param = b" SMTPUTF8" if utf8 else b""
        assert reader.command(b"MAIL FROM:<a@sender.test>" + param + b"\r\n")[0] == 250
        assert reader.command(b"RCPT TO:<" + KNOWN.encode() + b">\r\n")[0] == 250
        assert reader.command(b"DATA\r\n")[0] == 354
        body = "Subject: Grüße\r\n\r\nhi\r\n.\r\n".encode()
        assert reader.command(body)[0] == 250
        reader.command(b"QUIT\r\n")
        sock.close()
        assert server.accepted[0].smtputf8 is utf8
        [loaded] = Spool(tmp_path / "spool").load()
        assert loaded.smtputf8 is utf8  # kept in the spool across a restart
    finally:
        in_reactor(port.stopListening)
