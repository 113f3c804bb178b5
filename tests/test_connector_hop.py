"""The edge-to-device hop: STARTTLS to the connector's own key, pinned, and no AUTH in the clear.

The policy of who may authenticate without TLS is tested with addresses (the connector does
not take the PROXY protocol, so a socket on 127.0.0.1 can only ever be loopback); the hop
itself over real sockets on 127.0.0.1: the edge's `SMTPDeliverer` to the real connector, and
to an aiosmtpd peer with its own certificate that records the commands it is sent.
"""

from __future__ import annotations

import base64
import os
import ssl
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP, AuthResult
from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from connector.app import build_device, connector_tls
from connector.hoppolicy import TAILNET, listen_refusal, parse_networks, plaintext_allowed
from connector.receiver import ConnectorHandler
from edge.config import Config, ConfigError
from edge.delivery.client import SMTPDeliverer
from edge.delivery.outcomes import Outcome
from edge.delivery.routing import Target, routed_target
from edge.smtp.factory import SMTPServerFactory
from edge.smtp.server import Limits
from edge.smtp.session import Session
from edge.store.records import RecipientTarget
from edge.tls import ensure_self_signed, is_pin, pin_of_file, server_context
from maildir import Maildir, MessageInfo
from tests.fakes import AnyPortController

USER = "edge"
PASSWORD = "connector secret of the device"
SENDER = "carol@sender.test"
A = "alice@example.test"
BODY = b"X-Tailpost-Queue-ID: Q1\r\nSubject: hi\r\n\r\nhello\r\n"
OTHER_PIN = base64.b64encode(bytes(32)).decode()


def plain(username: str = USER, password: str = PASSWORD) -> str:
    return base64.b64encode(f"\0{username}\0{password}".encode()).decode()


# -- who may authenticate in the clear -------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("100.64.0.7", True),
        ("100.127.255.254", True),
        ("fd7a:115c:a1e0::53", True),
        ("::ffff:100.64.0.7", True),  # a dual-stack socket's view of a tailnet peer
        ("::ffff:127.0.0.1", True),
        ("100.128.0.1", False),  # just past 100.64.0.0/10
        ("100.63.255.255", False),
        ("192.168.1.20", False),
        ("203.0.113.9", False),
        ("fd7a:115c:a1e1::1", False),
        ("2001:db8::1", False),
        ("0.0.0.0", False),
        ("::", False),
        ("localhost", False),  # a name is not an address: never trusted
        ("device.example", False),
        ("", False),
        ("unknown", False),
    ],
)
def test_plaintext_is_allowed_only_on_loopback_and_the_tailnet(host: str, allowed: bool) -> None:
    assert plaintext_allowed(host, TAILNET) is allowed


def test_plaintext_networks_are_the_operators_choice() -> None:
    lan = parse_networks(["192.168.1.0/24"])
    assert plaintext_allowed("192.168.1.20", lan)
    assert not plaintext_allowed("100.64.0.7", lan)  # the tailnet only by default
    assert plaintext_allowed("127.0.0.1", ())  # loopback always
    assert not plaintext_allowed("100.64.0.7", ())


@pytest.mark.parametrize(
    ("listen", "refused"),
    [
        ("127.0.0.1:2525", False),
        ("[::1]:2525", False),
        ("localhost:2525", False),
        ("100.64.0.7:2525", False),
        ("[fd7a:115c:a1e0::7]:2525", False),
        ("0.0.0.0:2525", True),
        ("[::]:2525", True),
        (":2525", True),
        ("192.168.1.20:2525", True),
        ("device.example:2525", True),
    ],
)
def test_a_connector_without_tls_listens_only_where_plaintext_is_allowed(
    listen: str, refused: bool
) -> None:
    assert (listen_refusal(listen, TAILNET, tls=False) is not None) is refused
    assert listen_refusal(listen, TAILNET, tls=True) is None


# -- the connector's SMTP policy, with the peer's address as given ---------------------------


def session_from(
    peer: IPv4Address | IPv6Address, root: Path
) -> tuple[Any, StringTransport, Maildir]:
    maildir = Maildir(root / "mail", hostname="device.test")

    def run(fn: Any, *args: Any) -> defer.Deferred[Any]:
        return defer.maybeDeferred(fn, *args)

    factory = SMTPServerFactory(
        lambda: ConnectorHandler(maildir, USER, PASSWORD, run, lambda info: None),
        Limits(),
        "device.test",
        Clock(),
    )
    proto = factory.buildProtocol(None)
    transport = StringTransport(peerAddress=peer, hostAddress=IPv4Address("TCP", "10.0.0.2", 25))
    proto.makeConnection(transport)
    transport.clear()
    return proto, transport, maildir


