"""The shared resolver against a local DNS server: records, NXDOMAIN, timeouts, caching."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet import defer

from edge.dns.resolver import DNSResolver, DNSTemporaryError, ResultMemo
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


def test_run_cached_now_answers_from_the_cache_without_a_deferred(dns_server: Any) -> None:
    dns_server.zone.set("now.test", "TXT", ["cached"])
    r = resolver(dns_server)
    r.lookup("now.test", "TXT")
    assert r.run_cached_now(r.txt, "now.test") == ["cached"]

    def broken() -> None:
        r.txt("now.test")
        raise ValueError("no")

    with pytest.raises(ValueError):
        r.run_cached_now(broken)
    d = r.run_cached(r.txt, "now.test")  # (still a Deferred, fired)
    assert isinstance(d, defer.Deferred) and d.called and d.result == ["cached"]


def test_run_cached_now_goes_to_the_pool_on_a_miss(dns_server: Any, in_reactor: Any) -> None:
    dns_server.zone.set("miss.test", "TXT", ["from the network"])
    r = resolver(dns_server, reactor=in_reactor.reactor)
    pending = in_reactor(lambda: [r.run_cached_now(r.txt, "miss.test")])[0]
    assert isinstance(pending, defer.Deferred)
    assert in_reactor(lambda: pending) == ["from the network"]
    assert in_reactor(r.run_cached_now, r.txt, "miss.test") == ["from the network"]


class Work:
    """DNS-bound work for a ResultMemo: TXT lookups of `names`, counted."""

    def __init__(self, r: DNSResolver, *names: str) -> None:
        self.r = r
        self.names = names
        self.runs = 0

    def __call__(self, tag: str) -> list[str]:
        self.runs += 1
        return [t for name in self.names for t in self.r.txt(name)] + [tag]


def test_result_memo_keeps_a_result_until_its_first_answer_expires(dns_server: Any) -> None:
    now = [1000.0]
    zone = dns_server.zone
    zone.set("long.test", "TXT", ["long"])
    zone.set("short.test", "TXT", ["short"])
    r = resolver(dns_server, clock=lambda: now[0])
    zone.ttl = 300
    r.lookup("long.test", "TXT")
    zone.ttl = 60
    r.lookup("short.test", "TXT")
    zone.ttl = 300
    work = Work(r, "long.test", "short.test")
    memo = ResultMemo(r, max_age=1000.0)
    assert memo.run("k", work, "a") == ["long", "short", "a"]
    assert memo.run("k", work, "a") == ["long", "short", "a"] and work.runs == 1
    now[0] += 59
    assert memo.run("k", work, "a") and work.runs == 1
    now[0] += 2  # short.test's answer has expired: so has the result made from it
    r.lookup("short.test", "TXT")  # (cached again, for 300 s now)
    assert memo.run("k", work, "a") and work.runs == 2
    assert memo.run("other", work, "b") == ["long", "short", "b"] and work.runs == 3


def test_result_memo_max_age_clear_cache_keep_and_size(dns_server: Any) -> None:
    now = [1000.0]
    dns_server.zone.set("a.test", "TXT", ["a"])
    r = resolver(dns_server, clock=lambda: now[0])
    r.lookup("a.test", "TXT")
    work = Work(r, "a.test")
    memo = ResultMemo(r, max_age=10.0, max_entries=2, keep=lambda v: "bad" not in v)
    memo.run("k", work, "x")
    now[0] += 9.9
    memo.run("k", work, "x")
    assert work.runs == 1
    now[0] += 0.2  # older than max_age, though the answer is good for 300 s
    memo.run("k", work, "x")
    assert work.runs == 2
    r.clear_cache()
    r.lookup("a.test", "TXT")
    memo.run("k", work, "x")  # computed before clear_cache: not used after it
    assert work.runs == 3
    memo.run("b", work, "bad")
    memo.run("b", work, "bad")  # refused by keep
    assert work.runs == 5
    memo.run("k", work, "x")
    memo.run("k2", work, "y")
    memo.run("k3", work, "z")  # a third key drops the oldest
    assert work.runs == 7
    memo.run("k", work, "x")
    assert work.runs == 8
    memo.run("k3", work, "z")
    assert work.runs == 8


def test_result_memo_never_keeps_what_the_pool_computed(dns_server: Any, in_reactor: Any) -> None:
    dns_server.zone.set("cold.test", "TXT", ["cold"])
    dns_server.zone.set("slow.test", "TXT", [HANG])
    r = resolver(dns_server, reactor=in_reactor.reactor, timeout=0.5)
    work = Work(r, "cold.test")
    memo = ResultMemo(r)
    first = in_reactor(lambda: [memo.run("k", work, "x")])[0]
    assert isinstance(first, defer.Deferred)  # a miss: the pool ran it
    assert in_reactor(lambda: first) == ["cold", "x"]
    runs = work.runs  # the inline try and the pool's run
    assert in_reactor(memo.run, "k", work, "x") == ["cold", "x"]  # inline, from the cache
    assert work.runs == runs + 1
    assert in_reactor(memo.run, "k", work, "x") == ["cold", "x"]  # kept
    assert work.runs == runs + 1
    # A lookup that fails is never cached, so its work never answers inline nor is kept.
    failing = Work(r, "slow.test")
    for _ in range(2):
        pending = in_reactor(lambda: [memo.run("slow", failing, "x")])[0]
        assert isinstance(pending, defer.Deferred)
        with pytest.raises(DNSTemporaryError):
            in_reactor(lambda p=pending: p)


def test_the_cache_stays_within_its_size_dropping_expired_then_oldest(dns_server: Any) -> None:
    now = [1000.0]
    for i in range(31):
        dns_server.zone.set(f"d{i}.test", "TXT", [f"v{i}"])
    r = resolver(dns_server, clock=lambda: now[0], max_entries=20)
    for i in range(10):
        r.txt(f"d{i}.test")
    now[0] += 301  # those ten have expired
    for i in range(10, 21):  # the 21st answer passes the limit: the expired go
        r.txt(f"d{i}.test")
    assert len(r._cache) == 11
    for i in range(21, 31):  # ten more: past the limit, all fresh, so the oldest go
        r.txt(f"d{i}.test")
    kept = {name for name, _ in r._cache}
    assert kept == {f"d{i}.test" for i in range(16, 31)}  # three quarters of 20
    asked = len(dns_server.zone.queries)
    r.txt("d30.test")  # still answered from the cache
    assert len(dns_server.zone.queries) == asked
