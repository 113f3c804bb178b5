"""The shared edge's `/v1` tried as a hostile device and as a stranger: another domain's mail,
domain squatting, connector addresses aimed at the edge or its network, registration floods.
"""

from __future__ import annotations

from typing import Any

import pytest

from edge.store import Store
from tests.test_control_support import (  # noqa: F401
    ADMIN,
    Client,
    FakeNow,
    client_fixture,
    make_client_fixture,
    now_fixture,
    store_fixture,
)
from tests.test_store_support import Database, database_fixture  # noqa: F401

VICTIM = "victim.test"


def claim(client: Client, key: str, domain: str = VICTIM, **extra: Any) -> dict[str, Any]:
    body = {"domain": domain, "type": "byod", "delivery_mode": "device", **extra}
    r = client.post("/v1/email-routes", body, key=key)
    assert r.code == 201, r.body
    return r.json()  # type: ignore[no-any-return]


def prove(client: Client, dns: Any, key: str, domain: str = VICTIM) -> dict[str, Any]:
    """Publish the caller's ownership TXT record and have the edge check it."""
    scan = client.post("/v1/dns/scan", {"domain": domain}, key=key).json()
    record = scan["ownership_dns_record"]
    dns.zone.set(record["host"], "TXT", [record["value"]])
    client.api.ops.inspector.resolver.clear_cache()
    return client.post(  # type: ignore[no-any-return]
        "/v1/custom-domains/verify-ownership", {"domain": domain}, key=key
    ).json()


# -- another domain's mail ---------------------------------------------------------------------


def test_a_device_cannot_activate_a_domain_it_never_proved(client: Client, store: Store) -> None:
    _device, key = client.device("mallory")
    route = claim(client, key, connector_smtp_addr="127.0.0.1:2525")
    assert route["status"] == "pending_dns" and route["ownership_verified"] is False
    r = client.patch(f"/v1/email-routes/{route['id']}", {"status": "active"}, key=key)
    assert r.code == 403
    r.error("route_status_is_set_by_the_edge")
    assert store.get_route(route["id"]).status == "pending_dns"  # type: ignore[union-attr]
    assert store.resolve_recipient(f"ceo@{VICTIM}") is None


def test_claims_block_nobody_and_the_first_proof_wins(
    client: Client, store: Store, dns_server: Any
) -> None:
    _m, mallory = client.device("mallory")
    _o, owner = client.device("owner")
    squat = claim(client, mallory, domain="gmail.test")
    # The squatter's claim does not lock the real owner out.
    mine = claim(client, owner, domain="gmail.test")
    assert mine["id"] != squat["id"]
    verified = prove(client, dns_server, owner, "gmail.test")
    assert verified["status"] == "ok", verified
    # The loser's claim is gone, and it cannot come back while the owner's route stands.
    assert store.get_route(squat["id"]) is None
    assert client.get("/v1/email-routes", key=mallory).json() == {"routes": []}
    again = client.post("/v1/email-routes", {"domain": "gmail.test", "type": "byod"}, key=mallory)
    assert again.code == 409
    again.error("domain_taken")
    events = [(e.action, e.subject) for e in store.audit_events("gmail.test")]
    assert ("domain_verified", "gmail.test") in events and ("claim_dropped", "gmail.test") in events


def test_an_unproven_claim_lapses(make_client: Any, store: Store, now: FakeNow) -> None:
    client = make_client(claim_ttl=3600.0)
    _m, mallory = client.device("mallory")
    squat = claim(client, mallory)
    assert squat["claim_expires_at"] == "2026-04-03T20:12:24Z"
    now.advance(3601)
    _o, owner = client.device("owner")
    claim(client, owner)  # dropping lapsed claims comes with the next claim
    assert store.get_route(squat["id"]) is None


def test_an_account_holds_a_bounded_number_of_claims(make_client: Any) -> None:
    client = make_client(claim_limit=2)
    _m, key = client.device("mallory")
    claim(client, key, domain="a.test")
    claim(client, key, domain="b.test")
    r = client.post("/v1/email-routes", {"domain": "c.test", "type": "byod"}, key=key)
    assert r.code == 409
    r.error("claim_limit_reached")


def test_only_an_active_proven_route_takes_mail(
    client: Client, store: Store, dns_server: Any
) -> None:
    device_id, key = client.device("owner")
    route = claim(client, key)
    assert prove(client, dns_server, key)["status"] == "ok"
    assert store.get_route(route["id"]).verified  # type: ignore[union-attr]
    # Proven, but its records are not all in place: pending_dns takes nothing yet.
    assert store.resolve_recipient(f"ceo@{VICTIM}") is None
    # The operator may move it on by hand; that is on record.
    r = client.patch(f"/v1/email-routes/{route['id']}", {"status": "active"})
    assert r.code == 200 and r.json()["status"] == "active", r.body
    target = store.resolve_recipient(f"ceo@{VICTIM}")
    assert target is not None and target.device_id == device_id
    assert any(e.action == "route_override" for e in store.audit_events(VICTIM))


