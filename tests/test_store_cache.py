"""The store's lookup cache: hits, expiry, and this process's writes seen at once (for the
MX's lookups and for the relay's question of who owns a sender address)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from edge.store import Store, open_store
from edge.store.access import AccessStore
from edge.store.cache import CachedLookups
from edge.store.keyring import StoreKeys


class Counting:
    """Counts the store queries behind the cache (the store itself is real)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.calls = 0

    def __getattr__(self, name: str) -> Any:
        value = getattr(self.store, name)
        # `_read`: each read transaction of the relay's sender lookups (edge.store.outbound).
        if name in ("resolve_recipient", "get_device", "list_spam_rules", "_read"):

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


def test_a_repeated_sender_is_answered_without_a_query(tmp_path: Path) -> None:
    store, counting, cache, now = setup(tmp_path)
    account = store.get_device("dev_home").account_id  # type: ignore[union-attr]
    for address in ("me@home.test", "Me@HOME.test", "<me@home.test>"):
        assert cache.sender_account("dev_home", address) == account
    assert cache.sender_account("dev_home", "you@else.test") is None  # not the account's
    assert cache.sender_account("dev_home", "you@else.test") is None
    assert cache.sender_account("dev_home", "") is None  # no query for no address
    assert counting.calls == 2
    now[0] += 2.5
    assert cache.sender_account("dev_home", "me@home.test") == account
    assert counting.calls == 3


def test_a_sender_change_in_this_process_is_seen_at_once(tmp_path: Path) -> None:
    store, _counting, cache, _now = setup(tmp_path)
    account = store.get_device("dev_home").account_id  # type: ignore[union-attr]
    managed = store.add_managed_address("bob", "dev_home", domain="mail.edge.test", namespace="h")
    assert cache.sender_account("dev_home", managed.address) == account
    store.delete_managed_address(managed.id)  # an address removed (its domain is not routed)
    assert cache.sender_account("dev_home", managed.address) is None

    route = store.create_route(
        "work.test",
        type="byod",
        connector_id="dev_home",
        status="active",
        account_id=account,
        verified_at=datetime(2026, 12, 7, tzinfo=UTC),
    )
    assert cache.sender_account("dev_home", "me@work.test") == account
    store.update_route(route.id, status="disabled")  # a route disabled
    assert cache.sender_account("dev_home", "me@work.test") is None
    store.update_route(route.id, status="active")
    assert cache.sender_account("dev_home", "me@work.test") == account
    AccessStore(store).revoke_device("dev_home")  # a device revoked
    assert cache.sender_account("dev_home", "me@work.test") is None
