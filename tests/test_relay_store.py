"""The store's side of the relay (`edge.store.outbound`), on SQLite and PostgreSQL: which
addresses a device's account owns, and the events of the mail each device relayed."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from edge.store import Store
from edge.store.events import DeliveryEvents
from edge.store.outbound import MAX_EVENTS, OutboundStore
from tests.test_store_support import database_fixture, store_fixture  # noqa: F401

AT = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)


def _route(store: Store, domain: str, device_id: str, **fields: Any) -> None:
    device = store.get_device(device_id)
    assert device is not None
    fields.setdefault("status", "active")
    store.create_route(
        domain,
        type="byod",
        connector_id=device_id,
        verified_at=AT,
        account_id=device.account_id,
        **fields,
    )


# -- who owns a sender address ------------------------------------------------------------------


def test_an_account_owns_its_devices_addresses_and_its_verified_domains(store: Store) -> None:
    laptop = store.create_device("laptop")
    phone = store.create_device("phone", account_id=laptop.account_id)
    stranger = store.create_device("stranger", account_id=store.ensure_account("acct_o", "o").id)
    _route(store, "home.test", laptop.id)
    _route(store, "other.test", stranger.id)
    store.add_byod_address("alice", "home.test", laptop.id)
    store.add_byod_address("carol", "other.test", stranger.id)
    managed = store.add_managed_address("bob", phone.id, domain="mail.edge.test", namespace="ph")
    owns = OutboundStore(store).sender_account
    account = laptop.account_id

    assert owns(laptop.id, "alice@home.test") == account
    assert owns(laptop.id, "Alice@HOME.test.") == account  # as the MX compares addresses
    assert owns(laptop.id, "anyone@home.test") == account  # the account's verified domain
    assert owns(laptop.id, managed.address) == account  # another device of the account
    assert owns(phone.id, "alice@home.test") == account
    # Another account's addresses and domains, look-alikes and the null sender: never.
    for address in (
        "carol@other.test",
        "dave@other.test",
        "alice@home.test.other.test",
        "alice@xhome.test",
        "alice@home.tes",
        "alice@sub.home.test",
        "",
        "not an address",
    ):
        assert owns(laptop.id, address) is None, address
    assert owns(stranger.id, "alice@home.test") is None
    assert owns(stranger.id, managed.address) is None
    assert owns(stranger.id, "carol@other.test") == stranger.account_id
    assert owns("dev_nobody", "alice@home.test") is None


def test_a_claim_a_disabled_route_or_a_revoked_device_owns_nothing(store: Store) -> None:
    laptop = store.create_device("laptop")
    store.create_route("claimed.test", type="byod", connector_id=laptop.id)  # not verified
    _route(store, "off.test", laptop.id, status="disabled")
    _route(store, "soon.test", laptop.id, status="pending_dns")  # proven: owned already
    owns = OutboundStore(store).sender_account
    assert owns(laptop.id, "a@claimed.test") is None
    assert owns(laptop.id, "a@off.test") is None
    assert owns(laptop.id, "a@soon.test") == laptop.account_id
    store.update_device(laptop.id, auth_status="revoked")
    assert owns(laptop.id, "a@soon.test") is None


# -- relayed messages and their events ----------------------------------------------------------


def test_events_of_relayed_mail_by_device_oldest_first(store: Store) -> None:
    laptop = store.create_device("laptop")
    phone = store.create_device("phone")
    outbound = OutboundStore(store)
    outbound.record("AAAA0000000001", laptop.id, laptop.account_id, "a@home.test", AT)
    outbound.record("BBBB0000000002", phone.id, phone.account_id, "b@home.test", AT)
    assert outbound.relayed_by("AAAA0000000001") == laptop.id
    assert outbound.relayed_by("CCCC0000000003") is None
    t = AT.timestamp()
    DeliveryEvents(store).record(
        [("AAAA0000000001", f"r{n}@far.test", "accepted", "", t) for n in range(3)]
        + [("CCCC0000000003", "me@home.test", "accepted", "", t)]
        + [("BBBB0000000002", "x@far.test", "deferred", "451 4.4.1 later", t + 1)]
    )
    mine = outbound.events(device_id=laptop.id)
    assert [e.recipient for e in mine] == ["r0@far.test", "r1@far.test", "r2@far.test"]
    assert [e.id for e in mine] == sorted(e.id for e in mine)
    assert [
        e.recipient for e in outbound.events(device_id=laptop.id, after=mine[0].id, limit=1)
    ] == ["r1@far.test"]
    everyone = outbound.events(device_id=None)
    assert [e.queue_id for e in everyone] == ["AAAA0000000001"] * 3 + ["BBBB0000000002"]
    assert everyone[-1].detail == "451 4.4.1 later"
    assert outbound.events(device_id="dev_nobody") == []
    assert len(outbound.events(device_id=None, limit=10 * MAX_EVENTS)) == 4
