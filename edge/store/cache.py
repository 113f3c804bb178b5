"""Short-lived caches of the store's hot lookups: recipient routes, devices, spam rules.

Every inbound message asks the store who a recipient is, which account owns its device and
which block rules apply; those answers change rarely. `CachedLookups` keeps them for `ttl`
seconds and drops everything as soon as this process commits a control-plane write
(`Store.generation`), so a change made through this edge's API holds for the next
connection, and one made through another edge sharing the database within `ttl` seconds.
It never caches an exception.

The lookups block on a miss (they query the store), so from the reactor thread go through
`cached_or_load(fn, *args)`: `fn`, made of this cache's lookups, runs at once in the
calling thread when every lookup it makes is answered by a fresh entry (`peek`), and in a
worker thread (`run_blocking`), where misses load from the store, otherwise.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from twisted.internet import defer, threads

from edge.store.records import Device, RecipientTarget, SpamRule
from edge.store.store import Store


class NotCached(Exception):
    """A lookup under `peek` that would have to query the store."""


class CachedLookups:
    def __init__(
        self,
        store: Store,
        ttl: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
        run_blocking: Callable[..., defer.Deferred[Any]] = threads.deferToThread,
    ) -> None:
        self.store = store
        self.ttl = ttl
        self.clock = clock
        self.run_blocking = run_blocking
        self._lock = threading.Lock()
        self._entries: dict[tuple[Any, ...], tuple[float, Any]] = {}
        self._generation = store.generation
        self._local = threading.local()  # .cache_only / .missed of `peek`, per thread

    def peek(self, fn: Callable[..., Any], *args: Any) -> Any:
        """`fn(*args)` with this cache's lookups answered from fresh entries only.

        Never blocks: a lookup that would query the store raises NotCached (also when `fn`
        swallowed it). `fn` must consist of this cache's lookups (anything else it does
        runs here, in the calling thread).
        """
        local = self._local
        if getattr(local, "cache_only", False):
            return fn(*args)
        local.cache_only = True
        local.missed = False
        try:
            value = fn(*args)
        finally:
            local.cache_only = False
        if local.missed:
            raise NotCached(getattr(fn, "__name__", repr(fn)))
        return value

    def cached_or_load(self, fn: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
        """`fn(*args)` (made of this cache's lookups) as a Deferred: fired at once when the
        cache answers it, else run in a worker thread, loading what is missing."""
        try:
            return defer.succeed(self.peek(fn, *args))
        except NotCached:
            return self.run_blocking(fn, *args)
        except Exception:
            if getattr(self._local, "missed", False):
                return self.run_blocking(fn, *args)
            return defer.fail()

    def _get(self, key: tuple[Any, ...], load: Callable[[], Any]) -> Any:
        now = self.clock()
        with self._lock:
            if self._generation != self.store.generation:
                self._entries.clear()
                self._generation = self.store.generation
            hit = self._entries.get(key)
            if hit is not None and hit[0] > now:
                return hit[1]
            generation = self._generation
        local = self._local
        if getattr(local, "cache_only", False):
            local.missed = True
            raise NotCached(repr(key))
        value = load()
        with self._lock:
            if generation == self.store.generation:  # nothing changed while we loaded
                self._entries[key] = (now + self.ttl, value)
        return value

    def resolve_recipient(self, address: str) -> RecipientTarget | None:
        found: RecipientTarget | None = self._get(
            ("rcpt", address.lower()), lambda: self.store.resolve_recipient(address)
        )
        return found

    def awaiting_route(self, address: str) -> bool:
        awaiting: bool = self._get(
            ("awaiting", address.lower()), lambda: self.store.awaiting_route(address)
        )
        return awaiting

    def routed_domain(self, domain: str) -> bool:
        routed: bool = self._get(
            ("domain", domain.lower()), lambda: self.store.routed_domain(domain)
        )
        return routed

    def get_device(self, device_id: str) -> Device | None:
        found: Device | None = self._get(
            ("device", device_id), lambda: self.store.get_device(device_id)
        )
        return found

    def list_spam_rules(
        self, account_id: str | None = None, active_only: bool = True
    ) -> list[SpamRule]:
        rules: list[SpamRule] = self._get(
            ("rules", account_id, active_only),
            lambda: self.store.list_spam_rules(account_id, active_only),
        )
        return list(rules)
