"""The BYOD onboarding operations of `/v1`: DNS scan, fallback, ownership, preparation, and the
DKIM records of a domain.

Each method is blocking (DNS lookups through the injected resolver, STARTTLS probes, DKIM key
generation, SQL) and is run in a thread by `webapi.v1.app`. The ownership TXT record, looked up
through the edge's resolver, is the only proof of a domain here: finding it makes the caller's claim
the domain's route and drops everyone else's (`edge.store.claims`). A route only ever moves forward
through its stages (pending_dns -> ready -> active), and only once verified; a disabled route is
left alone: the check and the move are `edge.domains.routecheck.RouteChecker`'s, which the edge's
periodic re-check (`edge.domains.routewatch`) uses too. This module must never delete or overwrite a
route's saved previous MX with nothing.
"""

from __future__ import annotations

from typing import Any

from edge.dns.resolver import DNSTemporaryError
from edge.domains.routecheck import RouteChecker
from edge.outbound.dkimkeys import dkim_records, ensure_dkim_keys
from edge.store import Conflict, EmailRoute, NotFound
from edge.store.access import RouteSetup
from edge.store.records import isoformat
from edge.store.validate import normalize_domain
from webapi.errors import APIError
from webapi.v1 import models as m
from webapi.v1.ops import ControlOps, Principal, _err, dns_unavailable

__all__ = ["DomainOps"]


