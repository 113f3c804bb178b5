"""The shared resolver against a local DNS server: records, NXDOMAIN, timeouts, caching."""

from __future__ import annotations

from typing import Any

import pytest

from edge.dns import DNSResolver, DNSTemporaryError
from tests.dnsserver import HANG


def resolver(server: Any, **kw: Any) -> DNSResolver:
    return DNSResolver(["127.0.0.1"], port=server.port, timeout=kw.pop("timeout", 2.0), **kw)


def test_records_of_each_type(dns_server: Any) -> None:
    zone = dns_server.zone
    zone.set("example.test", "MX", [(20, "mx2.example.test"), (10, "mx1.example.test")])
    zone.set("example.test", "TXT", ["v=spf1 -all", "x" * 300])
    zone.set("mx1.example.test", "A", ["192.0.2.1"])
    zone.set("mx1.example.test", "AAAA", ["2001:db8::1"])
    r = resolver(dns_server)
    assert r.mx("example.test") == [(10, "mx1.example.test"), (20, "mx2.example.test")]
    assert sorted(r.txt("example.test")) == sorted(["v=spf1 -all", "x" * 300])
    assert r.addresses("mx1.example.test") == ["192.0.2.1", "2001:db8::1"]


def test_nxdomain_and_no_data_are_void_not_errors(dns_server: Any) -> None:
    dns_server.zone.set("example.test", "A", ["192.0.2.1"])
    r = resolver(dns_server)
    missing = r.lookup("nope.example.test", "TXT")
    assert missing.nxdomain and missing.void
    nodata = r.lookup("example.test", "TXT")
    assert not nodata.nxdomain and nodata.void


def test_timeout_is_a_temporary_error(dns_server: Any) -> None:
    dns_server.zone.set("slow.test", "TXT", [HANG])
    r = resolver(dns_server, timeout=0.5)
    with pytest.raises(DNSTemporaryError):
        r.lookup("slow.test", "TXT")


def test_answers_are_cached_for_their_ttl(dns_server: Any) -> None:
    now = [1000.0]
    dns_server.zone.set("cache.test", "TXT", ["one"])
    r = resolver(dns_server, clock=lambda: now[0])
    assert r.txt("cache.test") == ["one"]
    dns_server.zone.set("cache.test", "TXT", ["two"])
    assert r.txt("cache.test") == ["one"]
    now[0] += 301
    assert r.txt("cache.test") == ["two"]
    asked = [q for q in dns_server.zone.queries if q == ("cache.test", "TXT")]
    assert len(asked) == 2


def test_lookup_async_runs_off_the_reactor(dns_server: Any, in_reactor: Any) -> None:
    dns_server.zone.set("async.test", "A", ["192.0.2.7"])
    r = resolver(dns_server, reactor=in_reactor.reactor)
    answer = in_reactor(r.lookup_async, "async.test", "A")
    assert answer.records == ("192.0.2.7",)
