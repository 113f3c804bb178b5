"""The DNS check of a domain's route and the forward-only move of its state, in one place.

`RouteChecker.check` looks up every record a BYOD domain needs (`edge.domains.scan`: the MX to the
edge, SPF, DKIM, DMARC, the ownership TXT), records the check and any ownership found
(`AccessStore.mark_route`), and moves a verified route forward to the state the records
allow (`Store.advance_route`: pending_dns -> ready -> active, never back, never out of
disabled, once even when several edges check at the same time). The `/v1` onboarding calls
(`webapi.v1.domains`) and the edge's own periodic re-check (`edge.domains.routewatch`) both use
it, so a route moves by one rule whoever looks.

It is blocking (DNS through the injected resolver, SQL): run it in a worker thread, never on
the reactor thread. It must never decide ownership without the TXT record, never touch a
route it was not given, and never turn a DNS failure into a state change: a
`DNSTemporaryError` leaves the route as it was and is raised to the caller.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from edge.domains.scan import DomainInspector, route_status
from edge.store import EmailRoute, Store
from edge.store.access import AccessStore, RouteSetup

__all__ = ["Checked", "RouteChecker"]


@dataclass(frozen=True)
class Checked:
    """What one check found: the route as it is now, every record with its live status, the
    setup progress, and whether this check moved the route's state."""

    route: EmailRoute
    records: list[dict[str, Any]]
    setup: RouteSetup
    moved: bool


class RouteChecker:
    """Checks one route's records and moves it forward; see the module docstring."""

    def __init__(
        self,
        store: Store,
        access: AccessStore,
        inspector: DomainInspector,
        *,
        edge_mx_target: str,
        spf_mechanism: str = "",
        now: Callable[[], datetime],
    ) -> None:
        """`edge_mx_target` is the edge's MX host for routes that name none of their own."""
        self.store = store
        self.access = access
        self.inspector = inspector
        self.edge_mx_target = edge_mx_target.lower().rstrip(".")
        self.spf_mechanism = spf_mechanism
        self.now = now

    def edge_of(self, route: EmailRoute) -> str:
        """The MX host the route's domain must point at."""
        return (route.edge_mx_target or self.edge_mx_target).lower().rstrip(".")

    def check(
        self, route: EmailRoute, actor: str, *, edge: str | None = None, prepared: bool = False
    ) -> Checked:
        """Check `route`'s records live against `edge` (default: `edge_of(route)`) and move
        it forward as they allow. `actor` is who asked (a device, the admin, or the edge),
        for the audit log. Raises DNSTemporaryError (nothing changed), and Conflict or
        NotFound from `AccessStore.mark_route` (the ownership was proven by another account
        first, or the route is gone)."""
        keys = [
            (k.selector, k.algorithm, k.public_key) for k in self.access.dkim_keys(route.domain)
        ]
        records = self.inspector.records(
            route.domain,
            edge or self.edge_of(route),
            keys,
            (route.ownership_txt_host, route.ownership_txt_value),
            self.spf_mechanism,
        )
        owned = any(r["category"] == "ownership" and r["status"] == "ok" for r in records)
        setup = self.access.mark_route(route.id, ownership=owned, prepared=prepared, actor=actor)
        current, moved = self.store.advance_route(
            route.id, route_status(records), actor=actor, now=self.now()
        )
        return Checked(current, records, setup, moved)
