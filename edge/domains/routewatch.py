"""The edge's own re-check of domains on their way to active, so no API call is needed.

A verified route moves pending_dns -> ready -> active as the edge sees its DNS records
(`edge.domains.routecheck`). `RouteWatch`, a service of the edge, looks by itself: at start and
every `[edge] route_recheck_interval` seconds it takes at most `[edge] route_recheck_batch`
routes that are verified, prepared (their DKIM keys made) and in pending_dns or ready, those
unchecked for longest first, skipping any checked within the last half interval (by this
edge, another edge on the same database, or an API call), and runs the API's own check and
move on each, as the edge itself (actor `edge` in the audit log). So a domain whose owner
points its MX at the edge starts taking mail within an interval, and until then the MX
answers its recipients with a temporary refusal (`edge.store.resolve.awaiting_route`).

A pass runs in a worker thread (DNS and SQL), never on the reactor thread, and passes never
overlap. A route whose lookup fails stays as it was; the failure is logged through
`edge.runtime.logthrottle` (once per domain and hour, then a count), and the route goes after the
others in the next pass, so domains with broken DNS never crowd out the rest. One route's
failure never stops the others. Several edges sharing a database may all run this: the store
moves a route compare-and-set (`Store.advance_route`), so it moves once and is put on the
audit log once.

This module must never check or change a claim or a disabled route, never run DNS or SQL on
the reactor thread, and never change a route because a lookup failed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer, threads
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from edge.config import Config
from edge.dns.resolver import DNSResolver, DNSTemporaryError
from edge.domains.routecheck import RouteChecker
from edge.domains.scan import DomainInspector
from edge.runtime.logthrottle import Quieter
from edge.store import Conflict, NotFound, Store
from edge.store.access import AccessStore

__all__ = ["ACTOR", "PassReport", "RouteWatch", "build_route_watch"]

ACTOR = "edge"
"""Who the re-check acts as, in the audit log: the edge itself, not an account."""
QUIET_INTERVAL = 3600.0
"""Seconds between log lines about the same domain's failing lookups."""
MAX_REMEMBERED = 10_000
"""Routes whose last check failed that a watch remembers (to check them after the others)."""


@dataclass
class PassReport:
    """What one pass did: the routes it checked, those it moved, those it could not check."""

    checked: list[str] = field(default_factory=list)
    """Ids of the routes whose records were looked up."""
    moved: list[tuple[str, str]] = field(default_factory=list)
    """(domain, new status) of each route this pass moved."""
    failed: list[tuple[str, str, str]] = field(default_factory=list)
    """(route id, domain, reason) of each route whose lookup failed."""
    errors: list[tuple[str, Failure]] = field(default_factory=list)
    """(domain, failure) of each route whose check broke on something other than DNS."""


def utc_from(clock: Any) -> Callable[[], datetime]:
    """The time of `clock` (an IReactorTime) as an aware datetime, for the store."""
    return lambda: datetime.fromtimestamp(clock.seconds(), UTC)