def say(proto: Any, transport: StringTransport, line: str) -> str:
    transport.clear()
    proto.dataReceived(line.encode() + b"\r\n")
    return transport.value().decode()


@pytest.mark.parametrize(
    "peer",
    [IPv4Address("TCP", "203.0.113.9", 40000), IPv6Address("TCP", "2001:db8::9", 40000)],
)
def test_a_peer_outside_the_plaintext_networks_cannot_auth_in_the_clear(
    peer: IPv4Address | IPv6Address, tmp_path: Path
) -> None:
    proto, transport, _maildir = session_from(peer, tmp_path)
    ehlo = say(proto, transport, "EHLO edge.test")
    assert ehlo.startswith("250") and "AUTH" not in ehlo  # RFC 4954 §4: not before STARTTLS
    assert say(proto, transport, f"AUTH PLAIN {plain()}").startswith("538 5.7.11 ")
    assert say(proto, transport, f"MAIL FROM:<{SENDER}>") == (
        "530 5.7.0 Must issue a STARTTLS command first\r\n"
    )


@pytest.mark.parametrize(
    "peer",
    [
        IPv4Address("TCP", "100.64.0.1", 40000),
        IPv6Address("TCP", "fd7a:115c:a1e0::1", 40000),
        IPv4Address("TCP", "127.0.0.1", 40000),
    ],
)
def test_a_tailnet_or_loopback_peer_may_auth_in_the_clear(
    peer: IPv4Address | IPv6Address, tmp_path: Path
) -> None:
    proto, transport, _maildir = session_from(peer, tmp_path)
    assert "AUTH PLAIN" in say(proto, transport, "EHLO edge.test")
    assert say(proto, transport, f"AUTH PLAIN {plain()}").startswith("235 ")
    assert say(proto, transport, f"MAIL FROM:<{SENDER}>").startswith("250 ")


# -- the device's certificate and its listener ------------------------------------------------


def device_config(tmp_path: Path, listen: str = "127.0.0.1:0", tls: bool = True) -> Config:
    config = Config()
    config.data_dir = str(tmp_path / "data")
    config.device.connector_listen = listen
    config.device.imap_listen = "127.0.0.1:0"
    config.device.http_listen = "127.0.0.1:0"
    config.device.connector_tls = tls
    return config


def test_the_device_makes_its_certificate_once_with_a_private_key(tmp_path: Path) -> None:
    config = device_config(tmp_path)
    context, pin = connector_tls(config)
    tls_dir = tmp_path / "data" / "device" / "tls"
    key = tls_dir / "connector-key.pem"
    assert context is not None and pin is not None and is_pin(pin)
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    assert pin == pin_of_file(tls_dir / "connector-cert.pem")
    assert connector_tls(config)[1] == pin  # the next start keeps the key, so the pin


