"""DNS blocklists (RFC 5782), checked at connect for the configured zones.

The client's address is reversed (IPv4 octets, IPv6 nibbles) under each zone; an A record
in 127.0.0.0/8 means listed. Lookups go through tailpost's resolver (a cached answer at
once, anything else in its worker pool); a lookup that fails temporarily is recorded as
`dnsbl.temperror`, never as listed.
"""

from __future__ import annotations

import ipaddress

from twisted.internet import defer

from edge.checks.base import BaseCheck, Finding, Found, Transaction
from edge.dns.resolver import Answer, DNSResolver, DNSTemporaryError


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

    def connect(self, tx: Transaction) -> Found:
        answers: list[tuple[str, Answer | defer.Deferred[Answer]]] = []
        for zone in self.zones:
            name = query_name(tx.client_ip, zone)
            if name is not None:
                answers.append(
                    (zone, self.resolver.run_cached_now(self.resolver.lookup, name, "A"))
                )
        findings: list[Finding] = []
        for zone, answer in answers:
            if isinstance(answer, defer.Deferred):
                return defer.ensureDeferred(self._later(tx, answers))
            findings += _findings(tx, zone, answer)
        return findings

    async def _later(
        self, tx: Transaction, answers: list[tuple[str, Answer | defer.Deferred[Answer]]]
    ) -> list[Finding]:
        findings = []
        for zone, pending in answers:
            try:
                answer = await pending if isinstance(pending, defer.Deferred) else pending
            except DNSTemporaryError as exc:
                findings.append(Finding("dnsbl", "temperror", f"{zone}: {exc}"))
                continue
            findings += _findings(tx, zone, answer)
        return findings


def _findings(tx: Transaction, zone: str, answer: Answer) -> list[Finding]:
    codes = _listed(answer)
    if not codes:
        return []
    return [Finding("dnsbl", "listed", f"{tx.client_ip} in {zone} ({', '.join(codes)})")]
