"""The edge's own re-check of routes on their way to active (`edge.domains.routewatch`), on SQLite
and PostgreSQL, with DNS from the local DNS server and time from a `Clock`."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import Logger, LogPublisher, formatEvent

from edge.dns.resolver import DNSResolver
from edge.domains.routecheck import RouteChecker
from edge.domains.routewatch import ACTOR, PassReport, RouteWatch, utc_from
from edge.domains.scan import DomainInspector
from edge.store import Device, EmailRoute, Store
from edge.store.access import AccessStore
from edge.store.records import isoformat
from edge.store.routes import STAGE_OF
from tests.dnsserver import HANG
from tests.test_store_support import Database, database_fixture, store_fixture  # noqa: F401

EDGE = "mx.tailpost.test"
START = 1_775_000_000.0  # 2026-03-31: the Clock's time when a test begins
INTERVAL = 300.0


def run_now(fn: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
    """Runs a pass in the test's thread (not the reactor's, where the DNS server answers)."""
    return defer.maybeDeferred(fn, *args)


@dataclass
class Site:
    store: Store
    dns: Any
    clock: Clock
    device: Device
    resolver: DNSResolver
    lines: list[str] = field(default_factory=list)

    def watch(self, store: Store | None = None, **kw: Any) -> RouteWatch:
        store = store or self.store
        now = utc_from(self.clock)
        access = AccessStore(store, now)
        checker = RouteChecker(
            store,
            access,
            DomainInspector(self.resolver, helo_name=EDGE),
            edge_mx_target=EDGE,
            now=now,
        )
        publisher = LogPublisher(lambda event: self.lines.append(formatEvent(event)))  # type: ignore[arg-type]
        kw.setdefault("interval", INTERVAL)
        kw.setdefault("run_blocking", run_now)
        return RouteWatch(checker, access, self.clock, log=Logger(observer=publisher), **kw)

    def route(
        self,
        domain: str,
        *,
        status: str = "ready",
        verified: bool = True,
        prepared: bool = True,
        checked_ago: float = 3600.0,
        mode: str = "device",
    ) -> EmailRoute:
        """A route for `domain` (verified or a claim), prepared, last checked `checked_ago`
        seconds before now, with a DKIM key."""
        now = utc_from(self.clock)()
        route = self.store.create_route(
            domain,
            type="byod",
            connector_id=self.device.id,
            delivery_mode=mode,
            status=status,
            setup_stage=STAGE_OF.get(status, "ready_for_dns"),
            edge_mx_target=EDGE,
            verified_at=now - timedelta(days=1) if verified else None,
            claim_expires_at=None if verified else now + timedelta(days=1),
            now=now,
        )
        then = AccessStore(self.store, lambda: now - timedelta(seconds=checked_ago))
        then.mark_route(route.id, prepared=prepared)
        then.add_dkim_key(domain, "tp1r", "rsa", "private", f"PUB{domain}")
        return route

    def publish(self, route: EmailRoute, *, mx: bool = True) -> None:
        """Every record the domain needs; the MX to the edge only with `mx`."""
        zone, domain = self.dns.zone, route.domain
        zone.set(domain, "MX", [(10, EDGE)] if mx else [(10, "mx.oldmail.test")])
        zone.set(domain, "TXT", [f"v=spf1 a:{EDGE} ~all"])
        zone.set(f"tp1r._domainkey.{domain}", "TXT", [f"v=DKIM1; k=rsa; p=PUB{domain}"])
        zone.set(f"_dmarc.{domain}", "TXT", ["v=DMARC1; p=none"])
        zone.set(route.ownership_txt_host, "TXT", [route.ownership_txt_value])

    def now(self) -> datetime:
        return utc_from(self.clock)()

    def moves(self, domain: str) -> list[str]:
        return [e.detail for e in self.store.audit_events(domain) if e.action == "route_status"]


@pytest.fixture
def site(store: Store, dns_server: Any) -> Iterator[Site]:
    dns_server.zone.ttl = 0  # nothing cached: each pass sees the zone as it is
    clock = Clock()
    clock.advance(START)
    device = store.create_device("laptop", connector_smtp_addr="127.0.0.1:2525")
    resolver = DNSResolver(["127.0.0.1"], dns_server.port, timeout=0.5)
    yield Site(store, dns_server, clock, device, resolver)


def fired(d: defer.Deferred[PassReport]) -> PassReport:
    """The report of a pass that ran at once (`run_now`)."""
    got: list[PassReport] = []
    d.addCallback(got.append)
    assert len(got) == 1
    return got[0]


def status(site: Site, route: EmailRoute) -> tuple[str, str]:
    found = site.store.get_route(route.id)
    assert found is not None
    return found.status, found.setup_stage


def test_a_ready_route_becomes_active_by_the_watch_alone(site: Site) -> None:
    route = site.route("watch.test")
    site.publish(route, mx=False)  # all but the MX: the owner has not switched it yet
    watch = site.watch()
    watch.startService()  # a pass at start
    assert status(site, route) == ("ready", "awaiting_mx")
    checked = site.store.get_route(route.id)
    assert checked is not None and checked.last_checked_at == site.now()
    assert site.store.awaiting_route("anyone@watch.test") is True

    site.dns.zone.set("watch.test", "MX", [(10, EDGE)])  # the owner switches the MX, and waits
    site.clock.advance(INTERVAL - 1)
    assert status(site, route) == ("ready", "awaiting_mx")
    site.clock.advance(1)
    assert status(site, route) == ("active", "active")
    assert site.moves("watch.test") == [
        f"route {route.id}: ready -> active (DNS records seen by the edge)"
    ]
    [event] = [e for e in site.store.audit_events("watch.test") if e.action == "route_status"]
    assert event.actor == ACTOR
    target = site.store.resolve_recipient("anyone@watch.test")
    assert target is not None and target.device_id == site.device.id
    assert site.store.awaiting_route("anyone@watch.test") is False
    assert "the route of watch.test is active now" in site.lines

    site.clock.advance(INTERVAL)  # an active route is not looked at again
    queries = len(site.dns.zone.queries)
    site.clock.advance(INTERVAL)
    assert len(site.dns.zone.queries) == queries
    watch.stopService()
    assert site.clock.getDelayedCalls() == []


def test_pending_dns_moves_step_by_step_as_records_appear(site: Site) -> None:
    route = site.route("steps.test", status="pending_dns")
    site.dns.zone.set(route.ownership_txt_host, "TXT", [route.ownership_txt_value])
    watch = site.watch()
    watch.startService()
    assert status(site, route) == ("pending_dns", "ready_for_dns")
    site.publish(route, mx=False)
    site.clock.advance(INTERVAL)
    assert status(site, route) == ("ready", "awaiting_mx")
    site.publish(route)
    site.clock.advance(INTERVAL)
    assert status(site, route) == ("active", "active")
    assert [d.split(": ")[1] for d in site.moves("steps.test")] == [
        "ready -> active (DNS records seen by the edge)",
        "pending_dns -> ready (DNS records seen by the edge)",
    ]
    watch.stopService()


def test_a_dns_failure_leaves_the_route_and_the_next_pass_moves_it(site: Site) -> None:
    broken = site.route("broken.test")
    site.publish(broken)
    site.dns.zone.set("broken.test", "MX", [HANG])  # its nameserver never answers the MX
    fine = site.route("fine.test", checked_ago=60.0 * 60 * 2)  # checked before broken.test
    site.publish(fine)
    before = site.store.get_route(broken.id)
    watch = site.watch()
    report = fired(watch.run_once())
    assert [f[1] for f in report.failed] == ["broken.test"]
    # One route's failure stops no other; the failed one is left exactly as it was.
    assert status(site, fine) == ("active", "active")
    assert site.store.get_route(broken.id) == before
    assert site.moves("broken.test") == []
    failures = [line for line in site.lines if "broken.test" in line]
    assert len(failures) == 1 and "stays as it is" in failures[0]

    watch.startService()  # fails again: counted, not logged again
    assert site.store.get_route(broken.id) == before
    assert len([line for line in site.lines if "broken.test" in line]) == 1

    site.dns.zone.set("broken.test", "MX", [(10, EDGE)])  # the nameserver answers again
    site.clock.advance(INTERVAL)
    assert status(site, broken) == ("active", "active")
    watch.stopService()


def test_claims_disabled_and_unprepared_routes_are_never_touched(site: Site) -> None:
    claim = site.route("claimed.test", status="pending_dns", verified=False)
    disabled = site.route("disabled.test", status="disabled")
    unprepared = site.route("unprepared.test", prepared=False)
    for route in (claim, disabled, unprepared):
        site.publish(route)  # every record, the claim's ownership TXT too
    before = {r.id: site.store.get_route(r.id) for r in (claim, disabled, unprepared)}
    watch = site.watch()
    watch.startService()
    site.clock.advance(INTERVAL * 3)
    watch.stopService()
    assert {r.id: site.store.get_route(r.id) for r in (claim, disabled, unprepared)} == before
    assert site.dns.zone.queries == []  # not even looked up
    assert site.store.audit_events() == []
    assert site.store.awaiting_route("x@claimed.test") is False
    assert site.store.awaiting_route("x@disabled.test") is False


def test_a_pass_is_bounded_oldest_check_first_and_failures_go_last(site: Site) -> None:
    ages = {"a.test": 4000.0, "b.test": 3000.0, "c.test": 2000.0}
    routes = {d: site.route(d, checked_ago=age) for d, age in ages.items()}
    for route in routes.values():
        site.publish(route, mx=False)  # they stay ready, and are checked each pass
    site.dns.zone.set("a.test", "MX", [HANG])
    watch = site.watch(batch=2)
    first = fired(watch.run_once())
    assert [f[1] for f in first.failed] == ["a.test"]
    assert first.checked == [routes["b.test"].id]
    site.clock.advance(INTERVAL)
    # a.test has still the oldest check, but failed last time: the others go first.
    second = fired(watch.run_once())
    assert second.checked == [routes["c.test"].id, routes["b.test"].id]
    assert second.failed == []


def test_recently_checked_routes_wait(site: Site) -> None:
    route = site.route("recent.test", checked_ago=INTERVAL / 4)  # e.g. an API call just now
    site.publish(route)
    watch = site.watch()
    assert fired(watch.run_once()).checked == []
    site.clock.advance(INTERVAL / 4 + 1)  # its check is more than half an interval old now
    assert fired(watch.run_once()).checked == [route.id]
    assert status(site, route) == ("active", "active")


def test_two_edges_on_one_database_move_a_route_once(site: Site, database: Database) -> None:
    other = database.open()  # a second edge on the same database
    try:
        a, b = site.watch(), site.watch(other)
        # Both read the route in `ready` before either moved it.
        route = site.route("race.test")
        site.publish(route)
        stale = site.store.get_route(route.id)
        assert stale is not None
        first = a.checker.check(stale, ACTOR)
        second = b.checker.check(stale, ACTOR)
        assert (first.moved, second.moved) == (True, False)
        assert first.route.status == second.route.status == "active"
        assert len(site.moves("race.test")) == 1

        # A stale `pending_dns` read never moves back a route another edge made active.
        back = site.route("back.test", status="pending_dns")
        site.publish(back, mx=False)
        old = site.store.get_route(back.id)
        assert old is not None
        site.publish(back)
        assert b.checker.check(old, ACTOR).route.status == "active"
        site.dns.zone.set("back.test", "MX", [(10, "mx.oldmail.test")])  # DNS still catching up
        assert a.checker.check(old, ACTOR).route.status == "active"

        # Nor a route the operator disabled after it was listed.
        off = site.route("off.test")
        site.publish(off)
        listed = site.store.get_route(off.id)
        assert listed is not None
        site.store.update_route(off.id, status="disabled")
        assert a.checker.check(listed, ACTOR).route.status == "disabled"
        assert site.moves("off.test") == []
    finally:
        other.close()


def test_two_edges_passing_at_once_move_each_route_once(site: Site, database: Database) -> None:
    other = database.open()
    try:
        routes = [site.route(f"r{n}.test") for n in range(4)]
        for route in routes:
            site.publish(route)
        watches = [site.watch(), site.watch(other)]
        start = threading.Barrier(2)
        reports: list[PassReport] = []

        def run(watch: RouteWatch) -> None:
            start.wait()
            reports.append(watch.check_due())

        threads = [threading.Thread(target=run, args=(w,)) for w in watches]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(reports) == 2
        for route in routes:
            assert status(site, route) == ("active", "active")
            assert len(site.moves(route.domain)) == 1
        moved = sorted(d for r in reports for d, _s in r.moved)
        assert moved == sorted(r.domain for r in routes)
    finally:
        other.close()


def test_a_broken_pass_is_logged_and_the_next_one_runs(site: Site) -> None:
    route = site.route("later.test")
    site.publish(route)
    watch = site.watch()
    calls: list[int] = []

    def failing_once(fn: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
        calls.append(1)
        if len(calls) == 1:
            return defer.fail(ConnectionError("database unreachable"))
        return defer.maybeDeferred(fn, *args)

    watch.run_blocking = failing_once
    watch.startService()
    assert status(site, route) == ("ready", "awaiting_mx")
    assert any("database unreachable" in line for line in site.lines)
    site.clock.advance(INTERVAL)
    assert status(site, route) == ("active", "active")
    watch.stopService()


def test_passes_run_through_run_blocking_off_the_calling_thread(site: Site) -> None:
    route = site.route("thread.test")
    site.publish(route)
    seen: list[str] = []

    def in_a_thread(fn: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
        result: list[Any] = []

        def work() -> None:
            seen.append(threading.current_thread().name)
            result.append(fn(*args))

        worker = threading.Thread(target=work, name="worker")
        worker.start()
        worker.join()
        return defer.succeed(result[0])

    watch = site.watch(run_blocking=in_a_thread)
    watch.startService()
    watch.stopService()
    assert seen == ["worker"]
    assert status(site, route) == ("active", "active")


def test_route_output_shows_when_it_was_last_checked(site: Site) -> None:
    route = site.route("shown.test", checked_ago=0.0)
    found = site.store.get_route(route.id)
    assert found is not None and found.last_checked_at == site.now()
    assert found.to_dict()["last_checked_at"] == isoformat(site.now())
    [listed] = [r for r in site.store.list_routes() if r.id == route.id]
    assert listed.last_checked_at == site.now()
    fresh = site.store.create_route(
        "never.test", type="byod", connector_id=site.device.id, status="ready"
    )
    assert fresh.last_checked_at is None and fresh.to_dict()["last_checked_at"] is None
