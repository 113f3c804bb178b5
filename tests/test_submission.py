"""The device's submission listener (RFC 6409): AUTH PLAIN and LOGIN with the IMAP passwords,
STARTTLS, a login sends only as itself, the 250 only once the message is on disk.

Protocol tests drive the server over an in-memory transport; the others use smtplib (and
swaks, where installed) against the listener on loopback, with the queue's disk work in the
reactor's thread pool, and, end to end, the relay to a stand-in of the edge.
"""

from __future__ import annotations

import base64
import shutil
import smtplib
import ssl
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import defer, threads
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from connector.credentials import Credentials
from connector.outbound.events import OutboundEventLog, OutboundEvents
from connector.outbound.queue import OutboundQueue
from connector.outbound.relay import EdgeRelay
from connector.outbound.submission import SubmissionHandler, from_addresses
from connector.receiver import ConnectorHandler
from edge.auththrottle import AuthThrottle
from edge.smtp.factory import SMTPServerFactory
from edge.smtp.server import Limits
from edge.tls import ensure_self_signed, server_context
from maildir import Maildir
from tests.edgerelay import DEVICE_ID, DEVICE_KEY, EdgeRelayStandIn, within

ALICE = "alice@example.test"
ALICE_PW = "alice-imap-password"
BOB = "bob@example.net"


def b64(text: str) -> bytes:
    return base64.b64encode(text.encode())


def message(sender: str = ALICE, subject: str = "hello") -> bytes:
    return f"From: Alice <{sender}>\r\nTo: {BOB}\r\nSubject: {subject}\r\n\r\nHi.\r\n".encode()


class Device:
    """A submission factory over a real queue, Maildir and credentials."""

    def __init__(
        self,
        root: Path,
        reactor: Any,
        *,
        run_blocking: Callable[..., defer.Deferred[Any]] = threads.deferToThread,
        relay: EdgeRelay | None = None,
        clock: Any = None,
    ) -> None:
        self.clock = clock or Clock()
        self.maildir = Maildir(root / "mail", hostname="device.test")
        self.creds = Credentials(root / "creds.json", imap={ALICE: ALICE_PW, BOB: "bob-pw"})
        self.log = OutboundEventLog(root / "device" / "outbound-events.jsonl", self.clock.seconds)
        self.queue = OutboundQueue(
            root / "device" / "outbound",
            self.maildir,
            OutboundEvents(self.log, run_blocking),
            clock=self.clock,
            run_blocking=run_blocking,
            hostname="device.test",
            relay=relay,
        )
        cert, key = root / "tls" / "cert.pem", root / "tls" / "key.pem"
        ensure_self_signed(cert, key, "device.test")
        self.throttle = AuthThrottle(reactor, base_delay=0.01, max_delay=0.05, per_connection=3)
        self.factory = SMTPServerFactory(
            lambda: SubmissionHandler(self.creds.check_imap, self.queue),
            Limits(max_message_size=100_000),
            "device.test",
            reactor,
            server_context(cert, key),
            auth_throttle=self.throttle,
            auth_service="submission",
        )
        self.dir = root / "device" / "outbound" / "queue"

    def queued(self) -> list[bytes]:
        return [p.read_bytes() for p in sorted(self.dir.glob("*.msg"))]


class Conn:
    def __init__(self, device: Device, peer: str = "127.0.0.1") -> None:
        self.proto = device.factory.buildProtocol(None)
        self.transport = StringTransport(
            peerAddress=IPv4Address("TCP", peer, 40000),
            hostAddress=IPv4Address("TCP", "127.0.0.1", 1587),
        )
        self.proto.makeConnection(self.transport)

    def send(self, data: bytes) -> list[str]:
        self.transport.clear()
        self.proto.dataReceived(data)
        return [ln for ln in self.transport.value().decode().split("\r\n") if ln]


# -- the protocol ------------------------------------------------------------------------------


def test_a_client_off_this_machine_is_refused_at_connect(tmp_path: Path) -> None:
    device = Device(tmp_path, Clock(), run_blocking=defer.maybeDeferred)
    conn = Conn(device, peer="192.0.2.7")
    assert conn.transport.value().startswith(b"554 5.7.1 ")
    assert conn.transport.disconnecting


