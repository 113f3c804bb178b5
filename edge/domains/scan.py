"""DNS work of domain onboarding: scanning a domain's mail setup, merging SPF, checking the
records a user must publish, proving ownership, and making DKIM keys.

Every lookup goes through the injected ``edge.dns.resolver.DNSResolver``; the STARTTLS probe of a
domain's old MX hosts connects to addresses that resolver returned. The methods here are
blocking (DNS, a TCP probe, RSA key generation): callers run them in a thread pool, never on
the reactor thread. This module must never build its own resolver, write to the store, or
replace a domain's SPF record with one that drops what the domain already authorizes.
"""

from __future__ import annotations

import base64
import re
import smtplib
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from edge.dns.resolver import DNSResolver, DNSTemporaryError

__all__ = [
    "MAX_SPF_LOOKUPS",
    "DomainInspector",
    "GeneratedKey",
    "SpfPlan",
    "generate_dkim_keys",
    "merge_spf",
]

MAX_SPF_LOOKUPS = 10
_LOOKUP_TERMS = re.compile(r"^[+\-~?]?(include:|a$|a:|a/|mx$|mx:|mx/|ptr$|ptr:|exists:)", re.I)
_ALL = re.compile(r"^[+\-~?]?all$", re.I)
OK, PENDING, ERROR = "ok", "pending", "error"


@dataclass(frozen=True)
class GeneratedKey:
    selector: str
    algorithm: str  # "rsa" | "ed25519"
    private_pem: str = field(repr=False)
    public_b64: str


def generate_dkim_keys(stamp: str) -> list[GeneratedKey]:
    """A new RSA-2048 and Ed25519 key pair, with selectors ``tp<stamp>r`` and ``tp<stamp>e``
    (CPU-heavy: run it in a thread). Private keys are in the forms DKIM signers take: RSA as
    PKCS#8 PEM, Ed25519 as the base64 of its 32-byte seed (RFC 8463)."""
    pkcs8 = serialization.PrivateFormat.PKCS8
    pem = serialization.Encoding.PEM
    none = serialization.NoEncryption()
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    rsa_public = rsa_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    ed_key = ed25519.Ed25519PrivateKey.generate()
    ed_public = ed_key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    return [
        GeneratedKey(
            f"tp{stamp}r",
            "rsa",
            rsa_key.private_bytes(pem, pkcs8, none).decode("ascii"),
            base64.b64encode(rsa_public).decode("ascii"),
        ),
        GeneratedKey(
            f"tp{stamp}e",
            "ed25519",
            base64.b64encode(
                ed_key.private_bytes(
                    serialization.Encoding.Raw, serialization.PrivateFormat.Raw, none
                )
            ).decode("ascii"),
            base64.b64encode(ed_public).decode("ascii"),
        ),
    ]


def spf_records(values: list[str]) -> list[str]:
    return [v.strip() for v in values if re.match(r"^v=spf1(\s|$)", v.strip(), re.I)]


@dataclass(frozen=True)
class SpfPlan:
    """The SPF record to publish: ``status`` ok (already authorizes the edge), pending
    (publish ``value``) or error (``note`` says why no safe merge exists)."""

    value: str
    status: str
    lookups: int
    existing: str | None
    note: str = ""


def merge_spf(existing: str | None, mechanisms: list[str]) -> str:
    """``existing`` with ``mechanisms`` added before its ``all`` or ``redirect=`` (or a new
    record ending in ``~all``); terms already present are not repeated."""
    if existing is None:
        return " ".join(["v=spf1", *mechanisms, "~all"])
    terms = existing.split()[1:]
    lowered = {t.lower() for t in terms}
    new = [m for m in mechanisms if m.lower() not in lowered]
    at = len(terms)
    for i, term in enumerate(terms):
        if _ALL.match(term) or term.lower().startswith("redirect="):
            at = i
            break
    return " ".join(["v=spf1", *terms[:at], *new, *terms[at:]])


