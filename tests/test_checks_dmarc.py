"""DMARC: records, alignment, p / sp / pct, with the policy served by a local DNS server."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from edge.checks.base import DKIMResult, SPFResult, Transaction
from edge.checks.dmarc import OrgDomains, RecordError, evaluate, parse_record
from edge.dns.resolver import DNSResolver
from tests.dnsserver import HANG

ORGS = OrgDomains()


@pytest.fixture
def env(dns_server: Any) -> Iterator[tuple[Any, DNSResolver]]:
    z = dns_server.zone
    z.set("_dmarc.reject.test", "TXT", ["v=DMARC1; p=reject; rua=mailto:d@reject.test"])
    z.set("_dmarc.quar.test", "TXT", ["v=DMARC1; p=quarantine"])
    z.set("_dmarc.none.test", "TXT", ["v=DMARC1; p=none"])
    z.set("_dmarc.parent.test", "TXT", ["v=DMARC1; p=reject; sp=quarantine"])
    z.set("_dmarc.strict.test", "TXT", ["v=DMARC1; p=reject; adkim=s; aspf=s"])
    z.set("_dmarc.half.test", "TXT", ["v=DMARC1; p=reject; pct=50"])
    z.set("_dmarc.bad.test", "TXT", ["v=DMARC1; p=whatever"])
    z.set("_dmarc.slow.test", "TXT", [HANG])
    z.set("_dmarc.example.co.uk", "TXT", ["v=DMARC1; p=reject"])
    yield z, DNSResolver(["127.0.0.1"], dns_server.port, timeout=1.0)


def tx_for(
    from_addr: str, spf: tuple[str, str] | None = None, dkim: list[tuple[str, str]] | None = None
) -> Transaction:
    tx = Transaction(client_ip="192.0.2.1")
    tx.header_from = [from_addr]
    tx.from_count = 1
    if spf:
        tx.spf = SPFResult(spf[1], spf[0], "mailfrom", f"bounce@{spf[0]}")
    tx.dkim = [DKIMResult(result, d, "sel", "abcdefgh") for d, result in dkim or []]
    return tx


def run(resolver: DNSResolver, tx: Transaction, sample: float = 0.0) -> Any:
    return evaluate(resolver, ORGS, tx, tx.from_count, lambda: sample)


def test_aligned_dkim_passes(env: tuple[Any, DNSResolver]) -> None:
    result = run(env[1], tx_for("a@reject.test", dkim=[("mail.reject.test", "pass")]))
    assert (result.result, result.dkim_aligned, result.published_policy) == ("pass", True, "reject")


def test_aligned_spf_passes(env: tuple[Any, DNSResolver]) -> None:
    result = run(env[1], tx_for("a@reject.test", spf=("bounces.reject.test", "pass")))
    assert (result.result, result.spf_aligned) == ("pass", True)


def test_unaligned_passes_do_not_count(env: tuple[Any, DNSResolver]) -> None:
    tx = tx_for("a@reject.test", spf=("other.test", "pass"), dkim=[("other.test", "pass")])
    result = run(env[1], tx)
    assert (result.result, result.policy) == ("fail", "reject")
    assert not result.spf_aligned and not result.dkim_aligned


def test_failed_aligned_signature_does_not_count(env: tuple[Any, DNSResolver]) -> None:
    result = run(env[1], tx_for("a@reject.test", dkim=[("reject.test", "fail")]))
    assert result.result == "fail"


def test_quarantine_policy(env: tuple[Any, DNSResolver]) -> None:
    result = run(env[1], tx_for("a@quar.test"))
    assert (result.result, result.policy) == ("fail", "quarantine")


def test_p_none_fails_without_a_policy(env: tuple[Any, DNSResolver]) -> None:
    result = run(env[1], tx_for("a@none.test"))
    assert (result.result, result.policy) == ("fail", "none")


def test_no_record_is_none(env: tuple[Any, DNSResolver]) -> None:
    assert run(env[1], tx_for("a@norecord.test")).result == "none"


def test_subdomain_policy_from_organizational_domain(env: tuple[Any, DNSResolver]) -> None:
    sub = run(env[1], tx_for("a@news.parent.test"))
    assert (sub.result, sub.policy) == ("fail", "quarantine")
    top = run(env[1], tx_for("a@parent.test"))
    assert top.policy == "reject"


def test_public_suffix_list_finds_the_organizational_domain(env: tuple[Any, DNSResolver]) -> None:
    assert ORGS.org("a.b.example.co.uk") == "example.co.uk"
    result = run(env[1], tx_for("x@mail.example.co.uk", dkim=[("example.co.uk", "pass")]))
    assert result.result == "pass"  # relaxed: same organizational domain
    other = run(env[1], tx_for("x@mail.example.co.uk", dkim=[("other.co.uk", "pass")]))
    assert (other.result, other.policy) == ("fail", "reject")


def test_strict_alignment(env: tuple[Any, DNSResolver]) -> None:
    relaxed_only = tx_for(
        "a@strict.test", spf=("mail.strict.test", "pass"), dkim=[("mail.strict.test", "pass")]
    )
    assert run(env[1], relaxed_only).result == "fail"
    exact = tx_for("a@strict.test", dkim=[("strict.test", "pass")])
    assert run(env[1], exact).result == "pass"


def test_pct_samples_the_policy(env: tuple[Any, DNSResolver]) -> None:
    inside = run(env[1], tx_for("a@half.test"), sample=0.10)
    assert inside.policy == "reject"
    outside = run(env[1], tx_for("a@half.test"), sample=0.90)
    assert outside.policy == "quarantine"  # one step down, RFC 7489 §6.6.4
    assert "pct=50" in outside.reason


def test_invalid_record_is_permerror(env: tuple[Any, DNSResolver]) -> None:
    assert run(env[1], tx_for("a@bad.test")).result == "permerror"


def test_dns_timeout_is_temperror(env: tuple[Any, DNSResolver]) -> None:
    assert run(env[1], tx_for("a@slow.test")).result == "temperror"


def test_several_from_domains_is_permerror(env: tuple[Any, DNSResolver]) -> None:
    tx = tx_for("a@reject.test")
    tx.header_from = ["a@reject.test", "b@quar.test"]
    tx.from_count = 2
    assert run(env[1], tx).result == "permerror"


@pytest.mark.parametrize(
    ("text", "p", "sp", "pct"),
    [
        ("v=DMARC1; p=reject", "reject", "reject", 100),
        ("v=DMARC1;p=quarantine;sp=none;pct=20", "quarantine", "none", 20),
        ("v=DMARC1; rua=mailto:x@y.test", "none", "none", 100),
        ("v=DMARC1; p=reject; pct=400", "reject", "reject", 100),
    ],
)
def test_parse_record(text: str, p: str, sp: str, pct: int) -> None:
    record = parse_record(text)
    assert (record.p, record.sp, record.pct) == (p, sp, pct)


@pytest.mark.parametrize("text", ["p=reject; v=DMARC1", "v=DMARC1; p=maybe", "v=DMARC1; bogus"])
def test_parse_record_rejects(text: str) -> None:
    with pytest.raises(RecordError):
        parse_record(text)
