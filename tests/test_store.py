"""Store CRUD on SQLite and PostgreSQL: devices, managed and BYOD addresses, routes, rules."""

from __future__ import annotations

import re
from dataclasses import FrozenInstanceError
from datetime import UTC, datetime, timedelta, timezone

import pytest

from edge.store import Conflict, NotFound, Store
from tests.test_store_support import database_fixture, store_fixture  # noqa: F401

ISO_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
OLD_MX = [
    {"host": "mx1.old-provider.com", "port": 25, "tls_mode": "starttls"},
    {"host": "mx2.old-provider.com", "port": 25, "tls_mode": "starttls"},
]


def test_ensure_account_is_idempotent(store: Store) -> None:
    first = store.ensure_account()
    again = store.ensure_account(name="ignored when it exists")
    assert first == again
    assert first.id == "acct_default" and first.name == "default"
    assert ISO_Z.match(first.to_dict()["created_at"])


def test_device_crud(store: Store) -> None:
    device = store.create_device(
        "mac-mini",
        hostname="mac-mini.local",
        connector_smtp_addr="dev-123.tailnet.example.ts.net:2525",
        connector_username="edge",
        connector_secret="s3cret",
    )
    assert re.match(r"^dev_[0-9A-Z]{26}$", device.id)
    assert device.auth_status == "authorized" and device.account_id == "acct_default"
    assert device.created_at.tzinfo is not None
    assert store.get_device(device.id) == device
    assert store.get_device("dev_missing") is None
    body = device.to_dict()
    assert body["connector_smtp_addr"] == "dev-123.tailnet.example.ts.net:2525"
    assert "connector_secret" not in body and "key_hash" not in body
    assert "s3cret" not in repr(device)
    with pytest.raises(FrozenInstanceError):
        device.name = "x"  # type: ignore[misc]

    seen = datetime(2026, 4, 3, 21, 12, 24, tzinfo=timezone(timedelta(hours=2)))
    updated = store.update_device(
        device.id, auth_status="revoked", last_seen_at=seen, key_hash="h", name="mini"
    )
    assert updated.auth_status == "revoked" and updated.name == "mini"
    assert updated.key_hash == "h"
    assert store.get_device(device.id) == updated
    assert updated.last_seen_at == seen
    assert updated.to_dict()["last_seen_at"] == "2026-04-03T19:12:24Z"

    with pytest.raises(NotFound):
        store.update_device("dev_missing", name="x")
    with pytest.raises(ValueError):
        store.update_device(device.id, auth_status="sleeping")
    with pytest.raises(ValueError):
        store.update_device(device.id, id="dev_other")
    with pytest.raises(ValueError):
        store.update_device(device.id, last_seen_at=datetime(2026, 1, 1))
    with pytest.raises(ValueError):
        store.create_device("bad", connector_smtp_addr="no-port")
    with pytest.raises(Conflict):
        store.create_device("dup", device_id=device.id)

    other = store.create_device("other", device_id="dev_123", account_id="acct_other")
    assert other.id == "dev_123"
    assert [d.id for d in store.list_devices()] == [device.id, "dev_123"]
    assert [d.id for d in store.list_devices("acct_other")] == ["dev_123"]


def test_managed_addresses(store: Store) -> None:
    device = store.create_device("laptop", connector_smtp_addr="dev-1.ts.net:2525")
    addr = store.add_managed_address(
        "Alice", device.id, domain="Mail.Example.NET", namespace="home-abc123"
    )
    assert re.match(r"^addr_[0-9A-Z]{26}$", addr.id)
    assert addr.address == "alice.home-abc123@mail.example.net"
    body = addr.to_dict()
    assert {k: body[k] for k in ("name", "address", "domain", "device_id")} == {
        "name": "alice",
        "address": "alice.home-abc123@mail.example.net",
        "domain": "mail.example.net",
        "device_id": device.id,
    }
    assert body["connector_smtp_addr"] == "dev-1.ts.net:2525"
    assert ISO_Z.match(body["created_at"])

    vanity = store.add_managed_address(
        "bob", device.id, domain="mail.example.net", namespace="home-abc123", vanity=True
    )
    assert vanity.address == "bob@mail.example.net" and vanity.vanity
    plain = store.add_managed_address("carol", device.id, domain="mail.example.net", namespace=None)
    assert plain.address == "carol@mail.example.net"

    with pytest.raises(Conflict):
        store.add_managed_address(
            "ALICE", device.id, domain="mail.example.net", namespace="home-abc123"
        )
    with pytest.raises(NotFound):
        store.add_managed_address("dave", "dev_missing", domain="mail.example.net", namespace="x")
    for bad in ("", "a b", "a@b", ".alice", "al..ice"):
        with pytest.raises(ValueError):
            store.add_managed_address(bad, device.id, domain="mail.example.net", namespace="x")
    with pytest.raises(ValueError):
        store.add_managed_address("dave", device.id, domain="not a domain", namespace="x")

    store.update_device(device.id, connector_smtp_addr="dev-1.ts.net:2626")
    listed = store.list_managed_addresses()
    assert [a.id for a in listed] == [addr.id, vanity.id, plain.id]
    assert {a.connector_smtp_addr for a in listed} == {"dev-1.ts.net:2626"}
    assert store.list_managed_addresses("acct_other") == []

    assert store.delete_managed_address(addr.id) is True
    assert store.delete_managed_address(addr.id) is False
    assert [a.id for a in store.list_managed_addresses()] == [vanity.id, plain.id]
    # freed: the address can be taken again
    store.add_managed_address(
        "alice", device.id, domain="mail.example.net", namespace="home-abc123"
    )


