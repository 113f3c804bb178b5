"""A domain on its way to active: a temporary refusal at RCPT, never a permanent one, and mail
taken once the edge's own re-check has seen its DNS records.

The rule (`edge.store.resolve.awaiting_route`) on SQLite and PostgreSQL; the MX over the
edge's own assembly (`edge.app.build_edge`) with the re-check driven by a `Clock`; and end to
end with the real processes, where nothing but the edge's periodic re-check moves the route.
"""

from __future__ import annotations

import smtplib
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock

from edge.app import Edge, build_edge
from edge.config import ConfigError, load_config
from edge.delivery.routing import Postmaster, RecipientResolver
from edge.dns.resolver import DNSResolver
from edge.domains.routecheck import RouteChecker
from edge.domains.routewatch import RouteWatch, utc_from
from edge.domains.scan import DomainInspector
from edge.store import EmailRoute, Store, open_store
from edge.store.access import AccessStore
from edge.store.cache import CachedLookups
from edge.store.keyring import load_or_create_keys
from tests.processes import edge_and_device, host_port, maildir_new, wait_for
from tests.test_store_support import database_fixture, store_fixture  # noqa: F401

PROVEN = datetime(2026, 4, 3, tzinfo=UTC)
EDGE = "mx.tailpost.test"


# -- the rule ---------------------------------------------------------------------------------


def test_awaiting_route_only_for_verified_routes_on_their_way(store: Store) -> None:
    laptop = store.create_device("laptop", connector_smtp_addr="127.0.0.1:2525")
    revoked = store.create_device("old", connector_smtp_addr="127.0.0.1:2526")
    store.update_device(revoked.id, auth_status="revoked")

    def route(domain: str, status: str, **kw: Any) -> EmailRoute:
        kw.setdefault("verified_at", PROVEN)
        return store.create_route(domain, type="byod", connector_id=laptop.id, status=status, **kw)

    route("device.test", "ready", delivery_mode="device")
    route("pending.test", "pending_dns", delivery_mode="device")
    route("split.test", "ready", delivery_mode="split")  # no old MX hosts: only its addresses
    store.add_byod_address("alice", "split.test", laptop.id)
    store.add_byod_address("gone", "split.test", revoked.id)
    route("active.test", "active", delivery_mode="device")
    route("off.test", "disabled", delivery_mode="device")
    route(
        "claim.test",
        "pending_dns",
        delivery_mode="device",
        verified_at=None,
        claim_expires_at=PROVEN + timedelta(days=1),
    )
    store.add_byod_address("bob", "claim.test", laptop.id)

    awaiting = {
        "anyone@device.test": True,
        "Anyone@PENDING.test": True,
        "alice@split.test": True,
        "postmaster@split.test": True,  # a role address goes to the owner's device
        "nobody@split.test": False,  # nobody would take it once active either
        "gone@split.test": False,  # its device is revoked
        "anyone@active.test": False,  # taken now
        "anyone@off.test": False,
        "bob@claim.test": False,  # a claim never
        "x@claim.test": False,
        "x@unknown.test": False,
        "not an address": False,
        "": False,
    }
    assert {a: store.awaiting_route(a) for a in awaiting} == awaiting
    # It never makes anyone take mail.
    for address in awaiting:
        if address != "anyone@active.test":
            assert store.resolve_recipient(address) is None, address


