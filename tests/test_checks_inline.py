"""Checks answer from caches in the reactor thread, and go to a worker pool only on a miss.

`DNSResolver.run_cached` runs DNS-bound work (pyspf, dkimpy) at once in cache-only mode and
again in the pool when a lookup would need the network, also when the library swallowed the
internal NotCached; `CachedLookups.cached_or_load` does the same for store lookups. Either
way the answer is the one the pool would have given.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import defer

from edge.checks import Transaction
from edge.checks.arc import ARCCheck, has_arc_headers
from edge.checks.base import INLINE_LIMIT
from edge.checks.dkim import DKIMCheck
from edge.checks.dmarc import DMARCCheck, OrgDomains
from edge.checks.spf import SPFCheck, evaluate
from edge.dns.resolver import DNSResolver, NotCached
from edge.store import open_store
from edge.store.cache import CachedLookups
from tests.test_checks_dkim import MESSAGE, rsa_key, sign


class Spy:
    """Wraps a resolver's `run_async`: counts the trips to the worker pool."""

    def __init__(self, resolver: DNSResolver) -> None:
        self.calls: list[str] = []
        self.run_async = resolver.run_async
        resolver.run_async = self  # type: ignore[method-assign]

    def __call__(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        self.calls.append(getattr(fn, "__name__", repr(fn)))
        return self.run_async(fn, *args, **kwargs)


def now_or_later(in_reactor: Any, start: Callable[[], defer.Deferred[Any]]) -> tuple[bool, Any]:
    """Call `start` in the reactor thread: (whether it had its answer at once, the answer)."""

    def run() -> defer.Deferred[tuple[bool, Any]]:
        d = start()
        at_once = d.called
        return d.addCallback(lambda result: (at_once, result))

    out: tuple[bool, Any] = in_reactor(run)
    return out


@pytest.fixture
def env(dns_server: Any, in_reactor: Any) -> Iterator[tuple[Any, DNSResolver, Spy]]:
    resolver = DNSResolver(["127.0.0.1"], dns_server.port, timeout=1.0, reactor=in_reactor.reactor)
    z = dns_server.zone
    z.set("inc.spf.test", "TXT", ["v=spf1 ip4:192.0.2.1 -all"])
    z.set("good.test", "TXT", ["v=spf1 a:mail.good.test include:inc.spf.test -all"])
    z.set("mail.good.test", "A", ["198.51.100.7"])
    z.set("strict.test", "TXT", ["v=spf1 -all exp=why.strict.test"])
    z.set("why.strict.test", "TXT", ["%{i} is not one of our mail servers"])
    yield z, resolver, Spy(resolver)


@pytest.mark.parametrize(("ip", "expected"), [("192.0.2.1", "pass"), ("203.0.113.5", "fail")])
def test_spf_cold_cache_goes_to_the_pool_and_a_warm_one_answers_inline(
    env: tuple[Any, DNSResolver, Spy], in_reactor: Any, ip: str, expected: str
) -> None:
    zone, resolver, spy = env
    check = SPFCheck(resolver)

    def run() -> defer.Deferred[Any]:
        tx = Transaction(ip, helo="client.good.test", mail_from="ann@good.test")
        return defer.maybeDeferred(check.mail, tx).addCallback(lambda _: tx.spf)

    cold_now, cold = now_or_later(in_reactor, run)
    assert not cold_now and spy.calls == ["evaluate"]
    assert cold.result == expected
    queries = len(zone.queries)

    warm_now, warm = now_or_later(in_reactor, run)
    assert warm_now and spy.calls == ["evaluate"]  # no second trip to the pool
    assert len(zone.queries) == queries  # nor to the DNS server
    assert warm == cold
    # The same as a plain evaluation in a worker thread.
    plain = evaluate(resolver, ip, "ann@good.test", "client.good.test")
    assert plain == cold


def test_a_miss_that_pyspf_swallows_still_goes_to_the_pool(
    env: tuple[Any, DNSResolver, Spy], in_reactor: Any
) -> None:
    _zone, resolver, spy = env
    # The policy is cached, its explanation (exp=) is not: pyspf fetches that one inside a
    # bare `except: pass`, so the inline run would finish without it.
    resolver.lookup("strict.test", "TXT")
    fn = evaluate
    args = (resolver, "203.0.113.5", "bob@strict.test", "client.strict.test")

    cold_now, cold = now_or_later(in_reactor, lambda: resolver.run_cached(fn, *args))
    assert not cold_now and spy.calls == ["evaluate"]
    assert cold.result == "fail"
    assert "203.0.113.5 is not one of our mail servers" in cold.reason

    warm_now, warm = now_or_later(in_reactor, lambda: resolver.run_cached(fn, *args))
    assert warm_now and warm == cold and spy.calls == ["evaluate"]


def test_run_cached_reports_errors_of_the_inline_run(
    env: tuple[Any, DNSResolver, Spy], in_reactor: Any
) -> None:
    _zone, resolver, spy = env

    def broken() -> None:
        raise ValueError("no")

    def start() -> defer.Deferred[Any]:
        return resolver.run_cached(broken).addErrback(lambda f: f.trap(ValueError))

    assert now_or_later(in_reactor, start) == (True, ValueError)
    assert spy.calls == []
    # Cache-only mode is for the run_cached call alone.
    assert resolver.lookup("good.test", "TXT").records


def test_lookup_raises_not_cached_only_under_run_cached(
    env: tuple[Any, DNSResolver, Spy], in_reactor: Any
) -> None:
    _zone, resolver, _spy = env
    seen: list[BaseException] = []

    def probe() -> None:
        try:
            resolver.lookup("nothing-here.test", "TXT")
        except NotCached as exc:
            seen.append(exc)
            raise

    now_or_later(in_reactor, lambda: resolver.run_cached(probe))
    assert len(seen) == 1  # the inline try; the pool run queried
    assert resolver.lookup("nothing-here.test", "TXT").nxdomain


def test_dkim_and_arc_without_headers_touch_neither_pool_nor_dkimpy(
    env: tuple[Any, DNSResolver, Spy], in_reactor: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    _zone, resolver, spy = env
    import dkim

    def no_dkimpy(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("dkimpy was used")

    monkeypatch.setattr(dkim, "DKIM", no_dkimpy)
    monkeypatch.setattr(dkim, "arc_verify", no_dkimpy)
    tx = Transaction("192.0.2.1")
    at_once, findings = now_or_later(
        in_reactor, lambda: defer.maybeDeferred(DKIMCheck(resolver).data, tx, MESSAGE)
    )
    assert at_once and [f.key for f in findings] == ["dkim.none"] and tx.dkim == []
    at_once, findings = now_or_later(
        in_reactor, lambda: defer.maybeDeferred(ARCCheck(resolver).data, tx, MESSAGE)
    )
    assert at_once and [f.key for f in findings] == ["arc.none"]
    assert tx.arc is not None and tx.arc.reason == "Message is not ARC signed"
    assert spy.calls == []


def test_arc_header_scan_leaves_anything_unusual_to_dkimpy() -> None:
    assert not has_arc_headers(MESSAGE)
    assert not has_arc_headers(b"")
    assert not has_arc_headers(b"From nobody Fri Nov 20\r\nSubject: x\r\n\r\nARC-Seal: body\r\n")
    assert has_arc_headers(b"Subject: x\r\narc-seal: i=1\r\n\r\n")
    assert has_arc_headers(b"Subject: x\nARC-Authentication-Results: i=1\n\nbody")
    assert has_arc_headers(b"Subject : x\r\n\r\n")  # dkimpy refuses that; it says so
    assert has_arc_headers(b" folded first\r\nSubject: x\r\n\r\n")


def test_signed_messages_verify_inline_once_keys_are_cached_unless_big(
    env: tuple[Any, DNSResolver, Spy], in_reactor: Any
) -> None:
    zone, resolver, spy = env
    pem, record = rsa_key()
    zone.set("sel._domainkey.signed.test", "TXT", [record])
    check = DKIMCheck(resolver)

    def run(message: bytes) -> tuple[bool, Any]:
        tx = Transaction("192.0.2.1", from_count=1)
        at_once, _ = now_or_later(in_reactor, lambda: defer.maybeDeferred(check.data, tx, message))
        return at_once, [(r.result, r.domain) for r in tx.dkim]

    signed = sign(MESSAGE, pem)
    assert run(signed) == (False, [("pass", "signed.test")])
    assert run(signed) == (True, [("pass", "signed.test")])
    assert spy.calls == ["verify_all"]
    big = sign(MESSAGE + (b"x" * 76 + b"\r\n") * (INLINE_LIMIT // 78 + 1), pem)
    assert len(big) > INLINE_LIMIT
    assert run(big) == (False, [("pass", "signed.test")])
    assert spy.calls == ["verify_all", "verify_all"]


def test_dmarc_answers_inline_once_the_record_is_cached(
    env: tuple[Any, DNSResolver, Spy], in_reactor: Any
) -> None:
    zone, resolver, spy = env
    zone.set("_dmarc.good.test", "TXT", ["v=DMARC1; p=reject"])
    check = DMARCCheck(resolver, OrgDomains())

    def run() -> tuple[bool, Any]:
        tx = Transaction("192.0.2.1", header_from=["ann@good.test"], from_count=1)
        at_once, findings = now_or_later(
            in_reactor, lambda: defer.maybeDeferred(check.data, tx, MESSAGE)
        )
        return at_once, [f.key for f in findings]

    assert run() == (False, ["dmarc.reject"])
    assert run() == (True, ["dmarc.reject"])
    assert spy.calls == ["evaluate"]


def test_cached_or_load_answers_hits_at_once_and_loads_misses_in_a_thread(
    tmp_path: Path, in_reactor: Any
) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'store.db'}")
    device = store.create_device("home", device_id="dev_home", connector_smtp_addr="127.0.0.1:1")
    store.create_route("home.test", type="byod", connector_id=device.id, status="active")
    store.add_byod_address("me", "home.test", device.id)
    threads: list[str] = []

    def run_blocking(fn: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
        def in_thread() -> Any:
            threads.append(threading.current_thread().name)
            return fn(*args)

        from twisted.internet.threads import deferToThread

        return deferToThread(in_thread)

    cache = CachedLookups(store, ttl=60.0, run_blocking=run_blocking)

    def account_of(address: str) -> str | None:  # two lookups, as the MX makes them
        target = cache.resolve_recipient(address)
        found = cache.get_device(target.device_id) if target and target.device_id else None
        return found.account_id if found else None

    cold = now_or_later(in_reactor, lambda: cache.cached_or_load(account_of, "me@home.test"))
    assert cold == (False, device.account_id) and len(threads) == 1
    warm = now_or_later(in_reactor, lambda: cache.cached_or_load(account_of, "Me@Home.test"))
    assert warm == (True, device.account_id) and len(threads) == 1
    # Half cached (the device is, this address is not): loaded in a thread, whole.
    store.add_byod_address("you", "home.test", device.id)  # (a write: drops the cache)
    cache.resolve_recipient("me@home.test")
    cache.get_device("dev_home")
    half = now_or_later(in_reactor, lambda: cache.cached_or_load(account_of, "you@home.test"))
    assert half == (False, device.account_id) and len(threads) == 2
    assert now_or_later(in_reactor, lambda: cache.cached_or_load(cache.list_spam_rules)) == (
        False,
        [],
    )
    assert now_or_later(in_reactor, lambda: cache.cached_or_load(cache.list_spam_rules)) == (
        True,
        [],
    )
    # Outside peek, a miss loads as before.
    assert cache.resolve_recipient("nobody@home.test") is None
    store.close()
