"""SPF through tailpost's resolver against a local DNS server: every result and the limits."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from twisted.internet import defer

from edge.checks import spf as spf_module
from edge.checks.base import SPFResult, Transaction
from edge.checks.spf import KEEP_SECONDS, SPFCheck, evaluate
from edge.dns.resolver import DNSResolver
from tests.dnsserver import HANG


@pytest.fixture
def zone(dns_server: Any) -> Iterator[tuple[Any, DNSResolver]]:
    resolver = DNSResolver(["127.0.0.1"], dns_server.port, timeout=1.0)
    z = dns_server.zone
    z.set("pass.test", "TXT", ["v=spf1 ip4:192.0.2.1 ~all"])
    z.set("hard.test", "TXT", ["v=spf1 ip4:192.0.2.1 -all"])
    z.set("neutral.test", "TXT", ["v=spf1 ?all"])
    z.set("broken.test", "TXT", ["v=spf1 ip4:192.0.2.1 frobnicate -all"])
    z.set("nospf.test", "TXT", ["some other text"])
    z.set("mx.helo.test", "TXT", ["v=spf1 ip4:192.0.2.7 -all"])
    includes = " ".join(f"include:i{n}.test" for n in range(11))
    z.set("many.test", "TXT", [f"v=spf1 {includes} ip4:192.0.2.1 -all"])
    for n in range(11):
        z.set(f"i{n}.test", "TXT", ["v=spf1 ip4:198.51.100.1 -all"])
    z.set("nine.test", "TXT", [f"v=spf1 {' '.join(includes.split()[:9])} ip4:192.0.2.1 -all"])
    z.set("void.test", "TXT", ["v=spf1 a:v1.void.test a:v2.void.test a:v3.void.test -all"])
    z.set("twovoid.test", "TXT", ["v=spf1 a:v1.void.test a:v2.void.test ip4:192.0.2.1 -all"])
    z.set("slow.test", "TXT", [HANG])
    yield z, resolver


@pytest.mark.parametrize(
    ("ip", "domain", "expected"),
    [
        ("192.0.2.1", "pass.test", "pass"),
        ("192.0.2.9", "hard.test", "fail"),
        ("192.0.2.9", "pass.test", "softfail"),
        ("192.0.2.9", "neutral.test", "neutral"),
        ("192.0.2.1", "broken.test", "permerror"),
        ("192.0.2.1", "nospf.test", "none"),
        ("192.0.2.1", "nxdomain.test", "none"),
    ],
)
def test_results(zone: tuple[Any, DNSResolver], ip: str, domain: str, expected: str) -> None:
    _z, resolver = zone
    result = evaluate(resolver, ip, f"someone@{domain}", "client.example")
    assert result.result == expected, result.reason
    assert result.identity == "mailfrom"
    assert result.domain == domain


def test_lookups_go_to_the_configured_server(zone: tuple[Any, DNSResolver]) -> None:
    z, resolver = zone
    evaluate(resolver, "192.0.2.1", "a@pass.test", "client.example")
    assert ("pass.test", "TXT") in z.queries


def test_more_than_ten_dns_terms_is_permerror(zone: tuple[Any, DNSResolver]) -> None:
    _z, resolver = zone
    result = evaluate(resolver, "192.0.2.1", "a@many.test", "client.example")
    assert result.result == "permerror"
    assert "lookups" in result.reason.lower()
    assert evaluate(resolver, "192.0.2.1", "a@nine.test", "client.example").result == "pass"


def test_third_void_lookup_is_permerror(zone: tuple[Any, DNSResolver]) -> None:
    _z, resolver = zone
    result = evaluate(resolver, "192.0.2.1", "a@void.test", "client.example")
    assert result.result == "permerror"
    assert "void" in result.reason.lower()
    assert evaluate(resolver, "192.0.2.1", "a@twovoid.test", "client.example").result == "pass"


def test_null_sender_checks_helo(zone: tuple[Any, DNSResolver]) -> None:
    _z, resolver = zone
    result = evaluate(resolver, "192.0.2.7", "", "mx.helo.test")
    assert (result.result, result.identity, result.domain) == ("pass", "helo", "mx.helo.test")
    assert evaluate(resolver, "192.0.2.8", "", "mx.helo.test").result == "fail"


def test_dns_timeout_is_temperror(zone: tuple[Any, DNSResolver]) -> None:
    _z, resolver = zone
    result = evaluate(resolver, "192.0.2.1", "a@slow.test", "client.example")
    assert result.result == "temperror"


def test_ipv6_client(zone: tuple[Any, DNSResolver]) -> None:
    z, resolver = zone
    z.set("six.test", "TXT", ["v=spf1 ip6:2001:db8::/32 -all"])
    assert evaluate(resolver, "2001:db8::5", "a@six.test", "h.example").result == "pass"
    assert evaluate(resolver, "2001:db9::5", "a@six.test", "h.example").result == "fail"


def spf_run(check: SPFCheck, ip: str, sender: str, helo: str = "client.example") -> Any:
    tx = Transaction(ip, helo=helo, mail_from=sender)
    found = check.mail(tx)
    return found, tx.spf


def test_results_are_kept_per_client_sender_and_helo(
    dns_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = [1000.0]
    resolver = DNSResolver(["127.0.0.1"], dns_server.port, timeout=1.0, clock=lambda: now[0])
    zone = dns_server.zone
    zone.ttl = 20  # below the check's own bound (KEEP_SECONDS)
    zone.set("kept.test", "TXT", ["v=spf1 ip4:192.0.2.1 -all"])
    runs: list[tuple[str, str, str]] = []

    def counted(r: DNSResolver, ip: str, sender: str, helo: str, **kw: Any) -> Any:
        runs.append((ip, sender, helo))
        return evaluate(r, ip, sender, helo, **kw)

    monkeypatch.setattr(spf_module, "evaluate", counted)
    evaluate(resolver, "192.0.2.1", "a@kept.test", "client.example")  # warm the DNS cache
    check = SPFCheck(resolver)
    found, first = spf_run(check, "192.0.2.1", "a@kept.test")
    assert isinstance(found, list) and [f.key for f in found] == ["spf.pass"]
    again, second = spf_run(check, "192.0.2.1", "a@kept.test")
    assert second is first and again == found and len(runs) == 1
    _, other_ip = spf_run(check, "192.0.2.9", "a@kept.test")
    _, other_sender = spf_run(check, "192.0.2.1", "b@kept.test")
    _, other_helo = spf_run(check, "192.0.2.1", "a@kept.test", "other.example")
    assert other_ip.result == "fail" and other_sender.sender == "b@kept.test"
    assert other_helo.result == "pass" and len(runs) == 4
    now[0] += 21  # the policy's TTL is over: evaluated again (from a fresh answer)
    evaluate(resolver, "192.0.2.1", "a@kept.test", "client.example")
    spf_run(check, "192.0.2.1", "a@kept.test")
    assert len(runs) == 5
    resolver.clear_cache()
    evaluate(resolver, "192.0.2.1", "a@kept.test", "client.example")
    spf_run(check, "192.0.2.1", "a@kept.test")
    assert len(runs) == 6


def test_keeping_is_bounded_even_for_long_ttls(dns_server: Any) -> None:
    now = [1000.0]
    resolver = DNSResolver(["127.0.0.1"], dns_server.port, timeout=1.0, clock=lambda: now[0])
    dns_server.zone.set("long.test", "TXT", ["v=spf1 ip4:192.0.2.1 -all"])  # TTL 300
    evaluate(resolver, "192.0.2.1", "a@long.test", "h.example")
    check = SPFCheck(resolver)
    _, first = spf_run(check, "192.0.2.1", "a@long.test")
    now[0] += KEEP_SECONDS - 1
    assert spf_run(check, "192.0.2.1", "a@long.test")[1] is first
    now[0] += 2
    assert spf_run(check, "192.0.2.1", "a@long.test")[1] is not first


@pytest.mark.parametrize(("result", "kept"), [("temperror", False), ("pass", True)])
def test_a_temperror_is_never_kept(
    dns_server: Any, monkeypatch: pytest.MonkeyPatch, result: str, kept: bool
) -> None:
    resolver = DNSResolver(["127.0.0.1"], dns_server.port, timeout=1.0)
    runs: list[str] = []

    def inline(r: DNSResolver, ip: str, sender: str, helo: str, **kw: Any) -> SPFResult:
        runs.append(sender)  # answered without a lookup (as from the cache)
        return SPFResult(result, "t.test", "mailfrom", sender, "made up")

    monkeypatch.setattr(spf_module, "evaluate", inline)
    check = SPFCheck(resolver)
    for _ in range(2):
        found, spf = spf_run(check, "192.0.2.1", "a@t.test")
        assert [f.key for f in found] == [f"spf.{result}"] and spf.result == result
    assert len(runs) == (1 if kept else 2)


def test_a_dns_timeout_goes_to_the_pool_every_time(
    zone: tuple[Any, DNSResolver], in_reactor: Any
) -> None:
    _z, plain = zone
    resolver = DNSResolver(
        ["127.0.0.1"], plain.resolver.port, timeout=0.5, reactor=in_reactor.reactor
    )
    check = SPFCheck(resolver)
    for _ in range(2):
        tx = Transaction("192.0.2.1", helo="h.example", mail_from="a@slow.test")
        found = in_reactor(lambda t=tx: [check.mail(t)])[0]
        assert isinstance(found, defer.Deferred)  # not answered from anything kept
        assert [f.key for f in in_reactor(lambda f=found: f)] == ["spf.temperror"]