def test_the_pin_is_the_keys_so_a_renewed_certificate_keeps_it(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    ensure_self_signed(cert, key, "device.test")
    pin = pin_of_file(cert)
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization

    old = x509.load_pem_x509_certificate(cert.read_bytes())
    private = serialization.load_pem_private_key(key.read_bytes(), None)
    renewed = (
        x509.CertificateBuilder()
        .subject_name(old.subject)
        .issuer_name(old.issuer)
        .public_key(old.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(old.not_valid_before_utc)
        .not_valid_after(old.not_valid_after_utc)
        .sign(private, hashes.SHA256())  # type: ignore[arg-type]
    )
    cert.write_bytes(renewed.public_bytes(serialization.Encoding.PEM))
    assert renewed.fingerprint(hashes.SHA256()) != old.fingerprint(hashes.SHA256())
    assert pin_of_file(cert) == pin
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    ensure_self_signed(fresh / "cert.pem", fresh / "key.pem", "device.test")
    assert pin_of_file(fresh / "cert.pem") != pin  # a new key is a new pin


@pytest.mark.parametrize("listen", ["0.0.0.0:2525", "192.168.1.20:2525"])
def test_a_connector_without_tls_outside_the_plaintext_networks_does_not_start(
    tmp_path: Path, in_reactor: Any, listen: str
) -> None:
    with pytest.raises(ConfigError, match="plaintext_networks"):
        build_device(device_config(tmp_path, listen, tls=False), in_reactor.reactor)
    assert not (tmp_path / "data" / "device").exists()  # refused before anything was made


def test_a_connector_with_tls_may_listen_anywhere(tmp_path: Path, in_reactor: Any) -> None:
    device = build_device(device_config(tmp_path, "0.0.0.0:0"), in_reactor.reactor)
    assert device.tls_pin is not None and is_pin(device.tls_pin)
    plain_ok = build_device(
        device_config(tmp_path / "b", "100.64.0.7:0", tls=False), in_reactor.reactor
    )
    assert plain_ok.tls_pin is None


# -- over sockets: the edge's client and the real connector -----------------------------------


class SeeingHandler(ConnectorHandler):
    """The connector's own policy; it notes how each transaction's session was secured."""

    def __init__(self, *args: Any, seen: list[str | None], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seen = seen

    def data(self, session: Session) -> Any:
        self.seen.append(session.tls)
        return super().data(session)


@dataclass
class Connector:
    maildir: Maildir
    port: int
    pin: str
    tls_seen: list[str | None] = field(default_factory=list)
    stored: list[MessageInfo] = field(default_factory=list)


@pytest.fixture
def connector(tmp_path: Path, in_reactor: Any) -> Iterator[Connector]:
    from twisted.internet.threads import deferToThread

    cert, key = tmp_path / "tls" / "cert.pem", tmp_path / "tls" / "key.pem"
    ensure_self_signed(cert, key, "device.test")
    maildir = Maildir(tmp_path / "mail", hostname="device.test")
    made = Connector(maildir, 0, pin_of_file(cert))
    factory = SMTPServerFactory(
        lambda: SeeingHandler(
            maildir, USER, PASSWORD, deferToThread, made.stored.append, seen=made.tls_seen
        ),
        Limits(),
        "device.test",
        in_reactor.reactor,
        server_context(cert, key),
    )
    port = in_reactor(in_reactor.reactor.listenTCP, 0, factory, interface="127.0.0.1")
    made.port = port.getHost().port
    yield made
    in_reactor(port.stopListening)


def device_target(port: int, pin: str | None, password: str = PASSWORD) -> Target:
    """The target the edge's router makes of a device whose connector has `pin`."""
    return routed_target(
        RecipientTarget(
            kind="device",
            address=A,
            device_id="dev1",
            connector_smtp_addr=f"127.0.0.1:{port}",
            connector_username=USER,
            connector_secret=password,
            route_id=None,
            upstream_hosts=[],
            connector_tls_pin=pin,
        )
    )


def deliver(in_reactor: Any, target: Target, timeout: float = 10) -> Outcome:
    deliverer = SMTPDeliverer(in_reactor.reactor, "edge.test", timeout=timeout)

    async def run() -> dict[str, Outcome]:
        try:
            return await deliverer.deliver(target, SENDER, [A], BODY)
        finally:
            await deliverer.close()

    outcomes: dict[str, Outcome] = in_reactor(lambda: defer.ensureDeferred(run()))
    return outcomes[A]


def test_the_edge_delivers_over_starttls_to_the_pinned_key(
    in_reactor: Any, connector: Connector
) -> None:
    outcome = deliver(in_reactor, device_target(connector.port, connector.pin))
    assert outcome.delivered, outcome
    assert len(connector.stored) == 1
    [tls] = connector.tls_seen
    assert tls is not None and tls.startswith("TLSv1.")  # the session was encrypted


def test_a_wrong_pin_is_a_temporary_failure_and_nothing_is_stored(
    in_reactor: Any, connector: Connector
) -> None:
    outcome = deliver(in_reactor, device_target(connector.port, OTHER_PIN))
    assert outcome.code == 451 and not outcome.final and not outcome.connected
    assert "pin" in outcome.text and connector.pin in outcome.text and OTHER_PIN in outcome.text
    assert connector.stored == [] and connector.tls_seen == []


# -- over sockets: a peer that records what it is sent ---------------------------------------


class RecordingSMTP(SMTP):
    """aiosmtpd's server, noting each command the client sends."""

    def __init__(self, *args: Any, commands: list[str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.commands = commands

    async def smtp_STARTTLS(self, arg: str) -> None:
        self.commands.append("STARTTLS")
        await super().smtp_STARTTLS(arg)

    async def smtp_AUTH(self, arg: str) -> None:
        self.commands.append(f"AUTH {arg}")
        await super().smtp_AUTH(arg)

    async def smtp_MAIL(self, arg: str) -> None:
        self.commands.append("MAIL")
        await super().smtp_MAIL(arg)


class RecordingController(AnyPortController):
    def __init__(self, *args: Any, commands: list[str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.commands = commands

    def factory(self) -> SMTP:
        return RecordingSMTP(self.handler, commands=self.commands, **self.SMTP_kwargs)


class Sink:
    def __init__(self) -> None:
        self.messages: list[bytes] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages.append(envelope.original_content)
        return "250 2.0.0 stored"


@dataclass
class FakeDevice:
    port: int
    pin: str
    commands: list[str]
    sink: Sink


def _authenticator(server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> Any:
    ok = data.login == USER.encode() and data.password == PASSWORD.encode()
    return AuthResult(success=ok)


@pytest.fixture(params=[True, False], ids=["starttls", "no-starttls"])
def fake_device(request: Any, tmp_path: Path) -> Iterator[FakeDevice]:
    """A device's connector outside tailpost, with its own certificate; it offers AUTH
    in the clear too, so that only the edge's own rule keeps the password back."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    ensure_self_signed(cert, key, "fake-device.test")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    commands: list[str] = []
    sink = Sink()
    controller = RecordingController(
        sink,
        commands=commands,
        hostname="127.0.0.1",
        port=0,
        server_hostname="fake-device.test",
        tls_context=context if request.param else None,
        require_starttls=False,
        auth_require_tls=False,
        authenticator=_authenticator,
    )
    controller.start()
    try:
        yield FakeDevice(int(controller.port), pin_of_file(cert), commands, sink)
    finally:
        controller.stop()


def test_no_credentials_go_to_a_peer_without_the_pinned_key(
    in_reactor: Any, fake_device: FakeDevice
) -> None:
    outcome = deliver(in_reactor, device_target(fake_device.port, OTHER_PIN))
    assert outcome.code == 451 and not outcome.final and not outcome.connected
    assert not any(c.startswith("AUTH") for c in fake_device.commands), fake_device.commands
    assert "MAIL" not in fake_device.commands and fake_device.sink.messages == []


def test_the_pinned_peer_gets_auth_only_inside_tls(
    in_reactor: Any, fake_device: FakeDevice
) -> None:
    outcome = deliver(in_reactor, device_target(fake_device.port, fake_device.pin))
    if "STARTTLS" not in fake_device.commands:
        # No STARTTLS offered: with a pin, that is a failure of the connection, not AUTH.
        assert outcome.code == 451 and not outcome.connected
        assert "STARTTLS" in outcome.text
        assert not any(c.startswith("AUTH") for c in fake_device.commands)
        return
    assert outcome.delivered, outcome
    assert fake_device.commands[0] == "STARTTLS" and fake_device.commands[1].startswith("AUTH")
    assert fake_device.sink.messages == [BODY]


def test_without_a_pin_the_edge_still_uses_starttls_where_offered(
    in_reactor: Any, fake_device: FakeDevice
) -> None:
    # A device that registered before it sent a pin: STARTTLS where offered, else the clear
    # (the connector itself allows that only on loopback and the tailnet).
    outcome = deliver(in_reactor, device_target(fake_device.port, None))
    assert outcome.delivered, outcome
    offered = fake_device.commands[0] == "STARTTLS"
    assert offered == ("STARTTLS" in fake_device.commands)


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ('[device]\nplaintext_networks = ["10.0.0.0/33"]\n', "plaintext_networks"),
        ("[device]\nplaintext_networks = [7]\n", "plaintext_networks"),
        ('[device]\nconnector_tls_cert = "/x/cert.pem"\n', "go together"),
        ('[device]\nconnector_tls = "yes"\n', "connector_tls"),
    ],
)
def test_bad_hop_settings_are_refused(tmp_path: Path, toml: str, message: str) -> None:
    from edge.config import load_config

    path = tmp_path / "c.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError, match=message):
        load_config(path)
