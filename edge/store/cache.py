"""Short-lived caches of the store's hot lookups: recipient routes, devices, spam rules, and
which account a relaying device may send as.

Every inbound message asks the store who a recipient is, which account owns its device and
which block rules apply; every relayed one, whether the device's account owns its sender and
author addresses. Those answers change rarely. `CachedLookups` keeps them for `ttl`
seconds and drops everything as soon as this process commits a control-plane write
(`Store.generation`), so a change made through this edge's API holds for the next
connection, and one made through another edge sharing the database within `ttl` seconds.
It never caches an exception.

The lookups block on a miss (they query the store), so from the reactor thread go through
`cached_or_load(fn, *args)`: `fn`, made of this cache's lookups, runs at once in the
calling thread when every lookup it makes is answered by a fresh entry (`peek`), and in a
worker thread (`run_blocking`), where misses load from the store, otherwise: the runner of
`edge.runtime.cachedload`, which the DNS resolver's cache shares.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from twisted.internet import defer, threads

from edge.runtime.cachedload import MISSED, CachedLoad, NotCached
from edge.runtime.nowlater import is_deferred
from edge.store.outbound import OutboundStore
from edge.store.records import Device, RecipientTarget, SpamRule
from edge.store.store import Store
from edge.store.validate import split_address

__all__ = ["CachedLookups", "NotCached"]

T = TypeVar("T")


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
        self._outbound = OutboundStore(store)
        # Misses load in a worker thread, through `run_blocking` as it is when they do.
        self.cached = CachedLoad(lambda fn, *args: self.run_blocking(fn, *args))

    def peek(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` with this cache's lookups answered from fresh entries only.

        Never blocks: a lookup that would query the store raises NotCached (also when `fn`
        swallowed it, or failed after it). `fn` must consist of this cache's lookups
        (anything else it does runs here, in the calling thread).
        """
        cached = self.cached
        if cached.cache_only:
            return fn(*args)
        value, _expires = cached.inline(fn, args, {})
        if value is MISSED:
            raise NotCached(getattr(fn, "__name__", repr(fn)))
        return value

    def cached_or_load(self, fn: Callable[..., T], *args: Any) -> defer.Deferred[T]:
        """`fn(*args)` (made of this cache's lookups) as a Deferred: fired at once when the
        cache answers it, else run in a worker thread, loading what is missing."""
        try:
            value = self.cached.run(fn, *args)
        except Exception:
            return defer.fail()
        return value if is_deferred(value) else defer.succeed(value)

    def _get(self, key: tuple[Any, ...], load: Callable[[], T]) -> T:
        now = self.clock()
        with self._lock:
            if self._generation != self.store.generation:
                self._entries.clear()
                self._generation = self.store.generation
            hit = self._entries.get(key)
            if hit is not None and hit[0] > now:
                found: T = hit[1]
                return found
            generation = self._generation
        cached = self.cached
        if cached.cache_only:
            cached.miss(repr(key))
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

    def sender_account(self, device_id: str, address: str) -> str | None:
        """`OutboundStore.sender_account`, cached per device and address: the device's
        status (a revoked device) and the address's owner (a removed address, a disabled
        route) are as fresh as every other answer here."""
        parts = split_address(address)
        if parts is None:
            return None
        account: str | None = self._get(
            ("sender", device_id, f"{parts[0]}@{parts[1]}"),
            lambda: self._outbound.sender_account(device_id, address),
        )
        return account