def test_the_cache_answers_and_forgets_on_a_move(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'store.db'}")
    try:
        laptop = store.create_device("laptop", connector_smtp_addr="127.0.0.1:2525")
        route = store.create_route(
            "c.test",
            type="byod",
            connector_id=laptop.id,
            delivery_mode="device",
            status="ready",
            verified_at=PROVEN,
        )
        lookups = CachedLookups(store, ttl=3600.0)
        rule = RecipientResolver(
            lookups.resolve_recipient, lookups.routed_domain, Postmaster(), lookups.awaiting_route
        )
        assert rule("x@c.test") is None and rule.awaiting("x@c.test") is True
        assert lookups.peek(rule.awaiting, "x@c.test") is True  # cached: no store query
        assert rule.awaiting("postmaster") is False  # the bare postmaster has no domain
        store.advance_route(route.id, "active", actor="edge", now=PROVEN)
        assert rule("x@c.test") is not None and rule.awaiting("x@c.test") is False
    finally:
        store.close()


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("route_recheck_interval = 5", "route_recheck_interval"),
        ("route_recheck_interval = nan", "route_recheck_interval"),
        ("route_recheck_interval = 1e9", "route_recheck_interval"),
        ('route_recheck_interval = "300"', "must be float"),
        ("route_recheck_batch = 0", "route_recheck_batch"),
        ("route_recheck_batch = 1.5", "must be int"),
    ],
)
def test_bad_recheck_settings_are_refused(tmp_path: Path, toml: str, message: str) -> None:
    path = tmp_path / "edge.toml"
    path.write_text(f"[edge]\n{toml}\n")
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_recheck_settings_default_and_load(tmp_path: Path) -> None:
    defaults = load_config(None)
    assert (defaults.edge.route_recheck_interval, defaults.edge.route_recheck_batch) == (300.0, 50)
    path = tmp_path / "edge.toml"
    path.write_text("[edge]\nroute_recheck_interval = 60\nroute_recheck_batch = 5\n")
    config = load_config(path)
    assert (config.edge.route_recheck_interval, config.edge.route_recheck_batch) == (60.0, 5)


# -- the MX of the edge's own assembly, the re-check on a Clock --------------------------------


def publish(dns: Any, route: EmailRoute, domain: str, *, mx: bool) -> None:
    zone = dns.zone
    zone.set(domain, "MX", [(10, EDGE)] if mx else [(10, "mx.oldmail.test")])
    zone.set(domain, "TXT", [f"v=spf1 a:{EDGE} ~all"])
    zone.set(f"tp1r._domainkey.{domain}", "TXT", ["v=DKIM1; k=rsa; p=PUBKEY"])
    zone.set(f"_dmarc.{domain}", "TXT", ["v=DMARC1; p=none"])
    zone.set(route.ownership_txt_host, "TXT", [route.ownership_txt_value])


def on_its_way(store: Store, domain: str, device_id: str, mode: str = "device") -> EmailRoute:
    """A verified, prepared route in `ready`, as after prepare and verify-ownership."""
    route = store.create_route(
        domain,
        type="byod",
        connector_id=device_id,
        delivery_mode=mode,
        status="ready",
        setup_stage="awaiting_mx",
        edge_mx_target=EDGE,
        verified_at=PROVEN,
    )
    earlier = AccessStore(store, lambda: datetime.now(UTC) - timedelta(hours=1))
    earlier.mark_route(route.id, prepared=True)
    earlier.add_dkim_key(domain, "tp1r", "rsa", "private", "PUBKEY")
    return route


@pytest.fixture
def edge(in_reactor: Any, dns_server: Any, tmp_path: Path) -> Iterator[Edge]:
    dns_server.zone.ttl = 0
    path = tmp_path / "edge.toml"
    path.write_text(
        f'hostname = "{EDGE}"\n[edge]\nmx_listen = "127.0.0.1:0"\n'
        f'[dns]\nnameservers = ["127.0.0.1"]\nport = {dns_server.port}\ntimeout = 1.0\n'
    )
    config = load_config(path, data_dir=str(tmp_path / "data"))
    built = in_reactor(build_edge, config, in_reactor.reactor)
    in_reactor(built.mx.startService)
    yield built
    in_reactor(built.mx.stopService)


def rcpt(port: int, address: str) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.ehlo("client.sender.test")
        assert client.mail("carol@sender.test")[0] == 250
        return client.rcpt(address)


