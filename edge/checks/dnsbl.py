"""DNS blocklists (RFC 5782), checked at connect for the configured zones.

The client's address is reversed (IPv4 octets, IPv6 nibbles) under each zone; an A record
in 127.0.0.0/8 means listed. Lookups go through tailpost's resolver (a cached answer at
once, anything else in its worker pool); a lookup that fails temporarily is recorded as
`dnsbl.temperror`, never as listed.
"""

from __future__ import annotations

import ipaddress

from edge.checks.base import BaseCheck, Finding, Transaction
from edge.dns import Answer, DNSResolver, DNSTemporaryError


def query_name(ip: str, zone: str) -> str | None:
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    if isinstance(addr, ipaddress.IPv4Address):
        labels = reversed(str(addr).split("."))
    else:
        labels = reversed(addr.exploded.replace(":", ""))
    return ".".join(labels) + "." + zone.strip(".")


def _listed(answer: Answer) -> list[str]:
    codes = []
    for record in answer.records:
        try:
            if ipaddress.ip_address(record) in ipaddress.ip_network("127.0.0.0/8"):
                codes.append(record)
        except ValueError:
            continue
    return codes


class DNSBLCheck(BaseCheck):
    name = "dnsbl"

    def __init__(self, resolver: DNSResolver, zones: list[str]) -> None:
        self.resolver = resolver
        self.zones = [z.strip().strip(".").lower() for z in zones if z.strip()]

    async def connect(self, tx: Transaction) -> list[Finding]:
        lookups = []
        for zone in self.zones:
            name = query_name(tx.client_ip, zone)
            if name is not None:
                d = self.resolver.lookup_async(name, "A")
                lookups.append((zone, d))
        findings = []
        for zone, d in lookups:
            try:
                answer = await d
            except DNSTemporaryError as exc:
                findings.append(Finding("dnsbl", "temperror", f"{zone}: {exc}"))
                continue
            codes = _listed(answer)
            if codes:
                findings.append(
                    Finding("dnsbl", "listed", f"{tx.client_ip} in {zone} ({', '.join(codes)})")
                )
        return findings
