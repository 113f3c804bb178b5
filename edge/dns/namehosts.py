"""Host names the reactor connects to, resolved by the process's one configured resolver.

Twisted resolves a host name given to `connectTCP`, an endpoint or an HTTP agent with the
system's resolver (`getaddrinfo` in a thread) unless the reactor is given another. The edge
installs `ConfiguredNameResolver` on its reactor at start, so that every name any part of
the process connects to (an Rspamd URL, the device's edge URL, a name a delivery target
still carries) is looked up through `edge.dns.resolver.DNSResolver`: the nameservers and port of
`[dns]`, with its cache and timeouts. A name that has no address resolves to nothing (the
connection fails as for an unknown host); a DNS failure does the same and is logged.

`localhost` is answered without a query (RFC 6761 §6.3), and an address given as such is
passed through. Lookups run in the resolver's own thread pool, never the reactor thread.
This module must never fall back to the system resolver.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import Any, Literal

from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import (
    IAddress,
    IHostnameResolver,
    IHostResolution,
    IResolutionReceiver,
)
from twisted.logger import Logger
from zope.interface import implementer

from edge.dns.resolver import DNSResolver, DNSTemporaryError

log = Logger()

LOCALHOST = ("127.0.0.1", "::1")
"""The addresses of the name `localhost`, never asked of DNS (RFC 6761 §6.3)."""


@implementer(IHostResolution)
class _Resolution:
    def __init__(self, name: str) -> None:
        self.name = name

    def cancel(self) -> None:  # the lookup is short and bounded by the resolver's timeout
        pass


def _literal(host: str) -> str | None:
    """`host` as an address if it is one (brackets and an IPv6 zone allowed), else None."""
    text = host.strip("[]")
    try:
        ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    return text


@implementer(IHostnameResolver)
class ConfiguredNameResolver:
    """An `IHostnameResolver` over `DNSResolver.host_addresses` (A, then AAAA)."""

    def __init__(self, resolver: DNSResolver) -> None:
        self.resolver = resolver

    def addresses(self, host: str) -> list[str]:
        """The addresses of `host` (blocking): itself if it is one, loopback for
        `localhost`, else what the configured resolver answers ([] for none)."""
        literal = _literal(host)
        if literal is not None:
            return [literal]
        name = host.rstrip(".").lower()
        if name == "localhost" or name.endswith(".localhost"):
            return list(LOCALHOST)
        return self.resolver.host_addresses(name)

    def resolveHostName(
        self,
        resolutionReceiver: IResolutionReceiver,
        hostName: str,
        portNumber: int = 0,
        addressTypes: Sequence[type[IAddress]] | None = None,
        transportSemantics: str = "TCP",
    ) -> IHostResolution:
        resolution = _Resolution(hostName)
        resolutionReceiver.resolutionBegan(resolution)
        wanted = tuple(addressTypes) if addressTypes else (IPv4Address, IPv6Address)
        kind: Literal["TCP", "UDP"] = "UDP" if transportSemantics == "UDP" else "TCP"

        def found(addresses: list[str]) -> None:
            for address in addresses:
                family = IPv6Address if ":" in address else IPv4Address
                if family in wanted:
                    resolutionReceiver.addressResolved(family(kind, address, portNumber))

        def failed(failure: Any) -> None:
            if failure.check(DNSTemporaryError):
                log.warn(
                    "dns: no address for {host} now: {error}", host=hostName, error=failure.value
                )
            else:
                log.failure("dns: looking up {host} failed", failure, host=hostName)

        d: defer.Deferred[list[str]] = self.resolver.run_async(self.addresses, hostName)
        d.addCallbacks(found, failed)
        d.addBoth(lambda _: resolutionReceiver.resolutionComplete())
        return resolution


def use_configured_names(reactor: Any, resolver: DNSResolver) -> None:
    """Make `resolver` the one every host name `reactor` connects to is looked up with."""
    reactor.installNameResolver(ConfiguredNameResolver(resolver))
