"""What a spam report on the device asks its edge to block: an authenticated domain, or an address.

A message's `From:` header is whatever the sender wrote, so its domain is blocked only when
the edge authenticated it: DMARC passed for it, or a passing DKIM signature or SPF identity
is aligned with it (same organizational domain, RFC 7489 relaxed alignment). Those results
are read from the edge's own `Authentication-Results` field, the one the edge writes right
above its `X-Tailpost-Verdict` header (the edge strips incoming fields of both kinds, and
only the authenticated edge delivers to the device, so the topmost verdict and the field
above it are the edge's). Without an aligned, authenticated identity, or for a domain the
device itself serves, only the sender's address is blocked, and `BlockChoice.reason` says
why; the device's own addresses are never blocked. The edge refuses such rules as well
(`edge.store.spam_rules`), whoever asks. This module only decides: it must never call the
edge or change a message, and it does no I/O.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from email.parser import BytesHeaderParser
from email.policy import compat32

import authres
from publicsuffixlist import PublicSuffixList

from maildir.verdict import VERDICT_HEADER

__all__ = ["BlockChoice", "SenderBlocker", "edge_auth_results"]

_MAX_HEADER_SECTION = 1024 * 1024


@dataclass(frozen=True)
class BlockChoice:
    """The rule to ask for: `kind` "sender" or "domain" (or "" for none), its `value`, the
    `basis` it rests on, and `reason`, in words, when it is less than was asked."""

    kind: str
    value: str
    basis: str
    reason: str = ""

    def to_dict(self) -> dict[str, str]:
        return {"kind": self.kind, "value": self.value, "basis": self.basis}


@dataclass(frozen=True)
class AuthFacts:
    """What the edge's Authentication-Results say: DMARC result and From domain, and the
    domains of passing DKIM signatures and of a passing SPF identity."""

    dmarc: str = "none"
    dmarc_from: str = ""
    dkim_pass: tuple[str, ...] = ()
    spf_pass: str = ""


def _header_fields(data: bytes) -> list[tuple[str, str]]:
    head = data[:_MAX_HEADER_SECTION]
    msg = BytesHeaderParser(policy=compat32).parsebytes(head, headersonly=True)
    return [(name, " ".join(str(value).split())) for name, value in msg.items()]


def edge_auth_results(data: bytes) -> AuthFacts | None:
    """The edge's results for this message, or None when it carries none the edge wrote."""
    fields = _header_fields(data)
    names = [name.lower() for name, _ in fields]
    try:
        at = names.index(VERDICT_HEADER.lower())
    except ValueError:
        return None
    if at == 0 or names[at - 1] != "authentication-results":
        return None
    try:
        parsed = authres.AuthenticationResultsHeader.parse_value(fields[at - 1][1])
    except Exception:  # authres raises several kinds on a malformed field
        return None
    dmarc, dmarc_from, dkim, spf = "none", "", [], ""
    for result in parsed.results:
        props = {f"{p.type}.{p.name}".lower(): str(p.value) for p in result.properties}
        method, outcome = str(result.method).lower(), str(result.result).lower()
        if method == "dmarc":
            dmarc, dmarc_from = outcome, props.get("header.from", "").lower()
        elif method == "dkim" and outcome == "pass" and props.get("header.d"):
            dkim.append(props["header.d"].lower())
        elif method == "spf" and outcome == "pass":
            identity = props.get("smtp.mailfrom") or props.get("smtp.helo") or ""
            spf = identity.rpartition("@")[2].lower()
    return AuthFacts(dmarc, dmarc_from.strip("."), tuple(dkim), spf.strip("."))


class SenderBlocker:
    """Chooses the rule for a spam report. `own_addresses` gives the device's addresses
    (their domains are the ones it serves); the Public Suffix List is loaded on first use."""

    def __init__(self, own_addresses: Callable[[], Iterable[str]]) -> None:
        self._own_addresses = own_addresses
        self._psl: PublicSuffixList | None = None

    def _org(self, domain: str) -> str:
        if self._psl is None:
            self._psl = PublicSuffixList()
        return str(self._psl.privatesuffix(domain) or domain)

    def _own(self) -> set[str]:
        return {a.strip().lower() for a in self._own_addresses() if "@" in a}

    def _serves(self, domain: str, own: set[str]) -> bool:
        """Whether a rule for `domain` (which covers its subdomains) would cover one of the
        device's domains, or `domain` is below one of them."""
        for address in own:
            mine = address.rpartition("@")[2].rstrip(".")
            if domain == mine or domain.endswith("." + mine) or mine.endswith("." + domain):
                return True
        return False

    def _authenticated(self, domain: str, facts: AuthFacts | None) -> str:
        """How `domain` (the From domain) was authenticated by the edge, or ""."""
        if facts is None:
            return ""
        if facts.dmarc == "pass" and facts.dmarc_from == domain:
            return "dmarc_pass"
        org = self._org(domain)
        if any(self._org(d) == org for d in facts.dkim_pass):
            return "dkim_aligned"
        if facts.spf_pass and self._org(facts.spf_pass) == org:
            return "spf_aligned"
        return ""

    def choose(self, sender: str, block_domain: bool, data: bytes) -> BlockChoice:
        """The rule for `sender` (the From address) of the message `data`."""
        sender = sender.strip().lower()
        domain = sender.rpartition("@")[2].rstrip(".")
        own = self._own()
        if sender in own:
            return BlockChoice(
                "",
                "",
                "own_address",
                f"{sender} is this device's own address (forged or sent by its owner): "
                "no block rule was made",
            )
        address = BlockChoice("sender", sender, "sender_address")
        if not block_domain:
            return address
        if self._serves(domain, own):
            return BlockChoice(
                "sender",
                sender,
                "served_domain",
                f"{domain} is a domain this device serves: only the address was blocked",
            )
        basis = self._authenticated(domain, edge_auth_results(data))
        if basis:
            return BlockChoice("domain", domain, basis)
        return BlockChoice(
            "sender",
            sender,
            "from_unauthenticated",
            f"the From domain {domain} was not authenticated by the edge (no DMARC pass and no "
            "aligned DKIM or SPF pass), so it may be forged: only the address was blocked",
        )