def test_routes(store: Store) -> None:
    device = store.create_device("laptop", connector_smtp_addr="dev-1.ts.net:2525")
    route = store.create_route(
        "Example.COM.",
        type="byod",
        connector_id=device.id,
        edge_mx_target="edge.example.net",
        previous_mx=[{"priority": 1, "host": "mx1.old-provider.com"}],
        fallback_hosts=["mx1.old-provider.com", "mx2.old-provider.com"],
        authoritative_hosts=["mx1.old-provider.com", {"host": "MX2.old-provider.com."}],
        mail_from_domain="bounce.example.com",
    )
    assert re.match(r"^route_[0-9A-Z]{26}$", route.id)
    assert route.domain == "example.com"
    assert route.authoritative_hosts == OLD_MX
    assert route.ownership_txt_host == "_tailpost.example.com"
    assert re.match(r"^tailpost-verification=[0-9a-f]{32}$", route.ownership_txt_value)
    body = route.to_dict()
    assert body["type"] == "byod" and body["status"] == "pending_dns"
    assert body["setup_stage"] == "ready_for_dns" and body["delivery_mode"] == "split"
    assert body["connector_id"] == device.id
    assert body["connector_smtp_addr"] == "dev-1.ts.net:2525"  # follows the device
    assert body["previous_mx"] == [{"priority": 1, "host": "mx1.old-provider.com"}]
    assert ISO_Z.match(body["updated_at"])

    assert store.get_route(route.id) == route
    assert store.get_route_by_domain("EXAMPLE.com") == route
    assert store.get_route_by_domain("other.com") is None
    assert store.get_route_by_domain("not a domain") is None
    assert store.get_route("route_missing") is None

    updated = store.update_route(
        route.id, status="active", setup_stage="ready", connector_smtp_addr="dev-1.ts.net:2600"
    )
    assert updated.status == "active" and updated.connector_smtp_addr == "dev-1.ts.net:2600"
    assert updated.updated_at >= route.updated_at
    assert store.list_routes() == [updated]
    assert store.list_routes("acct_other") == []

    with pytest.raises(Conflict):
        store.create_route("example.com", type="byod", connector_id=None)
    with pytest.raises(Conflict):
        store.create_route("other.com", type="byod", connector_id=None, route_id=route.id)
    with pytest.raises(NotFound):
        store.create_route("other.com", type="byod", connector_id="dev_missing")
    with pytest.raises(ValueError):
        store.create_route("other.com", type="mx", connector_id=None)
    with pytest.raises(ValueError):
        store.create_route("other.com", type="byod", connector_id=None, colour="blue")
    with pytest.raises(ValueError):
        store.update_route(route.id, status="sideways")
    with pytest.raises(ValueError):
        store.update_route(route.id, domain="other.com")
    with pytest.raises(ValueError):
        store.update_route(route.id, authoritative_hosts=[{"host": "mx", "port": 0}])
    with pytest.raises(NotFound):
        store.update_route("route_missing", status="active")

    named = store.create_route(
        "sub.example.net",
        type="subdomain",
        connector_id=None,
        route_id="dns_sub_example_net",
        ownership_token="tok",
    )
    assert (
        named.id == "dns_sub_example_net"
        and named.ownership_txt_value == "tailpost-verification=tok"
    )
    assert named.connector_smtp_addr == ""

    assert store.delete_route(route.id) is True
    assert store.delete_route(route.id) is False
    assert [r.id for r in store.list_routes()] == [named.id]