# -- connector addresses -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "addr",
    [
        "169.254.169.254:25",  # cloud metadata
        "[fe80::1]:25",  # link-local
        "10.0.0.5:25",  # outside the device networks
        "192.0.2.10:2525",
        "127.0.0.1:2025",  # the edge's MX (make_config keeps the default listen addresses)
        "127.0.0.1:8025",  # the edge's control listener
        "[::ffff:169.254.169.254]:25",
        "unknown-host.test:2525",  # not resolvable through the edge's resolver
    ],
)
def test_a_device_cannot_aim_its_connector_anywhere(client: Client, addr: str) -> None:
    _d, key = client.device()
    r = client.post(
        "/v1/email-routes",
        {"domain": "mine.test", "type": "byod", "connector_smtp_addr": addr},
        key=key,
    )
    assert r.code == 403, r.body
    r.error("connector_addr_not_allowed")
    route = claim(client, key, domain="mine.test")
    r = client.patch(f"/v1/email-routes/{route['id']}", {"connector_smtp_addr": addr}, key=key)
    r.error("connector_addr_not_allowed")
    reg = client.post("/v1/devices/register", {"name": "x", "connector_smtp_addr": addr}, key=None)
    reg.error("connector_addr_not_allowed")


@pytest.mark.parametrize("addr", ["100.64.1.2:2525", "[fd7a:115c:a1e0::5]:2525", "127.0.0.1:2525"])
def test_tailnet_and_loopback_connectors_are_fine(client: Client, addr: str) -> None:
    _d, key = client.device()
    route = claim(client, key, domain="mine.test", connector_smtp_addr=addr)
    assert route["connector_smtp_addr"] == addr


def test_the_admin_may_override_the_connector_rule_on_record(client: Client, store: Store) -> None:
    body = {"domain": "ops.test", "type": "byod", "connector_smtp_addr": "10.1.2.3:25"}
    r = client.post("/v1/email-routes", body, key=ADMIN)
    assert r.code == 201, r.body
    events = store.audit_events("ops.test")
    assert [e.action for e in events] == ["connector_addr_override"]
    assert "10.1.2.3:25" in events[0].detail and events[0].actor == "admin"


# -- registration --------------------------------------------------------------------------------


def test_registration_is_limited_and_makes_nothing_until_approved(
    make_client: Any, store: Store, now: FakeNow
) -> None:
    client = make_client(registration_limit_per_source=3, registration_limit_window=600.0)
    made = [client.post("/v1/devices/register", {"name": f"d{i}"}, key=None) for i in range(3)]
    assert [r.code for r in made] == [201, 201, 201]
    assert store.list_devices() == []  # nothing lasting before an operator says so
    refused = client.post("/v1/devices/register", {"name": "d4"}, key=None)
    assert refused.code == 429
    refused.error("too_many_registrations")
    assert refused.headers["retry-after"] == ["600"]
    now.advance(601)
    assert client.post("/v1/devices/register", {"name": "d5"}, key=None).code == 201
    # Approval makes the device (with the id the registration promised) and its account.
    first = made[0].json()
    approved = client.post(f"/v1/devices/{first['device_id']}/approve", {})
    assert approved.code == 200 and approved.json()["id"] == first["device_id"]
    assert [d.id for d in store.list_devices()] == [first["device_id"]]


def test_registration_expires(client: Client, store: Store, now: FakeNow) -> None:
    reg = client.post("/v1/devices/register", {"name": "late"}, key=None).json()
    now.advance(3601)
    r = client.post(f"/v1/devices/{reg['device_id']}/approve", {})
    r.error("registration_closed")
    status = client.post(
        "/v1/devices/register/status",
        {"registration_id": reg["registration_id"], "poll_token": reg["poll_token"]},
        key=None,
    )
    assert status.json()["status"] == "expired"
    assert store.list_devices() == []


def test_the_total_limit_holds_over_sources(database: Database) -> None:
    """The counts live in the store: every edge on one database sees the same limit."""
    from edge.store.access import AccessStore, RateLimited, RegistrationLimits

    store = database.open()
    clock = FakeNow()
    access = AccessStore(store, clock)
    limits = RegistrationLimits(per_source=10, total=3, window=60.0)
    for i in range(3):
        access.register(f"d{i}", "", "", 3600.0, f"100.64.0.{i}", limits)
    with pytest.raises(RateLimited) as refused:
        access.register("d9", "", "", 3600.0, "100.64.0.9", limits)
    assert refused.value.retry_after == 60.0
    other = AccessStore(store, clock)  # a second edge on the same database
    with pytest.raises(RateLimited):
        other.register("d10", "", "", 3600.0, "100.64.0.10", limits)
    store.close()
