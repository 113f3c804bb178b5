"""Short-lived caches of the store's hot lookups: recipient routes, devices, spam rules.

Every inbound message asks the store who a recipient is, which account owns its device and
which block rules apply; those answers change rarely. `CachedLookups` keeps them for `ttl`
seconds and drops everything as soon as this process commits a control-plane write
(`Store.generation`), so a change made through this edge's API holds for the next
connection, and one made through another edge sharing the database within `ttl` seconds.
Blocking on a miss (it queries the store): call it from a worker thread. It never caches
an exception.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from edge.store.records import Device, RecipientTarget, SpamRule
from edge.store.store import Store

_MISSING = object()


class CachedLookups:
    def __init__(
        self, store: Store, ttl: float = 2.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.store = store
        self.ttl = ttl
        self.clock = clock
        self._lock = threading.Lock()
        self._entries: dict[tuple[Any, ...], tuple[float, Any]] = {}
        self._generation = store.generation

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
