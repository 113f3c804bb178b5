"""Where a device may ask the edge to deliver its mail: the check of connector addresses.

A device names its connector as `host:port` (at registration, on a route). The edge will open
SMTP connections there, so a device must not be able to point it at anything but a device:
every address the host is (an IP literal, or what the edge's own resolver says the name is)
must lie in the operator's `[edge] device_networks`, and never be link-local (169.254/16,
fe80::/10, which holds cloud metadata services), unspecified, multicast, a known metadata
address, or one of the edge's own listeners (its MX or control port on an address of the
edge). Blocking (DNS): run it in a thread. This module must never connect anywhere and never
let an address through when its name does not resolve.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from edge.config import parse_listen
from edge.dns.resolver import DNSTemporaryError

__all__ = ["ConnectorPolicy", "parse_networks"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Metadata services that are not link-local (AWS's IPv6 one, Alibaba's).
_METADATA = frozenset(
    ipaddress.ip_address(a) for a in ("fd00:ec2::254", "100.100.100.200", "169.254.169.254")
)


def parse_networks(values: Sequence[str]) -> list[IPNetwork]:
    """The networks of `[edge] device_networks`; ValueError names a bad one."""
    return [ipaddress.ip_network(v, strict=False) for v in values]


def _split(addr: str) -> tuple[str, int]:
    host, _, port = addr.strip().rpartition(":")
    return host.strip("[]").lower().rstrip("."), int(port)


@dataclass
class ConnectorPolicy:
    """`refusal(addr)` says why a device may not use `addr` as its connector, or None."""

    networks: list[IPNetwork]
    own_listeners: Callable[[], list[str]]
    resolve: Callable[[str], list[str]]

    def _addresses(self, host: str) -> list[IPAddress]:
        try:
            return [ipaddress.ip_address(host)]
        except ValueError:
            pass
        try:
            found = self.resolve(host)
        except DNSTemporaryError:
            found = []
        return [ipaddress.ip_address(a) for a in found]

    def _own(self, ip: IPAddress, port: int) -> bool:
        for listen in self.own_listeners():
            try:
                host, own_port = parse_listen(listen)
            except ValueError:
                continue
            if own_port != port:
                continue
            try:
                own_ip = ipaddress.ip_address(host)
            except ValueError:
                return True  # a named listen address: refuse the port on any address
            if own_ip.is_unspecified or own_ip == ip or ip.is_loopback:
                return True
        return False

    def refusal(self, addr: str) -> str | None:
        host, port = _split(addr)
        addresses = self._addresses(host)
        if not addresses:
            return f"{host} does not resolve through the edge's resolver; use the device's IP"
        for ip in addresses:
            if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
                ip = ip.ipv4_mapped
            if ip.is_link_local or ip.is_unspecified or ip.is_multicast or ip in _METADATA:
                return f"{ip} is link-local, unspecified, multicast or a metadata service"
            if not any(ip in net for net in self.networks if net.version == ip.version):
                return f"{ip} is outside the device networks this edge allows"
            if self._own(ip, port):
                return f"{ip}:{port} is one of the edge's own listeners"
        return None