def test_ehlo_offers_auth_plain_login_and_starttls(tmp_path: Path) -> None:
    conn = Conn(Device(tmp_path, Clock(), run_blocking=defer.maybeDeferred))
    lines = conn.send(b"EHLO client.test\r\n")
    assert "250-STARTTLS" in lines
    assert "250-AUTH PLAIN LOGIN" in lines or "250 AUTH PLAIN LOGIN" in lines


def test_auth_login_in_steps_and_with_the_user_name_at_once(tmp_path: Path) -> None:
    device = Device(tmp_path, Clock(), run_blocking=defer.maybeDeferred)
    conn = Conn(device)
    conn.send(b"EHLO client.test\r\n")
    assert conn.send(b"AUTH LOGIN\r\n") == ["334 VXNlcm5hbWU6"]
    assert conn.send(b64(ALICE) + b"\r\n") == ["334 UGFzc3dvcmQ6"]
    assert conn.send(b64(ALICE_PW) + b"\r\n") == ["235 2.7.0 Authentication succeeded"]
    assert conn.send(f"MAIL FROM:<{ALICE}>\r\n".encode())[0].startswith("250 ")

    other = Conn(device)
    other.send(b"EHLO client.test\r\n")
    assert other.send(b"AUTH LOGIN " + b64(ALICE) + b"\r\n") == ["334 UGFzc3dvcmQ6"]
    assert other.send(b"*\r\n")[0].startswith("501 5.5.4")
    assert other.send(b"AUTH LOGIN !!!\r\n")[0].startswith("501 5.5.4")
    assert other.send(b"AUTH CRAM-MD5\r\n")[0].startswith("504 ")


def test_the_edge_hop_still_offers_plain_only(tmp_path: Path) -> None:
    """LOGIN is offered where a policy asks for it; the connector's hop keeps PLAIN alone
    (the edge's delivery client would pick LOGIN over PLAIN)."""
    factory = SMTPServerFactory(
        lambda: ConnectorHandler(
            Maildir(tmp_path / "m"), "edge", "pw", defer.maybeDeferred, lambda _i: None
        ),
        Limits(),
        "device.test",
        Clock(),
    )
    proto = factory.buildProtocol(None)
    transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 1))
    proto.makeConnection(transport)
    proto.dataReceived(b"EHLO edge.test\r\n")
    assert b"250 AUTH PLAIN\r\n" in transport.value()
    transport.clear()
    proto.dataReceived(b"AUTH LOGIN\r\n")
    assert transport.value().startswith(b"504 ")


