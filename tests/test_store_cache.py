"""The store's lookup cache: hits, expiry, and this process's writes seen at once."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edge.store import Store, open_store
from edge.store.cache import CachedLookups
from edge.store.keyring import StoreKeys


class Counting:
    """Counts the store queries behind the cache (the store itself is real)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.calls = 0

    def __getattr__(self, name: str) -> Any:
        value = getattr(self.store, name)
        if name in ("resolve_recipient", "get_device", "list_spam_rules"):

            def counted(*args: Any, **kwargs: Any) -> Any:
                self.calls += 1
                return value(*args, **kwargs)

            return counted
        return value


def setup(tmp_path: Path) -> tuple[Store, Counting, CachedLookups, list[float]]:
    store = open_store(f"sqlite:///{tmp_path / 'store.db'}", keys=StoreKeys.generate())
    device = store.create_device("home", device_id="dev_home", connector_smtp_addr="127.0.0.1:2525")
    store.create_route("home.test", type="byod", connector_id=device.id, status="active")
    store.add_byod_address("me", "home.test", device.id)
    counting = Counting(store)
    now = [100.0]
    cache = CachedLookups(counting, ttl=2.0, clock=lambda: now[0])  # type: ignore[arg-type]
    return store, counting, cache, now


def test_hits_do_not_query_the_store(tmp_path: Path) -> None:
    _store, counting, cache, _now = setup(tmp_path)
    for _ in range(5):
        target = cache.resolve_recipient("Me@Home.test")
        assert target is not None and target.device_id == "dev_home"
        assert cache.get_device("dev_home") is not None
        assert cache.list_spam_rules() == []
    assert counting.calls == 3


def test_entries_expire(tmp_path: Path) -> None:
    _store, counting, cache, now = setup(tmp_path)
    cache.resolve_recipient("me@home.test")
    now[0] += 2.5
    cache.resolve_recipient("me@home.test")
    assert counting.calls == 2


def test_a_write_in_this_process_is_seen_at_once(tmp_path: Path) -> None:
    store, _counting, cache, _now = setup(tmp_path)
    assert cache.resolve_recipient("you@home.test") is None
    assert cache.list_spam_rules() == []
    store.add_byod_address("you", "home.test", "dev_home")
    store.add_spam_rule("sender", "spam@bad.test")
    target = cache.resolve_recipient("you@home.test")
    assert target is not None and target.device_id == "dev_home"
    assert [r.value for r in cache.list_spam_rules()] == ["spam@bad.test"]
    store.update_device("dev_home", auth_status="revoked")
    assert cache.resolve_recipient("me@home.test") is None


def test_log_writes_keep_the_cache(tmp_path: Path) -> None:
    from edge.store.events import DeliveryEvents

    store, counting, cache, _now = setup(tmp_path)
    cache.resolve_recipient("me@home.test")
    DeliveryEvents(store).record([("Q1", "me@home.test", "accepted", "", 1.0)])
    cache.resolve_recipient("me@home.test")
    assert counting.calls == 1