def test_rcpt_is_deferred_until_the_recheck_makes_the_route_active(
    edge: Edge, dns_server: Any
) -> None:
    store = edge.store
    laptop = store.create_device("laptop", connector_smtp_addr="127.0.0.1:2525")
    route = on_its_way(store, "soon.test", laptop.id)
    publish(dns_server, route, "soon.test", mx=False)
    store.create_route(
        "claimed.test",
        type="byod",
        connector_id=laptop.id,
        status="pending_dns",
        claim_expires_at=datetime.now(UTC) + timedelta(days=1),
    )
    port = edge.mx.port

    code, text = rcpt(port, "alice@soon.test")
    assert (code, text[:5]) == (450, b"4.4.4"), text
    assert rcpt(port, "alice@claimed.test")[:1] == (550,)  # a claim: refused for good
    assert rcpt(port, "alice@unknown.test")[:1] == (550,)

    clock = Clock()
    clock.advance(datetime.now(UTC).timestamp())
    now = utc_from(clock)
    access = AccessStore(store, now)
    resolver = DNSResolver(["127.0.0.1"], dns_server.port, timeout=1.0)
    checker = RouteChecker(
        store, access, DomainInspector(resolver, helo_name=EDGE), edge_mx_target=EDGE, now=now
    )
    watch = RouteWatch(
        checker, access, clock, run_blocking=lambda fn, *a: defer.maybeDeferred(fn, *a)
    )
    watch.startService()  # the pass at start: the MX does not point at the edge yet
    assert rcpt(port, "alice@soon.test")[0] == 450

    dns_server.zone.set("soon.test", "MX", [(10, EDGE)])
    clock.advance(watch.interval)
    assert rcpt(port, "alice@soon.test")[0] == 250
    assert rcpt(port, "alice@claimed.test")[0] == 550
    watch.stopService()


# -- end to end: the real edge, nobody calls the API -------------------------------------------


def send(mx: str, rcpt_to: str, data: bytes) -> tuple[int, bytes]:
    host, port = host_port(mx)
    with smtplib.SMTP(host, port, timeout=20) as client:
        client.ehlo("client.sender.test")
        assert client.mail("carol@sender.test")[0] == 250
        code, text = client.rcpt(rcpt_to)
        if code != 250:
            return code, text
        return client.data(data)


def test_a_domain_switched_to_the_edge_gets_its_mail_without_an_api_call(
    tmp_path: Path, dns_server: Any
) -> None:
    dns_server.zone.ttl = 0
    edge, device = edge_and_device(tmp_path, address="alice@home.test")
    text = edge.config_path.read_text().split("\n[dns]")[0]
    edge.config_path.write_text(
        text.replace("[edge]\n", "[edge]\nroute_recheck_interval = 10\n")
        + f'\n[dns]\nnameservers = ["127.0.0.1"]\nport = {dns_server.port}\ntimeout = 1.0\n'
    )
    keys, _ = load_or_create_keys(tmp_path / "edge" / "edge" / "store.key")
    store = open_store(f"sqlite:///{tmp_path / 'edge' / 'edge' / 'store.db'}", keys=keys)
    try:
        route = on_its_way(store, "byod.test", "dev_home", mode="split")
        store.add_byod_address("carol", "byod.test", "dev_home")
    finally:
        store.close()
    publish(dns_server, route, "byod.test", mx=False)
    device.start()
    try:
        mx = edge.start()["mx"]
        try:
            message = b"Subject: first mail\r\nFrom: carol@sender.test\r\n\r\nhello\r\n"
            code, reply = send(mx, "carol@byod.test", message)
            assert (code, reply[:5]) == (450, b"4.4.4"), reply
            assert send(mx, "nobody@byod.test", message)[0] == 550  # no old MX: nobody takes it

            dns_server.zone.set("byod.test", "MX", [(10, EDGE)])  # and nobody calls the API
            wait_for(lambda: send(mx, "carol@byod.test", message)[0] == 250, timeout=60)

            def stored() -> list[bytes]:
                new = maildir_new(device)
                return [p.read_bytes() for p in new.iterdir()] if new.exists() else []

            wait_for(lambda: any(b"Subject: first mail" in m for m in stored()), timeout=30)
        finally:
            edge.stop()
    finally:
        device.stop()
    store = open_store(f"sqlite:///{tmp_path / 'edge' / 'edge' / 'store.db'}", keys=keys)
    try:
        moved = [e for e in store.audit_events("byod.test") if e.action == "route_status"]
        assert [(e.actor, e.detail.split(": ")[1]) for e in moved] == [
            ("edge", "ready -> active (DNS records seen by the edge)")
        ]
    finally:
        store.close()