class DomainInspector:
    """Blocking DNS checks for onboarding, over one resolver (run in a thread)."""

    def __init__(
        self,
        resolver: DNSResolver,
        *,
        helo_name: str,
        probe_port: int = 25,
        probe_timeout: float = 10.0,
    ) -> None:
        self.resolver = resolver
        self.helo_name = helo_name
        self.probe_port = probe_port
        self.probe_timeout = probe_timeout

    # -- MX ----------------------------------------------------------------------------------

    def mx(self, domain: str) -> list[dict[str, Any]]:
        return [{"priority": p, "host": h.lower()} for p, h in self.resolver.mx(domain)]

    def probe(self, host: str) -> dict[str, Any]:
        """``{host, port, tls_mode, reachable}``: whether ``host`` offers STARTTLS on the
        probe port. Unreachable hosts keep ``starttls`` (opportunistic TLS is the default)."""
        entry: dict[str, Any] = {"host": host, "port": self.probe_port, "tls_mode": "starttls"}
        try:
            addresses = self.resolver.addresses(host)
        except DNSTemporaryError:
            addresses = []
        for address in addresses:
            try:
                with smtplib.SMTP(timeout=self.probe_timeout) as client:
                    client.connect(address, self.probe_port)
                    client.ehlo(self.helo_name)
                    tls = client.has_extn("starttls")
                    try:
                        client.quit()
                    except smtplib.SMTPException:
                        pass
            except (OSError, smtplib.SMTPException):
                continue
            entry["tls_mode"] = "starttls" if tls else "none"
            entry["reachable"] = True
            return entry
        entry["reachable"] = False
        return entry

    # -- SPF ---------------------------------------------------------------------------------

    def spf_lookups(self, record: str, depth: int = 0) -> int:
        """DNS-querying terms one evaluation of ``record`` costs (RFC 7208 §4.6.4), counting
        nested includes and redirects; stops counting past the limit."""
        count = 0
        for term in record.split()[1:]:
            target = None
            if _LOOKUP_TERMS.match(term):
                count += 1
                if term.lstrip("+-~?").lower().startswith("include:"):
                    target = term.split(":", 1)[1]
            elif term.lower().startswith("redirect="):
                count += 1
                target = term.split("=", 1)[1]
            if (
                target
                and "%" not in target
                and depth < MAX_SPF_LOOKUPS
                and count <= MAX_SPF_LOOKUPS
            ):
                try:
                    nested = spf_records(self.resolver.txt(target))
                except DNSTemporaryError:
                    nested = []
                if len(nested) == 1:
                    count += self.spf_lookups(nested[0], depth + 1)
            if count > MAX_SPF_LOOKUPS:
                break
        return count

    def plan_spf(self, domain: str, edge_host: str, mechanism: str = "") -> SpfPlan:
        """The domain's SPF record with the edge added, kept within 10 lookups: ``a:<edge>``
        (or the configured mechanism), else the edge's addresses as ip4/ip6 terms."""
        found = spf_records(self.resolver.txt(domain))
        if len(found) > 1:
            return SpfPlan(
                found[0],
                ERROR,
                0,
                found[0],
                "the domain has several SPF records; merge them into one first",
            )
        existing = found[0] if found else None
        existing_cost = self.spf_lookups(existing) if existing else 0
        ip_terms = self._ip_terms(edge_host)
        choices = [[mechanism or f"a:{edge_host}"]]
        if ip_terms:
            choices.append(ip_terms)
        if existing is not None:
            terms = {t.lower() for t in existing.split()[1:]}
            for choice in choices:
                if all(t.lower() in terms for t in choice):
                    return SpfPlan(existing, OK, existing_cost, existing)
        for choice in choices:
            value = merge_spf(existing, choice)
            cost = self.spf_lookups(value)
            if cost <= MAX_SPF_LOOKUPS:
                return SpfPlan(value, PENDING, cost, existing)
        return SpfPlan(
            existing or "",
            ERROR,
            existing_cost,
            existing,
            f"the existing SPF record already needs {existing_cost} DNS lookups; "
            f"adding the edge would pass the limit of {MAX_SPF_LOOKUPS}: flatten it first",
        )

    def _ip_terms(self, host: str) -> list[str]:
        try:
            addresses = self.resolver.addresses(host)
        except DNSTemporaryError:
            return []
        return [f"ip6:{a}" if ":" in a else f"ip4:{a}" for a in sorted(addresses)]

    # -- TXT checks --------------------------------------------------------------------------

    def txt_has(self, name: str, expected: str) -> bool:
        return any(v.strip() == expected for v in self.resolver.txt(name))

    def dkim_published(self, domain: str, selector: str, public_b64: str) -> bool:
        for value in self.resolver.txt(f"{selector}._domainkey.{domain}"):
            tags = dict(part.strip().split("=", 1) for part in value.split(";") if "=" in part)
            if re.sub(r"\s+", "", tags.get("p", "")) == public_b64:
                return True
        return False

    def dmarc(self, domain: str) -> str | None:
        for value in self.resolver.txt(f"_dmarc.{domain}"):
            if re.match(r"^v=DMARC1(\s*;|$)", value.strip(), re.I):
                return value.strip()
        return None

    # -- whole checks ------------------------------------------------------------------------

    def scan(
        self, domain: str, edge_host: str, previous: list[dict[str, Any]] | None = None
    ) -> dict[str, Any]:
        """Current MX, whether it points at the edge, and the old hosts (probed) to keep."""
        existing = self.mx(domain) if previous is None else previous
        old = [m for m in existing if m["host"] != edge_host.lower()]
        fallback = list(dict.fromkeys(m["host"] for m in sorted(old, key=lambda m: m["priority"])))
        return {
            "existing_mx": existing,
            "mx_to_edge": any(m["host"] == edge_host.lower() for m in existing),
            "fallback_hosts": fallback,
            "authoritative_hosts": [self.probe(host) for host in fallback],
        }

    def records(
        self,
        domain: str,
        edge_host: str,
        keys: list[tuple[str, str, str]],
        ownership: tuple[str, str],
        spf_mechanism: str = "",
    ) -> list[dict[str, Any]]:
        """Every record the domain needs, each with its live ``status``. ``keys`` are
        (selector, algorithm, public key); ``ownership`` is the TXT (host, value)."""
        mx_ok = any(m["host"] == edge_host.lower() for m in self.mx(domain))
        out: list[dict[str, Any]] = [
            _record("Inbound MX", domain, "MX", edge_host, "mx_to_edge", mx_ok, priority=10),
        ]
        spf = self.plan_spf(domain, edge_host, spf_mechanism)
        spf_record = _record("SPF", domain, "TXT", spf.value, "spf", spf.status == OK)
        spf_record["status"] = spf.status
        spf_record["lookups"] = spf.lookups
        if spf.existing is not None:
            spf_record["replaces"] = spf.existing
        if spf.note:
            spf_record["note"] = spf.note
        out.append(spf_record)
        for selector, algorithm, public in keys:
            host = f"{selector}._domainkey.{domain}"
            value = f"v=DKIM1; k={algorithm}; p={public}"
            published = self.dkim_published(domain, selector, public)
            out.append(_record(f"DKIM ({algorithm})", host, "TXT", value, "dkim", published))
        if self.dmarc(domain) is None:
            value = "v=DMARC1; p=none; adkim=r; aspf=r"
            out.append(_record("DMARC", f"_dmarc.{domain}", "TXT", value, "dmarc", False))
        host, value = ownership
        out.append(
            _record("Ownership TXT", host, "TXT", value, "ownership", self.txt_has(host, value))
        )
        return out


def _record(
    label: str,
    host: str,
    rtype: str,
    value: str,
    category: str,
    ok: bool,
    priority: int | None = None,
) -> dict[str, Any]:
    record: dict[str, Any] = {
        "label": label,
        "host": host,
        "type": rtype,
        "value": value,
        "ttl": 300,
        "category": category,
        "required": True,
        "status": OK if ok else PENDING,
    }
    if priority is not None:
        record["priority"] = priority
    return record


def route_status(records: list[dict[str, Any]]) -> str:
    """``active`` when every record is in place, ``ready`` when all but the MX are,
    else ``pending_dns``."""
    others = [r for r in records if r["category"] != "mx_to_edge"]
    if not all(r["status"] == OK for r in others):
        return "pending_dns"
    mx_ok = all(r["status"] == OK for r in records if r["category"] == "mx_to_edge")
    return "active" if mx_ok else "ready"
