"""The one DNS resolver of a process: dnspython, nameservers and port from configuration.

Every check and every lookup (SPF, DKIM, DMARC, MX, blocklists, domain scans) goes through
a `DNSResolver` passed in at construction; nothing builds its own resolver. Answers are
cached for their TTL. The `lookup` family is blocking (dkimpy and pyspf call their DNS
functions synchronously). `run_cached` runs such DNS-bound work in the calling (reactor)
thread when every lookup it makes is answered from the cache, and again in the resolver's
own bounded thread pool (`run_async`) as soon as one would need the network
(`edge.runtime.cachedload`, the runner the store's cache shares); so CPU work on cached data
runs inline, and nothing that may wait on the network ever blocks the reactor.
`lookup_async` is the same for one lookup. `run_cached_now` answers without a Deferred when
the cache answers, and `ResultMemo` keeps the results of such work for as long as the
answers they were computed from.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, TypeVar

import dns.exception
import dns.name
import dns.rdatatype
import dns.resolver
from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from edge.runtime.cachedload import MISSED, CachedLoad, NotCached
from edge.runtime.nowlater import NowOrLater

__all__ = ["Answer", "DNSResolver", "DNSTemporaryError", "NotCached", "ResultMemo"]

T = TypeVar("T")


class DNSTemporaryError(Exception):
    """A lookup that may succeed later: timeout, SERVFAIL, no nameserver answering."""


@dataclass(frozen=True)
class Answer:
    """The records of one lookup. `nxdomain` tells a missing name from a name without data."""

    name: str
    rdtype: str
    records: tuple[str, ...]
    nxdomain: bool = False
    ttl: float = 0.0

    @property
    def void(self) -> bool:
        """No records at all (RFC 7208 §4.6.4 "void lookup")."""
        return not self.records


def _text(rdata: Any, rdtype: str) -> str:
    if rdtype == "TXT":
        return b"".join(rdata.strings).decode("utf-8", "replace")
    if rdtype == "MX":
        return f"{rdata.preference} {rdata.exchange.to_text(omit_final_dot=True)}"
    if rdtype in ("CNAME", "PTR", "NS"):
        return str(rdata.target.to_text(omit_final_dot=True))
    return str(rdata.to_text())


class DNSResolver:
    def __init__(
        self,
        nameservers: list[str] | None = None,
        port: int = 53,
        timeout: float = 5.0,
        *,
        reactor: Any = None,
        clock: Callable[[], float] = time.monotonic,
        max_threads: int = 8,
        min_ttl: float = 0.0,
        max_ttl: float = 3600.0,
        max_entries: int = 50_000,
    ) -> None:
        if nameservers:
            self.resolver = dns.resolver.Resolver(configure=False)
            self.resolver.nameservers = list(nameservers)
        else:
            self.resolver = dns.resolver.Resolver()
        self.resolver.port = port
        self.resolver.timeout = timeout
        self.resolver.lifetime = timeout
        self.clock = clock
        self.min_ttl = min_ttl
        self.max_ttl = max_ttl
        self.max_entries = max_entries
        # In the order the answers came (oldest first), so that a full cache drops its oldest.
        self._cache: dict[tuple[str, str], tuple[float, Answer]] = {}
        self._lock = threading.Lock()
        self._reactor = reactor
        self._pool: ThreadPool | None = None
        self._max_threads = max_threads
        # `run_cached`'s runner: misses go to `run_async` (as it is when they do).
        self.cached = CachedLoad(lambda fn, *args, **kw: self.run_async(fn, *args, **kw))
        self.generation = 0  # bumped by clear_cache: results computed before are stale

    def lookup(self, name: str, rdtype: str) -> Answer:
        """Blocking lookup (run it off the reactor thread). Raises DNSTemporaryError.

        Under `run_cached` (cache-only mode in this thread) a lookup the cache cannot
        answer raises NotCached instead of querying."""
        rdtype = rdtype.upper()
        key = (name.lower().rstrip("."), rdtype)
        now = self.clock()
        with self._lock:
            hit = self._cache.get(key)
        cached = self.cached
        if hit is not None and hit[0] > now:
            cached.hit(hit[0])  # the earliest expiry of what an inline run used
            return hit[1]
        if cached.cache_only:
            cached.miss(f"{rdtype} {key[0]}")
        answer = self._query(key[0], rdtype)
        ttl = min(max(answer.ttl, self.min_ttl), self.max_ttl)
        if ttl > 0:
            with self._lock:
                self._keep(key, now + ttl, answer, now)
        return answer

    def _keep(self, key: tuple[str, str], expires: float, answer: Answer, now: float) -> None:
        """Cache an answer (lock held). Past `max_entries`, expired answers go first, then,
        while the cache is still nine tenths full, the oldest, down to three quarters: an
        MX hears from ever new sender domains, and the cache must not grow with them."""
        cache = self._cache
        cache.pop(key, None)  # to the end: the newest
        cache[key] = (expires, answer)
        if len(cache) <= self.max_entries:
            return
        for stale in [k for k, (at, _) in cache.items() if at <= now]:
            del cache[stale]
        if len(cache) * 10 > self.max_entries * 9:
            for oldest in list(itertools.islice(cache, len(cache) - self.max_entries * 3 // 4)):
                del cache[oldest]

    def _query(self, name: str, rdtype: str) -> Answer:
        try:
            result = self.resolver.resolve(name, rdtype, raise_on_no_answer=False, search=False)
        except dns.resolver.NXDOMAIN as exc:
            ttl = _negative_ttl(exc)
            return Answer(name, rdtype, (), nxdomain=True, ttl=ttl)
        except (dns.resolver.NoNameservers, dns.exception.Timeout) as exc:
            raise DNSTemporaryError(f"{rdtype} {name}: {exc}") from exc
        except (dns.name.EmptyLabel, dns.name.LabelTooLong, dns.name.NameTooLong):
            return Answer(name, rdtype, (), nxdomain=True)
        except dns.exception.DNSException as exc:
            raise DNSTemporaryError(f"{rdtype} {name}: {exc}") from exc
        rrset = result.rrset
        if rrset is None:
            return Answer(name, rdtype, (), ttl=_negative_ttl_response(result))
        records = tuple(_text(r, rdtype) for r in rrset)
        return Answer(name, rdtype, records, ttl=float(rrset.ttl))

    def txt(self, name: str) -> list[str]:
        return list(self.lookup(name, "TXT").records)

    def mx(self, name: str) -> list[tuple[int, str]]:
        """MX records by preference; empty if none (the caller decides on the A fallback)."""
        out = []
        for record in self.lookup(name, "MX").records:
            pref, _, host = record.partition(" ")
            out.append((int(pref), host))
        return sorted(out)

    def addresses(self, name: str) -> list[str]:
        return [*self.lookup(name, "A").records, *self.lookup(name, "AAAA").records]

    def host_addresses(self, name: str) -> list[str]:
        """The IPv4 then IPv6 addresses of a host to connect to (blocking): as `addresses`,
        except that a temporary failure of one of the two lookups does not hide the other's
        answer (a broken AAAA server must not keep mail from an IPv4 host); raises
        DNSTemporaryError only when neither answered. [] for no address or NXDOMAIN."""
        found: list[str] = []
        failure: DNSTemporaryError | None = None
        for rdtype in ("A", "AAAA"):
            try:
                found.extend(self.lookup(name, rdtype).records)
            except DNSTemporaryError as exc:
                failure = exc
        if failure is not None and not found:
            raise failure
        return found

    def lookup_async(self, name: str, rdtype: str) -> defer.Deferred[Answer]:
        """The same lookup as a Deferred: from the cache at once, else in the thread pool."""
        return self.run_cached(self.lookup, name, rdtype)

    def run_cached(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> defer.Deferred[Any]:
        """Run DNS-bound work here in the calling thread if the cache answers all its lookups.

        `fn` runs at once in cache-only mode: a `lookup` the cache cannot answer raises
        NotCached. If one did (even if `fn` swallowed it), `fn` runs again from the start
        in the worker pool (`run_async`), where lookups may query; so `fn` must be free of
        side effects before its lookups. Use it for work that is cheap once the answers are
        cached (no big message bodies to hash): it must never stall the calling thread.
        """
        return defer.maybeDeferred(self.run_cached_now, fn, *args, **kwargs)

    def run_cached_now(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> NowOrLater[T]:
        """`run_cached` without a Deferred when the cache answers: `fn`'s value at once (an
        error of the inline run is raised here), else the Deferred of the worker pool's run."""
        return self.cached.run(fn, *args, **kwargs)

    def run_async(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> defer.Deferred[Any]:
        """Run DNS-bound work (e.g. an SPF evaluation) in the resolver's thread pool."""
        reactor = self._reactor
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = self._reactor = default_reactor
        if self._pool is None:
            self._pool = ThreadPool(minthreads=0, maxthreads=self._max_threads, name="dns")
            self._pool.start()
            reactor.addSystemEventTrigger("during", "shutdown", self._pool.stop)
        return deferToThreadPool(reactor, self._pool, fn, *args, **kwargs)

    def clear_cache(self) -> None:
        with self._lock:
            self._cache.clear()
            self.generation += 1


class ResultMemo:
    """Results of DNS-bound work, each kept while the DNS answers it was computed from are.

    `run(key, fn, *args)` answers the kept result of `key` at once while it is fresh;
    otherwise it runs `fn` as `DNSResolver.run_cached_now` does. A result computed from the
    resolver's cache alone, and accepted by `keep`, is kept until the first of the answers
    it used expires, `max_age` seconds at most, and never past a `clear_cache`. A result
    of the worker pool (one that needed the network, or met an error there) is never kept:
    the next run finds its answers cached and keeps its own. `fn` must depend only on its
    arguments and its lookups, and `key` must stand for all the arguments. Used from one
    thread (the reactor's); at most `max_entries` results, the oldest dropped first.
    """

    def __init__(
        self,
        resolver: DNSResolver,
        *,
        max_age: float = 30.0,
        max_entries: int = 4096,
        keep: Callable[[Any], bool] | None = None,
    ) -> None:
        self.resolver = resolver
        self.max_age = max_age
        self.max_entries = max_entries
        self.keep = keep
        self._entries: OrderedDict[Hashable, tuple[float, int, Any]] = OrderedDict()

    def run(self, key: Hashable, fn: Callable[..., T], *args: Any, **kwargs: Any) -> NowOrLater[T]:
        resolver = self.resolver
        now = resolver.clock()
        generation = resolver.generation
        entries = self._entries
        hit = entries.get(key)
        if hit is not None:
            if hit[0] > now and hit[1] == generation:
                kept: T = hit[2]
                return kept
            del entries[key]
        cached = resolver.cached
        if cached.cache_only:  # inside run_cached: no keeping
            return fn(*args, **kwargs)
        result, expires = cached.inline(fn, args, kwargs)
        if result is MISSED:
            return cached.load(fn, *args, **kwargs)
        until = min(expires, now + self.max_age)
        if until > now and (self.keep is None or self.keep(result)):
            if len(entries) >= self.max_entries:
                entries.popitem(last=False)
            entries[key] = (until, generation, result)
        out: T = result
        return out


def _negative_ttl(exc: dns.resolver.NXDOMAIN) -> float:
    try:
        responses = exc.responses()
    except Exception:
        return 0.0
    for response in responses.values():
        return _soa_minimum(response)
    return 0.0


def _negative_ttl_response(result: Any) -> float:
    return _soa_minimum(getattr(result, "response", None))


def _soa_minimum(response: Any) -> float:
    for rrset in getattr(response, "authority", []) or []:
        if rrset.rdtype == dns.rdatatype.SOA:
            return float(min(rrset.ttl, rrset[0].minimum))
    return 0.0
