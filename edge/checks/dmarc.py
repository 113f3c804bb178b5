"""DMARC (RFC 7489): the From domain's policy, alignment of SPF and DKIM, p, sp and pct.

The organizational domain comes from the Public Suffix List shipped inside the
`publicsuffixlist` package (never downloaded at run time). The policy record is looked up at
`_dmarc.<From domain>`, then at the organizational domain, where `sp=` applies to
subdomains. A failing message gets the policy the record asks for, lowered one step
(reject to quarantine, quarantine to none) when `pct` leaves it out; the sampling draws
from an injected random source. DNS goes through tailpost's resolver: the evaluation runs
in the calling (reactor) thread when the resolver's cache has the records, else in its
worker pool (`DNSResolver.run_cached`); it never waits on the network in the reactor thread.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from publicsuffixlist import PublicSuffixList

from edge.checks.base import BaseCheck, DMARCResult, Finding, Found, Transaction
from edge.checks.headers import domain_of
from edge.dns.resolver import DNSResolver, DNSTemporaryError
from edge.runtime.nowlater import then

POLICIES = ("none", "quarantine", "reject")


class OrgDomains:
    """Organizational domains from the packaged Public Suffix List (loaded once).

    The list does not change while the process runs, so each answer is kept (up to
    `max_entries` domains; then the kept answers start over)."""

    def __init__(self, psl: PublicSuffixList | None = None, max_entries: int = 10000) -> None:
        self.psl = psl or PublicSuffixList()
        self.max_entries = max_entries
        self._known: dict[str, str] = {}

    def org(self, domain: str) -> str:
        known = self._known.get(domain)
        if known is not None:
            return known
        name = domain.lower().strip(".")
        org = self.psl.privatesuffix(name) or name
        if len(self._known) >= self.max_entries:
            self._known.clear()
        self._known[domain] = org
        return org


@dataclass(frozen=True)
class Record:
    p: str
    sp: str
    pct: int
    adkim: str
    aspf: str


class RecordError(ValueError):
    pass


def parse_record(text: str) -> Record:
    """A `v=DMARC1` record; RecordError when it is not a usable one (RFC 7489 §6.3)."""
    tags: dict[str, str] = {}
    for i, part in enumerate(p.strip() for p in text.split(";")):
        if not part:
            continue
        name, sep, value = part.partition("=")
        name, value = name.strip().lower(), value.strip()
        if not sep:
            raise RecordError(f"malformed tag {part!r}")
        if i == 0 and (name != "v" or value != "DMARC1"):
            raise RecordError("record does not start with v=DMARC1")
        tags.setdefault(name, value)
    p = tags.get("p", "").lower()
    if p not in POLICIES:
        if "p" not in tags and "rua" in tags:
            p = "none"  # §6.6.3: a record with rua= but no p= is treated as p=none
        else:
            raise RecordError(f"invalid or missing p= ({tags.get('p')!r})")
    sp = tags.get("sp", p).lower()
    if sp not in POLICIES:
        sp = p
    try:
        pct = int(tags.get("pct", "100"))
    except ValueError:
        pct = 100
    pct = min(max(pct, 0), 100)
    adkim = tags.get("adkim", "r").lower()
    aspf = tags.get("aspf", "r").lower()
    return Record(
        p, sp, pct, adkim if adkim in ("r", "s") else "r", aspf if aspf in ("r", "s") else "r"
    )


def _dmarc_records(resolver: DNSResolver, domain: str) -> list[str]:
    return [t for t in resolver.txt(f"_dmarc.{domain}") if t.lower().startswith("v=dmarc1")]


def _aligned(a: str, b: str, mode: str, orgs: OrgDomains) -> bool:
    a, b = a.lower().strip("."), b.lower().strip(".")
    if not a or not b:
        return False
    return a == b if mode == "s" else orgs.org(a) == orgs.org(b)


def evaluate(
    resolver: DNSResolver,
    orgs: OrgDomains,
    tx: Transaction,
    from_count: int,
    sample: Callable[[], float] = random.random,
) -> DMARCResult:
    """Blocking DMARC evaluation from the transaction's SPF and DKIM evidence."""
    domains = {domain_of(a) for a in tx.header_from}
    if from_count == 0 or not domains:
        return DMARCResult("none", "", reason="no From address")
    if len(domains) > 1 or from_count > 1:
        return DMARCResult("permerror", sorted(domains)[0], reason="more than one From domain")
    from_domain = domains.pop()
    org = orgs.org(from_domain)
    try:
        records = _dmarc_records(resolver, from_domain)
        at_org = False
        if not records and org != from_domain:
            records, at_org = _dmarc_records(resolver, org), True
    except DNSTemporaryError as exc:
        return DMARCResult("temperror", from_domain, reason=str(exc))
    if len(records) != 1:
        why = "no DMARC record" if not records else "more than one DMARC record"
        return DMARCResult("none", from_domain, reason=why)
    try:
        record = parse_record(records[0])
    except RecordError as exc:
        return DMARCResult("permerror", from_domain, reason=str(exc))
    published = record.sp if at_org and from_domain != org else record.p
    spf = tx.spf
    spf_aligned = bool(
        spf and spf.result == "pass" and _aligned(spf.domain, from_domain, record.aspf, orgs)
    )
    dkim_aligned = any(
        r.result == "pass" and _aligned(r.domain, from_domain, record.adkim, orgs) for r in tx.dkim
    )
    result = DMARCResult(
        "pass" if spf_aligned or dkim_aligned else "fail",
        from_domain,
        policy="none",
        published_policy=published,
        spf_aligned=spf_aligned,
        dkim_aligned=dkim_aligned,
    )
    if result.result == "pass":
        return result
    policy = published
    if policy != "none" and record.pct < 100 and sample() * 100 >= record.pct:
        policy = POLICIES[POLICIES.index(policy) - 1]  # §6.6.4: the next policy down
        result.reason = f"pct={record.pct} sampled the message out of p={published}"
    result.policy = policy
    if not result.reason:
        result.reason = "neither SPF nor DKIM passed aligned with the From domain"
    return result


class DMARCCheck(BaseCheck):
    """Runs after SPF and DKIM: it reads their evidence from the transaction."""

    name = "dmarc"

    def __init__(
        self,
        resolver: DNSResolver,
        orgs: OrgDomains,
        sample: Callable[[], float] = random.random,
    ) -> None:
        self.resolver = resolver
        self.orgs = orgs
        self.sample = sample

    def data(self, tx: Transaction, message: bytes) -> Found:
        result = self.resolver.run_cached_now(
            evaluate, self.resolver, self.orgs, tx, tx.from_count, self.sample
        )
        return then(result, _found, tx)


def _found(result: DMARCResult, tx: Transaction) -> list[Finding]:
    tx.dmarc = result
    count = tx.from_count
    findings = []
    if count > 1:
        findings.append(Finding("message", "multiple_from", f"{count} From headers"))
    if result.result == "fail":
        key = result.policy if result.policy != "none" else "fail"
    else:
        key = result.result
    findings.append(Finding("dmarc", key, f"{result.from_domain}: {result.reason}"))
    return findings