def test_the_250_comes_only_once_the_message_is_on_disk(tmp_path: Path) -> None:
    held: list[tuple[defer.Deferred[Any], Callable[..., Any], tuple[Any, ...]]] = []

    def run_later(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> defer.Deferred[Any]:
        d: defer.Deferred[Any] = defer.Deferred()
        held.append((d, lambda: fn(*args, **kwargs), ()))
        return d

    device = Device(tmp_path, Clock(), run_blocking=run_later)
    conn = Conn(device)
    conn.send(b"EHLO client.test\r\nAUTH PLAIN " + b64(f"\0{ALICE}\0{ALICE_PW}") + b"\r\n")
    conn.send(f"MAIL FROM:<{ALICE}>\r\nRCPT TO:<{BOB}>\r\nDATA\r\n".encode())
    assert conn.send(message() + b".\r\n") == []  # no answer while the write runs
    assert device.queued() == []
    d, work, _ = held.pop(0)
    d.callback(work())  # the write (Sent copy, queue file, event) is done
    (reply,) = conn.transport.value().decode().split("\r\n")[:-1]
    assert reply.startswith("250 2.0.0 Queued as out_")
    assert len(device.queued()) == 1


def test_from_addresses() -> None:
    assert from_addresses(b"Subject: x\r\n\r\n") is None
    assert from_addresses(b"From: A <A@X.test>, b@y.test\r\n\r\n") == ["a@x.test", "b@y.test"]
    assert from_addresses(b"From: =?utf-8?q?J=C3=B6?= <j@x.test>\r\n\r\n") == ["j@x.test"]
    assert from_addresses(b"From: undisclosed\r\n\r\n") == ["undisclosed"]


# -- smtplib on loopback -------------------------------------------------------------------------


@pytest.fixture
def listening(in_reactor: Any, tmp_path: Path) -> Iterator[tuple[Device, int]]:
    device = in_reactor(Device, tmp_path, in_reactor.reactor)
    port = in_reactor(in_reactor.reactor.listenTCP, 0, device.factory, interface="127.0.0.1")
    yield device, port.getHost().port
    in_reactor(port.stopListening)


def _tls() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def test_smtplib_auth_plain_sends_and_the_message_is_queued(listening: Any) -> None:
    device, port = listening
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as smtp:
        smtp.login(ALICE, ALICE_PW)
        code, reply = smtp.docmd("MAIL", f"FROM:<{ALICE}>")
        assert code == 250
        smtp.rcpt(BOB)
        code, reply = smtp.data(message())
    assert code == 250 and reply.startswith(b"2.0.0 Queued as out_")
    item_id = reply.decode().rsplit(" ", 1)[1]
    # On disk before the 250, with its Sent copy.
    (raw,) = device.queued()
    assert raw.startswith(f'{{"id": "{item_id}"'.encode())
    assert raw.endswith(b"\r\n\r\nHi.\r\n")
    assert len(device.maildir.folder("Sent").messages()) == 1


def test_smtplib_starttls_then_auth_login(listening: Any) -> None:
    device, port = listening
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as smtp:
        smtp.starttls(context=_tls())
        smtp.ehlo()
        assert "LOGIN" in smtp.esmtp_features["auth"]
        smtp.user, smtp.password = ALICE, ALICE_PW
        code, _ = smtp.auth("LOGIN", smtp.auth_login)
        assert code == 235
        refused = smtp.sendmail(ALICE, [BOB], message(subject="tls"))
    assert refused == {}
    assert len(device.queued()) == 1


def test_another_sender_gets_553(listening: Any) -> None:
    device, port = listening
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as smtp:
        smtp.login(ALICE, ALICE_PW)
        with pytest.raises(smtplib.SMTPSenderRefused) as refused:
            smtp.sendmail(BOB, [BOB], message(sender=BOB))
        assert refused.value.smtp_code == 553
        assert refused.value.smtp_error.startswith(b"5.7.1")
        smtp.rset()
        # The envelope is hers, the From field someone else's.
        with pytest.raises(smtplib.SMTPDataError) as data_refused:
            smtp.sendmail(ALICE, [BOB], message(sender=BOB))
        assert data_refused.value.smtp_code == 553
    assert device.queued() == []
    assert device.maildir.folder("Sent").messages() == []


def test_a_message_without_from_gets_the_login(listening: Any) -> None:
    device, port = listening
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as smtp:
        smtp.login(ALICE.upper(), ALICE_PW)
        smtp.sendmail(ALICE, [BOB], b"Subject: no from\r\n\r\nbody\r\n")
    (raw,) = device.queued()
    assert f"From: <{ALICE}>\r\n".encode() in raw


def test_a_bad_password_gets_535_through_the_throttle(listening: Any) -> None:
    device, port = listening
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as smtp:
        with pytest.raises(smtplib.SMTPAuthenticationError) as failed:
            smtp.login(ALICE, "wrong")
        assert failed.value.smtp_code == 535
        with pytest.raises(smtplib.SMTPSenderRefused) as refused:
            smtp.sendmail(ALICE, [BOB], message())
        assert refused.value.smtp_code == 530
    assert len(device.throttle) >= 1  # the failure counted for the address and the user
    assert device.queued() == []


def test_swaks_auth_plain_with_tls(listening: Any) -> None:
    if shutil.which("swaks") is None:
        pytest.skip("swaks is not installed")
    device, port = listening
    done = subprocess.run(
        [
            "swaks", "--server", "127.0.0.1", "--port", str(port), "--tls",
            "--auth", "PLAIN", "--auth-user", ALICE, "--auth-password", ALICE_PW,
            "--from", ALICE, "--to", BOB, "--h-From", f"<{ALICE}>",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "250 2.0.0 Queued as out_" in done.stdout
    assert len(device.queued()) == 1


# -- end to end: submission, queue, relay to the edge --------------------------------------------


def test_submitted_mail_is_relayed_to_the_edge(in_reactor: Any, tmp_path: Path) -> None:
    edge = EdgeRelayStandIn(tls_dir=tmp_path / "edge-tls")
    relay_port = in_reactor(edge.listen, in_reactor.reactor)
    relay = EdgeRelay(
        in_reactor.reactor,
        "device.test",
        lambda: f"127.0.0.1:{relay_port}",
        lambda: (DEVICE_ID, DEVICE_KEY),
    )
    device = in_reactor(Device, tmp_path, in_reactor.reactor, relay=relay)
    in_reactor(device.queue.startService)
    port = in_reactor(in_reactor.reactor.listenTCP, 0, device.factory, interface="127.0.0.1")
    try:
        with smtplib.SMTP("127.0.0.1", port.getHost().port, timeout=20) as smtp:
            smtp.starttls(context=_tls())
            smtp.login(ALICE, ALICE_PW)
            smtp.sendmail(ALICE, [BOB], message(subject="to the edge"))
        within(in_reactor, device.queue.when_drained)
        (taken,) = edge.taken
        assert taken.sender == ALICE and taken.recipients == [BOB]
        assert b"Subject: to the edge\r\n" in taken.data
        assert device.queued() == []
    finally:
        in_reactor(port.stopListening)
        within(in_reactor, device.queue.stopService)
        within(in_reactor, edge.stop)


# -- assembled as the device runs it -----------------------------------------------------------


def _device_config(tmp_path: Path) -> Any:
    from edge.config import Config

    config = Config()
    config.data_dir = str(tmp_path / "data")
    config.device.connector_listen = "127.0.0.1:0"
    config.device.imap_listen = "127.0.0.1:0"
    config.device.http_listen = "127.0.0.1:0"
    config.device.submission_listen = "127.0.0.1:0"
    config.device.addresses = [ALICE]
    return config


def test_a_submission_listener_off_loopback_is_refused(tmp_path: Path, in_reactor: Any) -> None:
    from connector.app import build_device
    from edge.config import ConfigError

    config = _device_config(tmp_path)
    config.device.submission_listen = "0.0.0.0:1587"
    with pytest.raises(ConfigError, match="submission_listen must listen on a loopback"):
        build_device(config, in_reactor.reactor)


def test_the_device_submits_and_relays_once_pointed_at_its_edge(
    tmp_path: Path, in_reactor: Any
) -> None:
    from connector.allinone import point_device_at_relay
    from connector.app import build_device

    device = in_reactor(build_device, _device_config(tmp_path), in_reactor.reactor)
    assert device.sending is not None and device.sending.submission is not None
    assert device.sending.poller is None  # no edge URL: nothing to poll
    assert device.api.device.submission_starttls
    # Linked as an approval (or the all-in-one's bootstrap) leaves it.
    link = device.registration.link
    link.status, link.device_id, link.device_key = "authorized", DEVICE_ID, DEVICE_KEY
    device.sending.relay.point_at("")  # as the all-in-one does until its edge listens
    in_reactor(device.service.startService)
    edge = EdgeRelayStandIn(tls_dir=tmp_path / "edge-tls")
    try:
        port = device.sending.submission.port
        with smtplib.SMTP("127.0.0.1", port, timeout=20) as smtp:
            smtp.starttls(context=_tls())
            smtp.login(ALICE, device.creds.imap[ALICE])
            smtp.sendmail(ALICE, [BOB], message(subject="assembled"))
        queue_dir = tmp_path / "data" / "device" / "outbound" / "queue"
        assert len(list(queue_dir.glob("*.msg"))) == 1
        assert len(device.maildir.folder("Sent").messages()) == 1
        assert edge.taken == []
        relay_port = in_reactor(edge.listen, in_reactor.reactor)
        in_reactor(point_device_at_relay, device, {"relay": f"127.0.0.1:{relay_port}"})
        within(in_reactor, device.sending.queue.when_drained)
        (taken,) = edge.taken
        assert taken.tls and b"Subject: assembled" in taken.data
        assert list(queue_dir.glob("*.msg")) == []
    finally:
        within(in_reactor, device.service.stopService)
        within(in_reactor, edge.stop)


def test_the_all_in_one_reports_submission_and_waits_for_its_relay(
    tmp_path: Path, in_reactor: Any
) -> None:
    from connector.allinone import build_allinone
    from edge.config import Config

    config = Config(data_dir=str(tmp_path / "aio"), hostname="aio.test")
    config.edge.mx_listen = config.edge.control_listen = "127.0.0.1:0"
    for name in ("connector_listen", "imap_listen", "http_listen", "submission_listen"):
        setattr(config.device, name, "127.0.0.1:0")
    _top, edge, device, report = in_reactor(build_allinone, config, in_reactor.reactor)
    try:
        assert "submission" in [str(listener.name) for listener in report.listeners]
        assert device.sending is not None
        assert device.sending.relay.address() == ""  # until its edge's relay listens
    finally:
        edge.store.close()
