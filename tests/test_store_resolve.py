"""Recipient resolution (RCPT TO) on SQLite and PostgreSQL, one test per rule."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest

from edge.store import Device, Store
from tests.test_store_support import database_fixture, store_fixture  # noqa: F401

# The ownership proof (or the operator's word) that makes a route its domain's, not a claim.
PROVEN = datetime(2026, 4, 3, tzinfo=UTC)

OLD_MX = [
    {"host": "mx1.old-provider.com", "port": 25, "tls_mode": "starttls"},
    {"host": "mx2.old-provider.com", "port": 2525, "tls_mode": "none"},
]


@dataclass
class World:
    store: Store
    laptop: Device
    nas: Device


@pytest.fixture
def world(store: Store) -> World:
    laptop = store.create_device(
        "laptop",
        connector_smtp_addr="laptop.ts.net:2525",
        connector_username="edge-laptop",
        connector_secret="laptop-secret",
    )
    nas = store.create_device(
        "nas",
        connector_smtp_addr="nas.ts.net:2525",
        connector_username="edge-nas",
        connector_secret="nas-secret",
    )
    return World(store, laptop, nas)


def test_managed_address_goes_to_its_device(world: World) -> None:
    store = world.store
    store.add_managed_address("alice", world.laptop.id, domain="mail.example.net", namespace="home")
    target = store.resolve_recipient("Alice.Home@MAIL.Example.net")
    assert target is not None
    assert target.kind == "device"
    assert target.address == "alice.home@mail.example.net"
    assert target.device_id == world.laptop.id
    assert target.connector_smtp_addr == "laptop.ts.net:2525"
    assert target.connector_username == "edge-laptop"
    assert target.connector_secret == "laptop-secret"
    assert target.route_id is None and target.upstream_hosts == []
    assert "laptop-secret" not in repr(target)
    # no plus-address stripping, no guessing other names
    assert store.resolve_recipient("alice.home+tag@mail.example.net") is None
    assert store.resolve_recipient("alice@mail.example.net") is None


def test_byod_address_beats_split_upstream(world: World) -> None:
    store = world.store
    route = store.create_route(
        "example.com",
        type="byod",
        connector_id=world.laptop.id,
        status="active",
        authoritative_hosts=OLD_MX,
        verified_at=PROVEN,
    )
    store.add_byod_address("alice", "example.com", world.nas.id)
    target = store.resolve_recipient("alice@Example.COM")
    assert target is not None and target.kind == "device"
    assert target.device_id == world.nas.id and target.route_id == route.id
    assert target.connector_smtp_addr == "nas.ts.net:2525"
    assert target.connector_secret == "nas-secret"


def test_split_route_sends_other_addresses_upstream(world: World) -> None:
    store = world.store
    route = store.create_route(
        "example.com",
        type="byod",
        connector_id=world.laptop.id,
        authoritative_hosts=OLD_MX,
        status="active",
        verified_at=PROVEN,
    )
    target = store.resolve_recipient("Someone.Else@EXAMPLE.com")
    assert target is not None
    assert target.kind == "upstream"
    assert target.address == "someone.else@example.com"
    assert target.route_id == route.id and target.device_id is None
    assert target.upstream_hosts == OLD_MX  # priority order kept
    assert target.connector_secret is None


def test_split_route_without_hosts_takes_nothing(world: World) -> None:
    world.store.create_route(
        "example.com",
        type="byod",
        connector_id=world.laptop.id,
        status="active",
        verified_at=PROVEN,
    )
    assert world.store.resolve_recipient("anyone@example.com") is None


def test_device_route_takes_every_address(world: World) -> None:
    store = world.store
    route = store.create_route(
        "home.example",
        type="subdomain",
        connector_id=world.nas.id,
        delivery_mode="device",
        status="active",
        verified_at=PROVEN,
    )
    target = store.resolve_recipient("whoever@home.example")
    assert target is not None and target.kind == "device"
    assert target.device_id == world.nas.id and target.route_id == route.id
    assert target.connector_smtp_addr == "nas.ts.net:2525"
    store.update_route(route.id, connector_smtp_addr="nas-alt.ts.net:2600")
    moved = store.resolve_recipient("whoever@home.example")
    assert moved is not None and moved.connector_smtp_addr == "nas-alt.ts.net:2600"


@pytest.mark.parametrize("status", ["pending_dns", "ready", "disabled"])
def test_device_route_not_live_takes_nothing(world: World, status: str) -> None:
    world.store.create_route(
        "home.example",
        type="subdomain",
        connector_id=world.nas.id,
        delivery_mode="device",
        status=status,
        verified_at=PROVEN,
    )
    assert world.store.resolve_recipient("whoever@home.example") is None


@pytest.mark.parametrize("mode", ["device", "split"])
def test_a_claim_never_takes_mail_even_when_marked_active(world: World, mode: str) -> None:
    """A route nobody proved the domain for is a claim: no mail, whatever its status says."""
    store = world.store
    route = store.create_route(
        "victim.test",
        type="byod",
        connector_id=world.nas.id,
        delivery_mode=mode,
        status="active",
        authoritative_hosts=OLD_MX,
        claim_expires_at=PROVEN + timedelta(days=1),
    )
    assert not route.verified
    assert store.resolve_recipient("ceo@victim.test") is None


def test_disabled_route_refuses_everything(world: World) -> None:
    store = world.store
    route = store.create_route(
        "example.com",
        type="byod",
        connector_id=world.laptop.id,
        authoritative_hosts=OLD_MX,
        status="active",
        verified_at=PROVEN,
    )
    store.add_byod_address("alice", "example.com", world.laptop.id)
    store.update_route(route.id, status="disabled")
    assert store.resolve_recipient("alice@example.com") is None
    assert store.resolve_recipient("bob@example.com") is None


@pytest.mark.parametrize("auth_status", ["revoked", "pending"])
def test_unauthorized_device_never_receives(world: World, auth_status: str) -> None:
    store = world.store
    store.add_managed_address("alice", world.laptop.id, domain="mail.example.net", namespace=None)
    store.create_route(
        "example.com",
        type="byod",
        connector_id=world.laptop.id,
        authoritative_hosts=OLD_MX,
        status="active",
        verified_at=PROVEN,
    )
    store.add_byod_address("bob", "example.com", world.laptop.id)
    store.create_route(
        "home.example",
        type="subdomain",
        connector_id=world.laptop.id,
        delivery_mode="device",
        status="active",
        verified_at=PROVEN,
    )
    for address in ("alice@mail.example.net", "bob@example.com", "x@home.example"):
        assert store.resolve_recipient(address) is not None
    store.update_device(world.laptop.id, auth_status=auth_status)
    for address in ("alice@mail.example.net", "bob@example.com", "x@home.example"):
        assert store.resolve_recipient(address) is None, address
    # other addresses on the split domain still pass upstream
    upstream = store.resolve_recipient("carol@example.com")
    assert upstream is not None and upstream.kind == "upstream"
    store.update_device(world.laptop.id, auth_status="authorized")
    assert store.resolve_recipient("alice@mail.example.net") is not None


def test_unknown_domain(world: World) -> None:
    world.store.add_managed_address(
        "alice", world.laptop.id, domain="mail.example.net", namespace=None
    )
    assert world.store.resolve_recipient("alice@unknown.example") is None
    assert world.store.resolve_recipient("alice@example.net") is None


@pytest.mark.parametrize(
    "address",
    [
        "",
        "   ",
        "alice",
        "@mail.example.net",
        "alice@",
        "@",
        "alice@@mail.example.net",
        "a@b@mail.example.net",
        "alice @mail.example.net",
        "alice@mail..example.net",
        "alice@.mail.example.net",
        "\x00@\x00",
        "x" * 5000 + "@mail.example.net",
        "alice@" + "x" * 5000,
        None,
        42,
        b"alice@mail.example.net",
    ],
)
def test_malformed_addresses_resolve_to_none(world: World, address: object) -> None:
    world.store.add_managed_address(
        "alice", world.laptop.id, domain="mail.example.net", namespace=None
    )
    assert world.store.resolve_recipient(address) is None  # type: ignore[arg-type]


def test_trailing_dot_and_brackets_are_tolerated(world: World) -> None:
    world.store.add_managed_address(
        "alice", world.laptop.id, domain="mail.example.net", namespace=None
    )
    for address in (
        "alice@mail.example.net.",
        "<ALICE@mail.example.net>",
        " alice@mail.example.net ",
    ):
        target = world.store.resolve_recipient(address)
        assert target is not None and target.address == "alice@mail.example.net", address