def test_byod_addresses(store: Store) -> None:
    device = store.create_device("laptop", connector_smtp_addr="dev-1.ts.net:2525")
    with pytest.raises(NotFound):
        store.add_byod_address("alice", "example.com", device.id)  # no route yet
    route = store.create_route("example.com", type="byod", connector_id=device.id)
    addr = store.add_byod_address("Alice", "EXAMPLE.com", device.id)
    assert re.match(r"^byod_[0-9A-Z]{26}$", addr.id)
    assert addr.address == "alice@example.com" and addr.route_id == route.id
    assert addr.to_dict() == {
        "id": addr.id,
        "name": "alice",
        "address": "alice@example.com",
        "domain": "example.com",
        "device_id": device.id,
        "connector_smtp_addr": "dev-1.ts.net:2525",
        "created_at": addr.to_dict()["created_at"],
    }
    with pytest.raises(Conflict):
        store.add_byod_address("alice", "example.com", device.id)
    with pytest.raises(NotFound):
        store.add_byod_address("bob", "example.com", "dev_missing")

    # a managed address and a BYOD address can never share an address
    store.create_route("mail.example.net", type="subdomain", connector_id=None)
    store.add_managed_address("carol", device.id, domain="mail.example.net", namespace=None)
    with pytest.raises(Conflict):
        store.add_byod_address("carol", "mail.example.net", device.id)

    bob = store.add_byod_address("bob", "example.com", device.id)
    assert [a.id for a in store.list_byod_addresses()] == [addr.id, bob.id]
    assert store.delete_byod_address(addr.id) is True
    assert store.delete_byod_address(addr.id) is False
    # deleting the route takes its addresses with it
    store.delete_route(route.id)
    assert store.list_byod_addresses() == []


def test_spam_rules(store: Store) -> None:
    rule = store.add_spam_rule(
        "sender", "Spammer@Example.COM", note="first", source_message_ids=["m1"]
    )
    assert re.match(r"^rule_[0-9A-Z]{26}$", rule.id)
    assert rule.value == "spammer@example.com" and rule.action == "reject" and rule.active
    domain_rule = store.add_spam_rule("domain", "@Bad.Example")
    assert domain_rule.value == "bad.example"
    assert [r.id for r in store.list_spam_rules()] == [rule.id, domain_rule.id]

    assert store.delete_spam_rule(rule.id) is True
    assert store.delete_spam_rule(rule.id) is False
    assert store.delete_spam_rule("rule_missing") is False
    assert [r.id for r in store.list_spam_rules()] == [domain_rule.id]
    inactive = [r for r in store.list_spam_rules(active_only=False) if r.id == rule.id]
    assert inactive and not inactive[0].active

    again = store.add_spam_rule(
        "sender",
        "spammer@example.com",
        action="quarantine",
        note="second",
        source_message_ids=["m2", "m1"],
    )
    assert again.id == rule.id and again.active
    assert again.action == "quarantine" and again.note == "second"
    assert again.source_message_ids == ["m1", "m2"]
    assert again.updated_at >= rule.updated_at
    kept = store.add_spam_rule("sender", "spammer@example.com")
    assert kept.note == "second" and kept.action == "reject"
    assert kept.to_dict()["source_message_ids"] == ["m1", "m2"]
    assert len(store.list_spam_rules(active_only=False)) == 2

    other = store.add_spam_rule("sender", "spammer@example.com", account_id="acct_other")
    assert other.id != rule.id
    assert [r.id for r in store.list_spam_rules("acct_other")] == [other.id]

    for kind, value, action in (
        ("ip", "1.2.3.4", "reject"),
        ("sender", "no-at-sign", "reject"),
        ("domain", "not a domain", "reject"),
        ("sender", "a@b.example", "explode"),
    ):
        with pytest.raises(ValueError):
            store.add_spam_rule(kind, value, action=action)


def test_timestamps_are_utc(store: Store) -> None:
    before = datetime.now(UTC) - timedelta(seconds=5)
    device = store.create_device("laptop")
    fetched = store.get_device(device.id)
    assert fetched is not None
    assert fetched.created_at.utcoffset() == timedelta(0)
    assert before <= fetched.created_at <= datetime.now(UTC) + timedelta(seconds=5)
