"""Connection counts for the MX's limits, in one process or shared by several.

`max_connections`, `max_connections_per_ip` and `max_connections_per_network` are limits of
the MX, not of a process. With one process on the MX port, `LocalCounts` is all there is.
With `edge.mx_processes = N`, the edge and its acceptors keep their counts in one shared
memory (`SharedCounts`: a memfd the edge makes and hands to each acceptor), one region per
process. Each process writes only its own region, so no lock is taken: its total, its
per-address counts in buckets by a hash of the address, and its per-network counts (the
client's IPv4 /24 or IPv6 /64 by default, see `network_of`) in buckets by a hash of the
network. A process admitting a connection adds what the other regions say to its own exact
counts.

Two things make the shared figures approximate, both towards letting a connection in:
two processes admitting at the same instant each see the other's count from just before,
so at the limit one more may get through; and a region is cleared when its process ends
(by the edge, before that process is started again). One towards refusing: two addresses
in the same bucket of another process count together, which matters only when an address
shares its bucket (one of 16,384) with another that is itself near the limit (the same
holds for networks, in their own buckets).

It never decides whether a connection is admitted: it only counts.
"""

from __future__ import annotations

import ipaddress
import mmap
import os
import tempfile
import zlib

BUCKETS = 16384
"""Per-address buckets in each process's region (and as many per-network buckets)."""

_WORDS = 1 + 2 * BUCKETS
"""A region: the process's total, its address buckets, then its network buckets (unsigned
32-bit words)."""

_REGION = _WORDS * 4


def network_of(host: str, v4_prefix: int = 24, v6_prefix: int = 64) -> str:
    """The network `host` is counted in: its IPv4 /`v4_prefix` or IPv6 /`v6_prefix` (an
    IPv4-mapped IPv6 address counts as IPv4), as a CIDR string. Anything that is not an IP
    address (a UNIX socket's peer) is its own network."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    prefix = v4_prefix if ip.version == 4 else v6_prefix
    return str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False))


class LocalCounts:
    """The open connections of this process: in all, by client address, by network."""

    def __init__(self) -> None:
        self.total = 0
        self.per_ip: dict[str, int] = {}
        self.per_network: dict[str, int] = {}

    def add(self, ip: str) -> tuple[int, int]:
        """Count one more connection from `ip`: the MX's connections, in all and from
        `ip`, this one included."""
        self.total += 1
        count = self.per_ip[ip] = self.per_ip.get(ip, 0) + 1
        return self.total, count

    def remove(self, ip: str) -> None:
        count = self.per_ip.get(ip, 0)
        if count <= 0:
            return
        self.total -= 1
        if count > 1:
            self.per_ip[ip] = count - 1
        else:
            del self.per_ip[ip]

    def add_network(self, network: str) -> int:
        """Count one more connection from `network` (it is counted in the total by `add`):
        the MX's connections from `network`, this one included."""
        count = self.per_network[network] = self.per_network.get(network, 0) + 1
        return count

    def remove_network(self, network: str) -> None:
        count = self.per_network.get(network, 0)
        if count > 1:
            self.per_network[network] = count - 1
        elif count == 1:
            del self.per_network[network]


def bucket(ip: str) -> int:
    """The address's (or network's) bucket: the same in every process (unlike `hash`,
    which is salted)."""
    return zlib.crc32(ip.encode()) % BUCKETS


class SharedCounts(LocalCounts):
    """`LocalCounts` of process `slot`, plus what the other `slots - 1` processes sharing
    the memory behind `fd` count."""

    def __init__(self, fd: int, slot: int, slots: int) -> None:
        if not 0 <= slot < slots:
            raise ValueError(f"slot {slot} is not one of {slots}")
        super().__init__()
        self.fd = fd
        self.slot = slot
        self.slots = slots
        self._map = mmap.mmap(fd, slots * _REGION)
        self._words = memoryview(self._map).cast("I")
        self._others = [s * _WORDS for s in range(slots) if s != slot]
        self._mine = slot * _WORDS
        self.clear(slot)

    @classmethod
    def create(cls, slots: int) -> SharedCounts:
        """New shared memory for `slots` processes, this one the first (slot 0). Its
        descriptor (`fd`) is for the others, which attach with their own slot."""
        if hasattr(os, "memfd_create"):
            fd = os.memfd_create("tailpost-mx-connections")
        else:  # not Linux: an unlinked file does the same
            handle, name = tempfile.mkstemp(prefix="tailpost-mx-connections-")
            os.unlink(name)
            fd = handle
        os.ftruncate(fd, slots * _REGION)
        return cls(fd, 0, slots)

    def add(self, ip: str) -> tuple[int, int]:
        total, count = super().add(ip)
        words, at = self._words, bucket(ip) + 1
        words[self._mine] = self.total
        words[self._mine + at] += 1
        for base in self._others:
            total += words[base]
            count += words[base + at]
        return total, count

    def remove(self, ip: str) -> None:
        if self.per_ip.get(ip, 0) <= 0:
            return
        super().remove(ip)
        words, at = self._words, self._mine + bucket(ip) + 1
        words[self._mine] = self.total
        if words[at] > 0:
            words[at] -= 1

    def add_network(self, network: str) -> int:
        count = super().add_network(network)
        words, at = self._words, 1 + BUCKETS + bucket(network)
        words[self._mine + at] += 1
        for base in self._others:
            count += words[base + at]
        return count

    def remove_network(self, network: str) -> None:
        if self.per_network.get(network, 0) <= 0:
            return
        super().remove_network(network)
        words, at = self._words, self._mine + 1 + BUCKETS + bucket(network)
        if words[at] > 0:
            words[at] -= 1

    def clear(self, slot: int) -> None:
        """Forget what process `slot` counted (it ended, or starts afresh)."""
        base = slot * _WORDS
        self._words[base : base + _WORDS] = memoryview(bytes(_REGION)).cast("I")