class RouteWatch(Service):
    """Re-checks routes on their way to active; see the module docstring."""

    def __init__(
        self,
        checker: RouteChecker,
        access: AccessStore,
        clock: Any,
        *,
        interval: float = 300.0,
        batch: int = 50,
        run_blocking: Callable[..., defer.Deferred[Any]] = threads.deferToThread,
        log: Logger | None = None,
    ) -> None:
        """`clock` (an IReactorTime) schedules the passes; the store's timestamps come from
        `checker.now`. `run_blocking` runs a pass off the reactor thread."""
        self.setName("route-watch")
        self.checker = checker
        self.access = access
        self.clock = clock
        self.interval = interval
        self.batch = batch
        self.run_blocking = run_blocking
        self.log = log or Logger(namespace="tailpost.routewatch")
        self.quieter = Quieter(self.log, clock, QUIET_INTERVAL)
        self._failed: dict[str, None] = {}  # ids of routes whose last check failed, in order
        self._loop: LoopingCall | None = None
        self._pass: defer.Deferred[PassReport] | None = None
        self._stopping = False

    # -- service ------------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._stopping = False
        loop = LoopingCall(self.run_once)
        loop.clock = self.clock
        self._loop = loop
        loop.start(self.interval, now=True)

    def stopService(self) -> defer.Deferred[None] | None:
        """Stop scheduling; a pass under way ends after its current route."""
        super().stopService()
        self._stopping = True
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        if self._pass is None:
            return None
        done: defer.Deferred[None] = defer.Deferred()

        def fire(report: PassReport) -> PassReport:  # a pass never fails (`run_once`)
            done.callback(None)
            return report

        self._pass.addCallback(fire)
        return done

    # -- one pass -----------------------------------------------------------------------------

    def run_once(self) -> defer.Deferred[PassReport]:
        """One pass in a worker thread; its Deferred never fails (a pass that breaks as a
        whole, e.g. with the database unreachable, is logged and the next one tries again)."""
        if self._pass is not None:
            return self._pass  # passes never overlap
        back = frozenset(self._failed)
        d = self.run_blocking(self.check_due, back)
        d.addCallback(self._report)
        d.addErrback(self._broken)

        def done(report: PassReport) -> PassReport:
            self._pass = None
            return report

        d.addCallback(done)
        if not d.called:
            self._pass = d
        return d

    def check_due(self, back: frozenset[str] = frozenset()) -> PassReport:
        """Blocking: check the routes due now, at most `batch`, those in `back` (their last
        check failed) after the others."""
        since = self.checker.now() - timedelta(seconds=self.interval / 2)
        due = self.access.routes_to_check(self.batch + min(len(back), self.batch), since)
        due.sort(key=lambda route: route.id in back)  # stable: oldest check first otherwise
        report = PassReport()
        for route in due[: self.batch]:
            if self._stopping:
                break
            try:
                checked = self.checker.check(route, ACTOR)
            except DNSTemporaryError as exc:
                report.failed.append((route.id, route.domain, str(exc) or type(exc).__name__))
                continue
            except (Conflict, NotFound):
                continue  # deleted (or, for a route once verified, never) since it was listed
            except Exception:
                report.errors.append((route.domain, Failure()))
                continue
            report.checked.append(route.id)
            if checked.moved:
                report.moved.append((route.domain, checked.route.status))
        return report

    def _report(self, report: PassReport) -> PassReport:
        for route_id in report.checked:
            self._failed.pop(route_id, None)
        for route_id, domain, reason in report.failed:
            self._failed.pop(route_id, None)
            self._failed[route_id] = None
            self.quieter.say(
                f"DNS check of {domain} failed",
                "could not check the DNS records of {domain} ({why}); its route stays as "
                "it is and is checked again in the next pass",
                domain=domain,
                why=reason,
            )
        while len(self._failed) > MAX_REMEMBERED:
            del self._failed[next(iter(self._failed))]
        for domain, failure in report.errors:
            self.log.failure("checking the route of {domain} failed", failure, domain=domain)
        for domain, status in report.moved:
            self.log.info("the route of {domain} is {status} now", domain=domain, status=status)
        return report

    def _broken(self, failure: Failure) -> PassReport:
        self.quieter.say(
            "route re-check failed",
            "the route re-check failed ({error}); the next pass tries again",
            error=failure.getErrorMessage(),
        )
        return PassReport()


def build_route_watch(
    config: Config, store: Store, resolver: DNSResolver, reactor: Any
) -> RouteWatch:
    """The edge's route re-check over its store and resolver, timed by `reactor`."""
    e = config.edge
    now = utc_from(reactor)
    access = AccessStore(store, now)
    inspector = DomainInspector(
        resolver,
        helo_name=config.fqdn,
        probe_port=e.mx_delivery_port,
        probe_timeout=e.probe_timeout,
    )
    checker = RouteChecker(
        store,
        access,
        inspector,
        edge_mx_target=e.edge_mx_target or config.fqdn,
        spf_mechanism=e.spf_mechanism,
        now=now,
    )
    return RouteWatch(
        checker, access, reactor, interval=e.route_recheck_interval, batch=e.route_recheck_batch
    )
