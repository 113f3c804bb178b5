"""The PROXY protocol (v1 text and v2 binary) in front of the MX SMTP server.

A load balancer that speaks the PROXY protocol sends one header before anything else on a
connection, naming the real client. `ProxyProtocolFactory` wraps the SMTP server factory:
for a connection from a trusted source it reads that header (within a time bound and a size
bound) and only then starts the SMTP session, whose transport reports the real client as
its peer, so `Session.peer_host`, the Received header, the log and the per-IP limits all
see the client rather than the balancer. A v2 LOCAL header or a v1 UNKNOWN header (the
balancer's own health checks) keeps the socket's address. Connections from other sources
are plain SMTP sessions with their socket address; nothing they send is read as a header.
The header itself is decoded by the `proxy-protocol` library; this module does the framing,
the bounds and the trust decision.

It must never honour a header from an untrusted source, never let a malformed, over-long or
late header (or anything after it) reach the SMTP server (the connection is closed without a
reply), and never buffer more than one bounded header.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from collections.abc import Iterable
from typing import Any, cast

from proxyprotocol import ProxyProtocolIncompleteError
from proxyprotocol.result import ProxyResult, is_ipv4, is_ipv6, is_local, is_unknown
from proxyprotocol.v1 import ProxyProtocolV1
from proxyprotocol.v2 import ProxyProtocolV2
from twisted.internet import address
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IProtocol,
    IReactorTime,
    ITransport,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from zope.interface import directlyProvides, providedBy

log = Logger()

V1_PREFIX = b"PROXY "
V1_MAX = 107
"""The longest v1 header line, CRLF included (the specification's bound)."""
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_MAX = 16 + 1024
"""The longest v2 header accepted: addresses plus room for the usual TLVs."""

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = address.IPv4Address | address.IPv6Address


class ProxyHeaderError(ValueError):
    """The bytes at the start of the connection are not an acceptable PROXY header."""


def trusted_networks(values: Iterable[str]) -> list[Network]:
    """Parse CIDR strings ("10.0.0.0/8", "::1/128", "192.0.2.7"); ValueError names the bad one."""
    networks: list[Network] = []
    for value in values:
        try:
            networks.append(ipaddress.ip_network(value, strict=True))
        except ValueError as exc:
            raise ValueError(f"{value!r} is not an IP network: {exc}") from exc
    return networks


def is_trusted(host: str, networks: Iterable[Network]) -> bool:
    """Whether the socket peer `host` lies in one of `networks` (IPv4-mapped IPv6 counts as IPv4)."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in net for net in networks)


def parse_header(buffer: bytes) -> tuple[IPAddress | None, IPAddress | None, int] | None:
    """Decode the PROXY header at the start of `buffer`.

    Returns None while the header is incomplete, else (source, destination, length of the
    header); source and destination are None for a LOCAL or UNKNOWN header, meaning "use
    the socket's addresses". Raises ProxyHeaderError for anything that is not a complete,
    well-formed, bounded TCP header.
    """
    if buffer[:1] == V1_PREFIX[:1]:
        if not V1_PREFIX.startswith(buffer[:6]):
            raise ProxyHeaderError("not a PROXY header")
        end = buffer.find(b"\n", 0, V1_MAX)
        if end < 0:
            if len(buffer) >= V1_MAX:
                raise ProxyHeaderError("v1 header longer than 107 octets")
            return None
        length = end + 1
        result = _unpack(ProxyProtocolV1(), buffer[:length])
    elif buffer[:1] == V2_SIGNATURE[:1]:
        if not V2_SIGNATURE.startswith(buffer[:12]):
            raise ProxyHeaderError("not a PROXY header")
        if len(buffer) < 16:
            return None
        if buffer[12] & 0xF0 != 0x20:
            raise ProxyHeaderError("unknown PROXY protocol version")
        (data_len,) = struct.unpack_from("!H", buffer, 14)
        length = 16 + data_len
        if length > V2_MAX:
            raise ProxyHeaderError(f"v2 header of {length} octets exceeds {V2_MAX}")
        if len(buffer) < length:
            return None
        result = _unpack(ProxyProtocolV2(), buffer[:length])
    elif buffer:
        raise ProxyHeaderError("not a PROXY header")
    else:
        return None
    source, destination = _addresses(result)
    return source, destination, length


def _unpack(parser: ProxyProtocolV1 | ProxyProtocolV2, header: bytes) -> ProxyResult:
    try:
        return parser.unpack(header)
    except ProxyProtocolIncompleteError as exc:
        raise ProxyHeaderError("truncated PROXY header") from exc
    except (ValueError, struct.error, UnicodeDecodeError) as exc:
        raise ProxyHeaderError(f"malformed PROXY header: {exc}") from exc


def _addresses(result: ProxyResult) -> tuple[IPAddress | None, IPAddress | None]:
    if is_local(result) or is_unknown(result):
        return None, None
    if result.protocol not in (None, socket.SOCK_STREAM):
        raise ProxyHeaderError("PROXY header names a datagram connection")
    if is_ipv4(result) or is_ipv6(result):
        (src_ip, src_port), (dst_ip, dst_port) = result.source, result.dest
        return _address(src_ip, src_port), _address(dst_ip, dst_port)
    raise ProxyHeaderError("PROXY header names a non-IP connection")


def _address(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int) -> IPAddress:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if isinstance(ip, ipaddress.IPv4Address):
        return address.IPv4Address("TCP", str(ip), port)
    return address.IPv6Address("TCP", str(ip), port)


class ProxyProtocolWrapper(ProtocolWrapper):
    """One connection: reads the header (from trusted sources), then runs the SMTP session."""

    factory: ProxyProtocolFactory

    def __init__(self, factory: ProxyProtocolFactory, wrappedProtocol: IProtocol) -> None:
        super().__init__(factory, wrappedProtocol)
        self._buffer = b""
        self._reading_header = False
        self._started = False
        self._deadline: IDelayedCall | None = None
        self._peer: IAddress | None = None
        self._host: IAddress | None = None

    def makeConnection(self, transport: Any) -> None:
        # Unlike the base class, the wrapped protocol is connected only once the header is in.
        directlyProvides(self, providedBy(transport))
        Protocol.makeConnection(self, transport)

    def connectionMade(self) -> None:
        self.factory.registerProtocol(self)
        assert self.transport is not None
        socket_peer = self.transport.getPeer()
        if not is_trusted(getattr(socket_peer, "host", ""), self.factory.trusted):
            self._start()
            return
        self._reading_header = True
        self._deadline = self.factory.clock.callLater(self.factory.timeout, self._timed_out)

    def dataReceived(self, data: bytes) -> None:
        if not self._reading_header:
            if self._started:
                self.wrappedProtocol.dataReceived(data)
            return
        self._buffer += data
        try:
            parsed = parse_header(self._buffer)
        except ProxyHeaderError as exc:
            self._refuse(str(exc))
            return
        if parsed is None:
            return
        source, destination, length = parsed
        rest, self._buffer = self._buffer[length:], b""
        self._reading_header = False
        self._cancel_deadline()
        self._peer, self._host = source, destination
        log.debug(
            "proxy {balancer}: client {client}",
            balancer=self._socket_host(),
            client=getattr(source, "host", "(local)"),
        )
        self._start()
        if rest:
            self.wrappedProtocol.dataReceived(rest)

    def _start(self) -> None:
        self._started = True
        self.wrappedProtocol.makeConnection(cast(ITransport, self))

    def _refuse(self, why: str) -> None:
        log.warn("proxy {balancer}: closing: {why}", balancer=self._socket_host(), why=why)
        self._reading_header = False
        self._buffer = b""
        self._cancel_deadline()
        if self.transport is not None:
            self.transport.loseConnection()

    def _timed_out(self) -> None:
        self._deadline = None
        self._refuse(f"no complete PROXY header within {self.factory.timeout:g} s")

    def _cancel_deadline(self) -> None:
        deadline, self._deadline = self._deadline, None
        if deadline is not None and deadline.active():
            deadline.cancel()

    def _socket_host(self) -> str:
        peer = self.transport.getPeer() if self.transport is not None else None
        return str(getattr(peer, "host", "?"))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._cancel_deadline()
        self._reading_header = False
        self._buffer = b""
        self.factory.unregisterProtocol(self)
        if self._started:
            self._started = False
            self.wrappedProtocol.connectionLost(reason)

    def getPeer(self) -> IAddress:
        if self._peer is not None:
            return self._peer
        assert self.transport is not None
        return self.transport.getPeer()

    def getHost(self) -> IAddress:
        if self._host is not None:
            return self._host
        assert self.transport is not None
        return self.transport.getHost()


class ProxyProtocolFactory(WrappingFactory[ProxyProtocolWrapper]):
    """Wraps the MX factory: sessions from `trusted` sources must start with a PROXY header."""

    protocol = ProxyProtocolWrapper

    def __init__(
        self,
        wrapped: Factory,
        trusted: Iterable[Network],
        clock: IReactorTime,
        timeout: float = 10.0,
    ) -> None:
        super().__init__(wrapped)
        self.trusted = list(trusted)
        self.clock = clock
        self.timeout = timeout

    def logPrefix(self) -> str:
        return "SMTP (PROXY)"

    def buildProtocol(self, addr: Any) -> ProxyProtocolWrapper:  # type: ignore[override]
        return ProxyProtocolWrapper(self, self.wrappedFactory.buildProtocol(addr))  # type: ignore[arg-type]