class DomainOps:
    def __init__(self, ops: ControlOps) -> None:
        self.ops = ops
        self.store = ops.store
        self.access = ops.access
        self.inspector = ops.inspector
        self.checker = RouteChecker(
            ops.store,
            ops.access,
            ops.inspector,
            edge_mx_target=ops.settings.edge_mx_target,
            spf_mechanism=ops.settings.spf_mechanism,
            now=ops.now,
        )

    def _taken(self, route: EmailRoute) -> APIError:
        return _err(
            409,
            "domain_taken",
            f"{route.domain} is verified for another account",
            "use_another_domain",
        )

    def _mark(
        self, p: Principal, route: EmailRoute, *, ownership: bool, prepared: bool = False
    ) -> RouteSetup:
        """Record a check; with ownership found, the route wins its domain (409 if another
        account's route won it first, or this claim was dropped meanwhile)."""
        try:
            return self.access.mark_route(
                route.id, ownership=ownership, prepared=prepared, actor=p.scope
            )
        except (Conflict, NotFound):
            raise self._taken(route) from None

    def _ownership(self, route: EmailRoute, status: str) -> dict[str, Any]:
        return {**route.ownership_dns_record(), "status": status}

    def _save_previous(
        self, route: EmailRoute, previous: list[dict[str, Any]], edge: str
    ) -> EmailRoute:
        """Keep the old MX hosts on the route (probed for STARTTLS) for split delivery."""
        found = self.inspector.scan(route.domain, edge, previous)
        if not found["fallback_hosts"]:
            return route
        hosts = [
            {k: h[k] for k in ("host", "port", "tls_mode")} for h in found["authoritative_hosts"]
        ]
        return self.store.update_route(
            route.id,
            previous_mx=[mx for mx in previous if mx["host"] != edge],
            fallback_hosts=found["fallback_hosts"],
            authoritative_hosts=hosts,
            setup_stage="ready_for_dns" if route.setup_stage == "scanned" else route.setup_stage,
        )

    # -- scan --------------------------------------------------------------------------------

    def scan(self, p: Principal, req: m.DnsScanRequest) -> dict[str, Any]:
        edge = self.ops._edge_target(req.edge_mx_target)
        route = self.ops._domain_route(
            p, req.domain, req.route_id, create=True, setup_stage="scanned", edge_mx_target=edge
        )
        edge = self.ops._edge_target(req.edge_mx_target, route)
        try:
            found = self.inspector.scan(route.domain, edge)
            owned = self.inspector.txt_has(route.ownership_txt_host, route.ownership_txt_value)
        except DNSTemporaryError as exc:
            raise dns_unavailable(exc) from None
        setup = self._mark(p, route, ownership=owned)
        body = {
            "domain": route.domain,
            "edge_mx_target": edge,
            "route_id": route.id,
            "status": "ok",
            "dns_status": {
                "txt_verify": {
                    "status": "ok" if owned else "missing",
                    "value": route.ownership_txt_value,
                },
                "mx_to_edge": {
                    "status": "ok" if found["mx_to_edge"] else "pending",
                    "value": f"10 {edge}",
                },
                "last_checked_at": isoformat(setup.checked_at),
            },
            "ownership_dns_record": self._ownership(route, "ok" if owned else "pending"),
            "existing_mx": found["existing_mx"],
            "fallback_hosts": found["fallback_hosts"],
            "authoritative_hosts": found["authoritative_hosts"],
        }
        return m.ScanOut.model_validate(body).model_dump(mode="json")

    # -- fallback ----------------------------------------------------------------------------

    def fallback(self, p: Principal, req: m.DnsFallbackRequest) -> dict[str, Any]:
        route = self.ops._domain_route(
            p, req.domain, req.route_id, create=True, setup_stage="scanned"
        )
        edge = self.ops._edge_target(req.edge_mx_target, route)
        try:
            if req.previous_mx is not None:
                previous = [
                    {"priority": x.priority, "host": x.host.lower().rstrip(".")}
                    for x in req.previous_mx
                ]
            else:
                previous = self.inspector.mx(route.domain)
            if edge != route.edge_mx_target:
                route = self.store.update_route(route.id, edge_mx_target=edge)
            route = self._save_previous(route, previous, edge)
        except DNSTemporaryError as exc:
            raise dns_unavailable(exc) from None
        return self.ops.route_out(route)

    # -- ownership ---------------------------------------------------------------------------

    def verify_ownership(self, p: Principal, req: m.VerifyOwnershipRequest) -> dict[str, Any]:
        route = self.ops._domain_route(p, req.domain, req.route_id, create=False)
        try:
            owned = self.inspector.txt_has(route.ownership_txt_host, route.ownership_txt_value)
        except DNSTemporaryError as exc:
            raise dns_unavailable(exc) from None
        setup = self._mark(p, route, ownership=owned)
        if owned and setup.prepared_at is not None:
            try:
                self._refresh(p, route, self.ops._edge_target(None, route))
            except DNSTemporaryError as exc:
                raise dns_unavailable(exc) from None
        message = (
            "Domain ownership verified. BYOD addresses can be added once the domain is prepared."
            if owned
            else f"Publish the TXT record {route.ownership_txt_host} and verify again."
        )
        body = {
            "status": "ok" if owned else "pending",
            "domain": route.domain,
            "route_id": route.id,
            "message": message,
            "ownership_dns_record": self._ownership(route, "ok" if owned else "pending"),
        }
        return m.VerifyOut.model_validate(body).model_dump(mode="json")

    # -- prepare -----------------------------------------------------------------------------

    def prepare(self, p: Principal, req: m.PrepareRequest) -> dict[str, Any]:
        edge = self.ops._edge_target(req.edge_mx_target)
        route = self.ops._domain_route(
            p,
            req.domain,
            req.route_id,
            create=True,
            connector_id=req.connector_id,
            delivery_mode=req.delivery_mode,
            edge_mx_target=edge,
            setup_stage="ready_for_dns",
        )
        edge = self.ops._edge_target(req.edge_mx_target, route)
        changes: dict[str, Any] = {}
        if req.mail_from_domain:
            changes["mail_from_domain"] = req.mail_from_domain
        if req.connector_id:
            changes["connector_id"] = self.ops._device(p, req.connector_id, authorized=False).id
        if edge != route.edge_mx_target:
            changes["edge_mx_target"] = edge
        if changes:
            route = self.store.update_route(route.id, **changes)
        keys, _made = ensure_dkim_keys(self.access, route.domain, self.ops.now)
        try:
            if not route.previous_mx:
                previous = (
                    [
                        {"priority": x.priority, "host": x.host.lower().rstrip(".")}
                        for x in req.existing_mx
                    ]
                    if req.existing_mx is not None
                    else self.inspector.mx(route.domain)
                )
                route = self._save_previous(route, previous, edge)
            route, records = self._refresh(p, route, edge, prepared=True)
        except DNSTemporaryError as exc:
            raise dns_unavailable(exc) from None
        body = {
            "status": "ok",
            "domain": route.domain,
            "route_id": route.id,
            "message": "Custom domain prepared. Publish the DNS records below, then verify ownership.",
            "route": self.ops.route_out(route),
            "dkim_keys": [
                {
                    "selector": k.selector,
                    "algorithm": k.algorithm,
                    "host": f"{k.selector}._domainkey.{route.domain}",
                    "value": k.dns_value(),
                }
                for k in keys
            ],
            "required_dns_records": records,
        }
        return m.PrepareOut.model_validate(body).model_dump(mode="json")

    # -- DKIM records --------------------------------------------------------------------------

    def dkim(self, p: Principal, domain: str) -> dict[str, Any]:
        """The TXT records of the domain's active DKIM keys, for the admin or for a device of
        the account whose route (or claim) the domain is; 404 for anyone else."""
        try:
            domain = normalize_domain(domain)
        except ValueError:
            raise _err(404, "domain_not_found", f"no domain {domain!r}", "verify_domain") from None
        route = self.store.get_route_by_domain(domain, self.ops._account(p))
        if route is None:
            raise _err(404, "domain_not_found", f"{domain} has no route of yours", "scan_domain")
        records = dkim_records(domain, self.access.dkim_keys(domain))
        body = {
            "domain": domain,
            "route_id": route.id,
            "dkim_keys": [r.to_dict() for r in records],
        }
        return m.DkimRecordsOut.model_validate(body).model_dump(mode="json")

    def _refresh(
        self, p: Principal, route: EmailRoute, edge: str, prepared: bool = False
    ) -> tuple[EmailRoute, list[dict[str, Any]]]:
        """Check every record live and move the route forward as they appear."""
        try:
            checked = self.checker.check(route, p.scope, edge=edge, prepared=prepared)
        except (Conflict, NotFound):
            raise self._taken(route) from None
        return checked.route, checked.records
