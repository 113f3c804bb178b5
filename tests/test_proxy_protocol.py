"""PROXY protocol v1/v2 in front of the MX: the header parser, the trust rule, the bounds.

Parser cases are table-driven; the wrapper is driven over an in-memory transport with a
fake clock (timeouts) and over real sockets on 127.0.0.1 in the test reactor.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from edge.app import build_edge
from edge.config import ConfigError, load_config
from edge.smtp import replies
from edge.smtp.address import Path as SMTPPath
from edge.smtp.factory import SMTPServerFactory
from edge.smtp.proxy import (
    V2_SIGNATURE,
    ProxyHeaderError,
    ProxyProtocolFactory,
    is_trusted,
    parse_header,
    trusted_networks,
)
from edge.smtp.replies import Reply, SMTPReplyError
from edge.smtp.server import Limits
from edge.smtp.session import Session


def v2(
    command: int = 0x1,
    family: int = 0x11,
    body: bytes | None = None,
    length: int | None = None,
    version: int = 0x2,
) -> bytes:
    if body is None:
        body = socket.inet_aton("203.0.113.7") + socket.inet_aton("192.0.2.1")
        body += struct.pack("!HH", 51000, 25)
    size = len(body) if length is None else length
    return V2_SIGNATURE + bytes([(version << 4) | command, family]) + struct.pack("!H", size) + body


V2_IPV6_BODY = (
    socket.inet_pton(socket.AF_INET6, "2001:db8::7")
    + socket.inet_pton(socket.AF_INET6, "2001:db8::1")
    + struct.pack("!HH", 51000, 25)
)
V2_TLVS = bytes([0x05, 0x00, 0x04]) + b"uid1" + bytes([0xEA, 0x00, 0x03]) + b"vpc"


@pytest.mark.parametrize(
    ("header", "source", "destination"),
    [
        (
            b"PROXY TCP4 203.0.113.7 192.0.2.1 51000 25\r\n",
            IPv4Address("TCP", "203.0.113.7", 51000),
            IPv4Address("TCP", "192.0.2.1", 25),
        ),
        (
            b"PROXY TCP6 2001:db8::7 2001:db8::1 51000 25\r\n",
            IPv6Address("TCP", "2001:db8::7", 51000),
            IPv6Address("TCP", "2001:db8::1", 25),
        ),
        (
            b"PROXY TCP6 ::ffff:203.0.113.7 ::ffff:192.0.2.1 51000 25\r\n",
            IPv4Address("TCP", "203.0.113.7", 51000),
            IPv4Address("TCP", "192.0.2.1", 25),
        ),
        (b"PROXY UNKNOWN\r\n", None, None),
        (b"PROXY UNKNOWN ff:: ff:: 1 2\r\n", None, None),
        (v2(), IPv4Address("TCP", "203.0.113.7", 51000), IPv4Address("TCP", "192.0.2.1", 25)),
        (
            v2(family=0x21, body=V2_IPV6_BODY),
            IPv6Address("TCP", "2001:db8::7", 51000),
            IPv6Address("TCP", "2001:db8::1", 25),
        ),
        (
            v2(body=v2()[16:] + V2_TLVS),
            IPv4Address("TCP", "203.0.113.7", 51000),
            IPv4Address("TCP", "192.0.2.1", 25),
        ),
        (v2(command=0x0, family=0x00, body=b""), None, None),  # LOCAL: a health check
        (v2(family=0x00, body=b""), None, None),  # PROXY with UNSPEC family
    ],
)
def test_valid_headers(header: bytes, source: Any, destination: Any) -> None:
    parsed = parse_header(header + b"EHLO x\r\n")
    assert parsed == (source, destination, len(header))
    for cut in range(len(header)):
        assert parse_header(header[:cut]) is None, cut  # incomplete: wait for more


@pytest.mark.parametrize(
    "header",
    [
        b"EHLO client.test\r\n",
        b"proxy TCP4 203.0.113.7 192.0.2.1 51000 25\r\n",
        b"PROXY TCP4 203.0.113.7 192.0.2.1 51000 25\n",  # bare LF
        b"PROXY TCP4 203.0.113.7 192.0.2.1 51000\r\n",
        b"PROXY TCP4 203.0.113.999 192.0.2.1 51000 25\r\n",
        b"PROXY TCP4 2001:db8::7 192.0.2.1 51000 25\r\n",
        b"PROXY TCP6 203.0.113.7 192.0.2.1 51000 25\r\n",
        b"PROXY TCP4 203.0.113.7 192.0.2.1 70000 25\r\n",
        b"PROXY TCP4 203.0.113.7 192.0.2.1 -1 25\r\n",
        b"PROXY TCP4 203.0.113.7 192.0.2.1 x 25\r\n",
        b"PROXY UDP4 203.0.113.7 192.0.2.1 51000 25\r\n",
        b"PROXY TCP4 \xff\xfe 192.0.2.1 51000 25\r\n",
        b"PROXY TCP4 " + b"1" * 120 + b"\r\n",  # longer than 107 octets
        b"PROXY TCP4 " + b"1" * 120,  # ... even before its end arrives
        v2(version=0x1),
        v2(command=0x2),
        v2(family=0x12),  # a datagram connection
        v2(family=0x31, body=b"/a".ljust(108, b"\0") + b"/b".ljust(108, b"\0")),
        v2(body=b"\x01\x02\x03\x04"),  # address block cut short
        v2(body=b"\0" * 2000),  # longer than the bound
        v2(length=60000, body=b""),  # announced longer than the bound: refused at once
        V2_SIGNATURE[:11] + b"X" + b"\0" * 8,
    ],
)
def test_malformed_headers_are_refused(header: bytes) -> None:
    with pytest.raises(ProxyHeaderError):
        parse_header(header)


def test_trusted_networks() -> None:
    nets = trusted_networks(["127.0.0.1/32", "10.0.0.0/8", "2001:db8::/32"])
    assert is_trusted("127.0.0.1", nets)
    assert is_trusted("10.200.0.3", nets)
    assert is_trusted("::ffff:10.1.2.3", nets)
    assert is_trusted("2001:db8::5", nets)
    assert not is_trusted("127.0.0.2", nets)
    assert not is_trusted("192.0.2.1", nets)
    assert not is_trusted("not-an-ip", nets)
    with pytest.raises(ValueError, match="10.0.0.1/8"):
        trusted_networks(["10.0.0.1/8"])


class PeerHandler:
    """A minimal MX policy that remembers the peer each session saw."""

    auth_offered = False
    auth_required = False

    def __init__(self, peers: list[str]) -> None:
        self.peers = peers

    def connect(self, session: Session) -> None:
        self.peers.append(session.peer_host)

    def authenticate(self, session: Session, username: str, password: str) -> bool:
        return False

    def mail_from(self, session: Session, sender: SMTPPath) -> None:
        return None

    def rcpt_to(self, session: Session, recipient: SMTPPath) -> Reply | None:
        raise SMTPReplyError(replies.S550_NO_SUCH_USER)

    def data(self, session: Session) -> Any:
        raise SMTPReplyError(replies.S554_NO_VALID_RCPTS)


class Wrapped:
    """One wrapped connection over an in-memory transport and a fake clock."""

    def __init__(
        self,
        socket_peer: str = "127.0.0.1",
        trusted: tuple[str, ...] = ("127.0.0.1/32",),
        limits: Limits | None = None,
        factory: ProxyProtocolFactory | None = None,
    ) -> None:
        self.clock = Clock()
        self.peers: list[str] = []
        if factory is None:
            smtp = SMTPServerFactory(
                lambda: PeerHandler(self.peers), limits or Limits(), "mx.test", self.clock
            )
            factory = ProxyProtocolFactory(smtp, trusted_networks(trusted), self.clock, 5.0)
        self.factory = factory
        self.proto = factory.buildProtocol(None)
        self.transport = StringTransport(
            peerAddress=IPv4Address("TCP", socket_peer, 40000),
            hostAddress=IPv4Address("TCP", "127.0.0.1", 25),
        )
        self.proto.makeConnection(self.transport)

    def feed(self, data: bytes) -> bytes:
        self.transport.clear()
        self.proto.dataReceived(data)
        return bytes(self.transport.value())


def test_greeting_waits_for_the_header_and_session_sees_the_client() -> None:
    conn = Wrapped()
    assert conn.transport.value() == b""  # no 220 before the header
    out = conn.feed(b"PROXY TCP4 203.0.113.7 192.0.2.1 51000 25\r\n")
    assert out.startswith(b"220 ")
    assert conn.peers == ["203.0.113.7"]
    assert conn.proto.getPeer() == IPv4Address("TCP", "203.0.113.7", 51000)
    assert conn.proto.getHost() == IPv4Address("TCP", "192.0.2.1", 25)
    assert conn.feed(b"NOOP\r\n").startswith(b"250 ")


def test_header_arriving_one_octet_at_a_time() -> None:
    conn = Wrapped()
    header = v2()
    for i, octet in enumerate(header[:-1]):
        assert conn.feed(bytes([octet])) == b"", i
        assert not conn.transport.disconnecting
    assert conn.feed(header[-1:]).startswith(b"220 ")
    assert conn.peers == ["203.0.113.7"]


def test_commands_in_the_same_packet_as_the_header_reach_smtp() -> None:
    conn = Wrapped()
    out = conn.feed(b"PROXY TCP4 203.0.113.7 192.0.2.1 51000 25\r\nEHLO client.test\r\n")
    assert out.startswith(b"220 ")
    assert b"250-PIPELINING" in out


def test_local_header_keeps_the_socket_address() -> None:
    conn = Wrapped()
    assert conn.feed(v2(command=0x0, family=0x00, body=b"")).startswith(b"220 ")
    assert conn.peers == ["127.0.0.1"]


@pytest.mark.parametrize(
    "garbage",
    [
        b"EHLO client.test\r\n",
        b"PROXY TCP4 203.0.113.7 192.0.2.1 51000 99999\r\nEHLO x\r\n",
        b"PROXY TCP4 " + b"9" * 200,
        v2(length=5000, body=b""),
    ],
)
def test_malformed_header_closes_without_reaching_smtp(garbage: bytes) -> None:
    conn = Wrapped()
    assert conn.feed(garbage) == b""
    assert conn.transport.disconnecting
    assert conn.peers == []
    conn.proto.connectionLost(None)  # type: ignore[arg-type]
    assert not conn.factory.protocols


def test_header_timeout_closes_the_connection() -> None:
    conn = Wrapped()
    conn.feed(b"PROXY TCP4 203.0.113.7")
    conn.clock.advance(4.9)
    assert not conn.transport.disconnecting
    conn.clock.advance(0.2)
    assert conn.transport.disconnecting
    assert conn.transport.value() == b"" and conn.peers == []


def test_complete_header_cancels_the_timeout() -> None:
    conn = Wrapped(limits=Limits(idle_timeout=300))
    conn.feed(b"PROXY TCP4 203.0.113.7 192.0.2.1 51000 25\r\n")
    conn.clock.advance(60)
    assert not conn.transport.disconnecting
    assert conn.feed(b"NOOP\r\n").startswith(b"250 ")


def test_untrusted_source_is_plain_smtp_and_its_header_is_not_honoured() -> None:
    conn = Wrapped(socket_peer="192.0.2.99", trusted=("10.0.0.0/8",))
    assert conn.transport.value().startswith(b"220 ")  # greeted at once: no header expected
    out = conn.feed(b"PROXY TCP4 203.0.113.7 192.0.2.1 51000 25\r\n")
    assert out.startswith(b"500 5.5.2")
    assert conn.peers == ["192.0.2.99"]
    assert conn.proto.getPeer() == IPv4Address("TCP", "192.0.2.99", 40000)


def test_per_ip_limit_counts_the_real_client() -> None:
    clock = Clock()
    peers: list[str] = []
    smtp = SMTPServerFactory(
        lambda: PeerHandler(peers), Limits(max_connections_per_ip=1), "mx.test", clock
    )
    factory = ProxyProtocolFactory(smtp, trusted_networks(["127.0.0.1/32"]), clock)
    first = Wrapped(factory=factory)
    second = Wrapped(factory=factory)
    third = Wrapped(factory=factory)
    header = b"PROXY TCP4 %s 192.0.2.1 51000 25\r\n"
    assert first.feed(header % b"203.0.113.7").startswith(b"220 ")
    assert second.feed(header % b"203.0.113.7").startswith(b"421 4.7.0")
    assert third.feed(header % b"203.0.113.8").startswith(b"220 ")  # same balancer, other client


def test_connection_lost_before_the_header_leaves_nothing_registered() -> None:
    conn = Wrapped()
    conn.feed(b"PROXY TCP4 203")
    conn.proto.connectionLost(None)  # type: ignore[arg-type]
    assert not conn.factory.protocols
    conn.clock.advance(60)  # the header deadline was cancelled
    assert conn.clock.getDelayedCalls() == []


# -- over real sockets, through the edge's own assembly --------------------------------


@pytest.fixture
def proxied_edge(in_reactor: Any, tmp_path: Path) -> Iterator[tuple[Any, int]]:
    config_path = tmp_path / "edge.toml"
    config_path.write_text(
        'hostname = "mx.proxy.test"\n[edge]\nmx_listen = "127.0.0.1:0"\n'
        'mx_proxy_protocol = true\nmx_proxy_trusted = ["127.0.0.1/32"]\n'
        "max_connections_per_ip = 1\n"
    )
    config = load_config(config_path, data_dir=str(tmp_path / "data"))
    edge = in_reactor(build_edge, config, in_reactor.reactor)
    in_reactor(edge.mx.startService)
    assert isinstance(edge.mx.factory, ProxyProtocolFactory)
    yield edge, edge.mx.port
    in_reactor(edge.mx.stopService)


def read_reply(sock: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\r\n"):
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def test_edge_with_proxy_protocol_sees_the_real_client(proxied_edge: tuple[Any, int]) -> None:
    _edge, port = proxied_edge
    a = socket.create_connection(("127.0.0.1", port), timeout=10)
    a.sendall(b"PROXY TCP4 203.0.113.7 192.0.2.1 51000 25\r\n")
    assert read_reply(a).startswith(b"220 ")
    # Both sockets come from 127.0.0.1, but the limit of one per IP applies per real client.
    b = socket.create_connection(("127.0.0.1", port), timeout=10)
    b.sendall(v2())  # the same client, 203.0.113.7, in a v2 header
    assert read_reply(b).startswith(b"421 4.7.0")
    c = socket.create_connection(("127.0.0.1", port), timeout=10)
    c.sendall(b"PROXY TCP4 203.0.113.8 192.0.2.1 51000 25\r\n")
    assert read_reply(c).startswith(b"220 ")
    for s in (a, b, c):
        s.close()


def test_edge_closes_on_a_malformed_header(proxied_edge: tuple[Any, int]) -> None:
    _edge, port = proxied_edge
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(b"EHLO not-a-proxy.test\r\n")
    assert s.recv(4096) == b""  # closed without a greeting
    s.close()


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ('mx_proxy_trusted = ["10.0.0.1/8"]', "10.0.0.1/8"),
        ('mx_proxy_trusted = ["lb.example"]', "lb.example"),
        ("mx_proxy_trusted = [10]", "mx_proxy_trusted"),
        ('mx_proxy_trusted = "127.0.0.1/32"', "must be list"),
        ('mx_proxy_protocol = "yes"', "must be bool"),
        ("mx_proxy_timeout = 0", "mx_proxy_timeout"),
    ],
)
def test_bad_proxy_configuration_is_refused(tmp_path: Path, toml: str, message: str) -> None:
    path = tmp_path / "edge.toml"
    path.write_text(f"[edge]\n{toml}\n")
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_proxy_protocol_is_off_by_default() -> None:
    config = load_config(None)
    assert config.edge.mx_proxy_protocol is False
    assert config.edge.mx_proxy_trusted == ["127.0.0.1/32"]
