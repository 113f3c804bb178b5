"""Where the connector's SMTP hop may go without TLS: the rule for peers and for listeners.

The edge authenticates to the connector with a password (AUTH PLAIN). In the clear that is
acceptable only where the network itself protects it: the loopback interface (always), and
the networks of `[device] plaintext_networks` (by default the tailnet's ranges,
100.64.0.0/10 and fd7a:115c:a1e0::/48, which WireGuard encrypts end to end). Any other peer
must issue STARTTLS before AUTH is offered or taken (`plaintext_allowed`), and a connector
that would listen on any other address (a wildcard included) without TLS is refused at start
(`listen_refusal`), since no edge could ever authenticate to it there.

This module only decides; it never opens sockets, reads files or resolves names (a host
name is not an address: it never counts as a plaintext network).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from edge.config import DeviceConfig, parse_listen

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

__all__ = ["TAILNET", "listen_refusal", "parse_networks", "plaintext_allowed"]


def parse_networks(values: Sequence[str]) -> tuple[IPNetwork, ...]:
    """The networks of `[device] plaintext_networks`; ValueError names a bad one."""
    return tuple(ipaddress.ip_network(v, strict=False) for v in values)


TAILNET: tuple[IPNetwork, ...] = parse_networks(DeviceConfig().plaintext_networks)
"""The default `plaintext_networks`: the tailnet's ranges (WireGuard encrypts them)."""


def _address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(host.strip().strip("[]").split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped  # ::ffff:a.b.c.d is a.b.c.d (a dual-stack socket's view)
    return address


def plaintext_allowed(host: str, networks: Sequence[IPNetwork]) -> bool:
    """Whether a peer (or a listener) at `host` may carry AUTH without TLS: a loopback
    address, or one inside `networks`. Anything else (a name, a wildcard, garbage) may not."""
    address = _address(host)
    if address is None or address.is_unspecified:
        return False
    if address.is_loopback:
        return True
    return any(address.version == net.version and address in net for net in networks)


def listen_refusal(listen: str, networks: Sequence[IPNetwork], tls: bool) -> str | None:
    """Why the connector may not listen on `listen` (host:port), or None.

    Without TLS it may listen only where every peer may authenticate in the clear; with TLS
    anywhere (peers elsewhere must use STARTTLS)."""
    if tls:
        return None
    host, _port = parse_listen(listen)
    if host.lower() == "localhost" or plaintext_allowed(host, networks):
        return None
    return (
        f"device.connector_listen {listen!r} is outside loopback and device.plaintext_networks, "
        "and the connector has no TLS (device.connector_tls = false): the edge's password "
        "would cross the network in the clear. Listen on a loopback or tailnet address, add "
        "the network to device.plaintext_networks, or turn device.connector_tls on"
    )
