"""A local authoritative DNS server for tests (Twisted Names), serving zones from a dict.

Tests never touch the internet: they start this server on 127.0.0.1 (UDP and TCP on the
same OS-chosen port) and point a `DNSResolver` at it. The OS chooses the TCP port; the same
number may already be taken for UDP, so a pair that cannot be had is given up for a fresh
one, a few times.
"""

from __future__ import annotations

import errno
from typing import Any

from twisted.internet import defer
from twisted.internet.error import CannotListenError
from twisted.names import dns, error
from twisted.names.common import ResolverBase
from twisted.names.server import DNSServerFactory

HANG = object()
"""Put this as a record value to make the server never answer that name and type."""


def _record(rdtype: str, value: Any, ttl: int) -> Any:
    if rdtype == "A":
        return dns.Record_A(value, ttl=ttl)
    if rdtype == "AAAA":
        return dns.Record_AAAA(value, ttl=ttl)
    if rdtype == "MX":
        pref, host = value
        # "." is the root name, encoded empty (a null MX, RFC 7505).
        return dns.Record_MX(pref, host.rstrip(".").encode(), ttl=ttl)
    if rdtype == "TXT":
        data = value.encode() if isinstance(value, str) else value
        chunks = [data[i : i + 255] for i in range(0, len(data), 255)] or [b""]
        return dns.Record_TXT(*chunks, ttl=ttl)
    if rdtype == "CNAME":
        return dns.Record_CNAME(value.encode(), ttl=ttl)
    if rdtype == "PTR":
        return dns.Record_PTR(value.encode(), ttl=ttl)
    raise ValueError(f"unsupported type {rdtype}")


class ZoneResolver(ResolverBase):
    """Answers from `records[(name, TYPE)] = [values]`; unknown names are NXDOMAIN."""

    def __init__(self) -> None:
        super().__init__()
        self.records: dict[tuple[str, str], list[Any]] = {}
        self.ttl = 300
        self.queries: list[tuple[str, str]] = []

    def set(self, name: str, rdtype: str, values: list[Any]) -> None:
        self.records[(name.lower().rstrip("."), rdtype.upper())] = list(values)

    def remove(self, name: str, rdtype: str | None = None) -> None:
        for key in list(self.records):
            if key[0] == name.lower().rstrip(".") and rdtype in (None, key[1]):
                del self.records[key]

    def _lookup(self, name: bytes, cls: int, type: int, timeout: Any) -> defer.Deferred[Any]:  # noqa: A002
        qname = name.decode().lower().rstrip(".")
        rdtype = dns.QUERY_TYPES.get(type, str(type))
        self.queries.append((qname, rdtype))
        if not any(key[0] == qname for key in self.records):
            return defer.fail(error.DomainError(name))
        values = self.records.get((qname, rdtype), [])
        if any(v is HANG for v in values):
            return defer.Deferred()
        answers = [
            dns.RRHeader(name, type, cls, self.ttl, _record(rdtype, v, self.ttl), auth=True)
            for v in values
        ]
        return defer.succeed((answers, [], []))


BIND_TRIES = 5
"""How many TCP/UDP port pairs are tried before the server gives up."""


class LocalDNSServer:
    def __init__(self, reactor: Any, tries: int = BIND_TRIES) -> None:
        self.zone = ZoneResolver()
        self.factory = DNSServerFactory(authorities=[self.zone])
        for attempt in range(1, tries + 1):
            tcp = reactor.listenTCP(0, self.factory, interface="127.0.0.1")
            port: int = tcp.getHost().port
            try:
                udp = reactor.listenUDP(
                    port, dns.DNSDatagramProtocol(self.factory), interface="127.0.0.1"
                )
            except CannotListenError as exc:
                tcp.stopListening()
                in_use = getattr(exc.socketError, "errno", None) == errno.EADDRINUSE
                if not in_use or attempt == tries:
                    raise
                continue
            break
        self.tcp = tcp
        self.port = port
        self.udp = udp

    def stop(self) -> defer.Deferred[Any]:
        return defer.gatherResults(
            [
                defer.maybeDeferred(self.tcp.stopListening),
                defer.maybeDeferred(self.udp.stopListening),
            ]
        )
