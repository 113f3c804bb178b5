"""SPF through tailpost's resolver against a local DNS server: every result and the limits."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from edge.checks.spf import evaluate
from edge.dns import DNSResolver
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
