"""What each `/v1` operation does, as blocking functions over the store and the DNS checks.

`ControlOps` methods take the caller (`Principal`) and a validated request model and return
a JSON-ready dict, or raise `APIError` with the machine code and next action. They scope
every read and write to the caller's account (the admin key sees all). A device's new route
is only a claim on its domain until the edge finds the ownership record; a route's status is
the edge's to set (the admin key may override it, on record), and a device's connector
address must pass `webapi.v1.netpolicy` (the admin key may override that too, on record). They
are blocking (SQL, DNS, key generation) and are run in a thread by `webapi.v1.app`; nothing
here may run on the reactor thread or build a reply by hand.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

from twisted.logger import Logger

from edge.dns.resolver import DNSTemporaryError
from edge.domains.scan import DomainInspector
from edge.store import Conflict, Device, EmailRoute, Store
from edge.store.access import AccessStore, RegistrationLimits
from edge.store.claims import ClaimLimit
from edge.store.errors import ServedHere
from edge.store.store import DEFAULT_ACCOUNT
from webapi.errors import APIError
from webapi.v1 import models as m
from webapi.v1.netpolicy import ConnectorPolicy

__all__ = ["ControlOps", "Principal", "Settings", "namespace_of"]

ADMIN = "admin"
log = Logger(namespace="tailpost.control")


@dataclass(frozen=True)
class Principal:
    """Who is calling: the admin (every account) or one device (its own account)."""

    kind: Literal["admin", "device"]
    account_id: str | None = None
    device_id: str | None = None

    @property
    def scope(self) -> str:
        """The key under which this caller's idempotency keys are kept."""
        return self.device_id or ADMIN

    def sees(self, account_id: str) -> bool:
        return self.kind == "admin" or account_id == self.account_id


@dataclass(frozen=True)
class Settings:
    managed_domain: str
    allow_vanity: bool
    edge_mx_target: str
    spf_mechanism: str
    registration_ttl: float
    control_url: Callable[[], str]
    claim_ttl: float = 86400.0
    claim_limit: int = 20
    registration_limits: RegistrationLimits = RegistrationLimits()
    # The edge's own host names (beside the managed domain and MX target): no rule blocks them.
    edge_names: tuple[str, ...] = ()


def namespace_of(name: str, device_id: str) -> str:
    """A device's part of its managed addresses: a slug of its name and a piece of its id."""
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:16].strip("-") or "device"
    return f"{slug}-{device_id[-6:].lower()}"


def _err(status: int, code: str, message: str, action: str) -> APIError:
    return APIError(status, code, message, action)


def _not_found(what: str, ident: str) -> APIError:
    return _err(
        404, f"{what}_not_found", f"no {what.replace('_', ' ')} {ident!r}", f"verify_{what}_id"
    )


def _claim_limit(exc: Conflict) -> APIError:
    return _err(409, "claim_limit_reached", str(exc), "verify_or_delete_pending_routes")


def dns_unavailable(exc: DNSTemporaryError) -> APIError:
    return _err(503, "dns_unavailable", "a DNS lookup failed for now; try again", "retry_later")


class ControlOps:
    def __init__(
        self,
        store: Store,
        access: AccessStore,
        inspector: DomainInspector,
        settings: Settings,
        now: Callable[[], datetime],
        policy: ConnectorPolicy,
    ) -> None:
        self.store = store
        self.access = access
        self.inspector = inspector
        self.settings = settings
        self.now = now
        self.policy = policy

    # -- helpers -----------------------------------------------------------------------------

    def _account(self, p: Principal) -> str | None:
        return None if p.kind == "admin" else p.account_id

    def _device(self, p: Principal, device_id: str | None, *, authorized: bool = True) -> Device:
        device_id = device_id or p.device_id
        if device_id is None:
            raise _err(
                409,
                "device_id_required",
                "device_id is required with the admin key",
                "add_device_id",
            )
        device = self.store.get_device(device_id)
        if device is None or not p.sees(device.account_id):
            raise _not_found("device", device_id)
        if authorized and not device.authorized:
            raise _err(
                409,
                "device_not_authorized",
                f"device {device_id} is not approved",
                "approve_device_first",
            )
        return device

    def _route(self, p: Principal, route_id: str) -> EmailRoute:
        route = self.store.get_route(route_id)
        if route is None or not p.sees(route.account_id):
            raise _not_found("route", route_id)
        return route

    def route_out(self, route: EmailRoute) -> dict[str, Any]:
        return m.RouteOut.model_validate(route.to_dict()).model_dump(mode="json")

    def check_connector_addr(self, p: Principal, addr: str | None, subject: str) -> None:
        """Refuse a device a connector address outside the device networks (403); the admin
        key may set one, and that override goes on record."""
        if not addr:
            return
        why = self.policy.refusal(addr)
        if why is None:
            return
        if p.kind != "admin":
            raise _err(403, "connector_addr_not_allowed", why, "use_the_device_tailnet_address")
        detail = f"connector address {addr}: {why}"
        self.store.record_event(ADMIN, "connector_addr_override", subject, detail, self.now())
        log.info("admin override on {subject}: {detail}", subject=subject, detail=detail)

    def _claim_fields(self, p: Principal) -> dict[str, Any]:
        return {
            "claim_expires_at": self.now() + timedelta(seconds=self.settings.claim_ttl),
            "claim_limit": None if p.kind == "admin" else self.settings.claim_limit,
            "now": self.now(),
        }

    def _edge_target(self, requested: str | None, route: EmailRoute | None = None) -> str:
        target = (
            requested or (route.edge_mx_target if route else "") or self.settings.edge_mx_target
        )
        return target.lower().rstrip(".")

    def _domain_route(
        self, p: Principal, domain: str, route_id: str | None, *, create: bool, **fields: Any
    ) -> EmailRoute:
        """The route for ``domain`` (which ``route_id``, if given, must name), created for the
        caller's account when missing and ``create`` is set."""
        domain = domain.lower().rstrip(".")
        route = self.store.get_route_by_domain(domain, self._account(p))
        if route is None and p.kind != "admin":
            other = self.store.get_route_by_domain(domain)
            if other is not None and other.verified:
                raise _err(
                    409,
                    "domain_taken",
                    f"{domain} is routed by another account",
                    "use_another_domain",
                )
        if route is not None and route_id is not None and route.id != route_id:
            raise _err(
                409,
                "route_mismatch",
                f"route {route_id} is not the route of {domain}",
                "omit_route_id",
            )
        if route is not None:
            return route
        if not create:
            raise _err(409, "domain_not_scanned", f"{domain} has no route yet", "scan_domain")
        if route_id is not None and self.store.get_route(route_id) is not None:
            raise _err(
                409,
                "route_mismatch",
                f"route {route_id} belongs to another domain",
                "omit_route_id",
            )
        connector = fields.pop("connector_id", None) or p.device_id
        account = DEFAULT_ACCOUNT
        if connector is not None:
            account = self._device(p, connector, authorized=False).account_id
        elif p.account_id is not None:
            account = p.account_id
        try:
            return self.store.create_route(
                domain,
                type="byod",
                connector_id=connector,
                account_id=account,
                route_id=route_id,
                status="pending_dns",
                **fields,
                **self._claim_fields(p),
            )
        except ClaimLimit as exc:
            raise _claim_limit(exc) from None
        except Conflict as exc:
            raise _err(409, "domain_taken", str(exc), "use_another_domain") from None

    # -- managed addresses -------------------------------------------------------------------

    def list_managed(self, p: Principal) -> dict[str, Any]:
        items = self.store.list_managed_addresses(self._account(p))
        return m.ManagedAddressList(
            addresses=[m.ManagedAddressOut(**a.to_dict()) for a in items]
        ).model_dump(mode="json")

    def create_managed(self, p: Principal, req: m.ManagedAddressCreate) -> dict[str, Any]:
        domain = self.settings.managed_domain
        if not domain:
            raise _err(
                409,
                "managed_domain_not_configured",
                "this edge has no managed domain",
                "use_byod_addresses",
            )
        if req.vanity and not self.settings.allow_vanity:
            raise _err(
                403,
                "vanity_not_allowed",
                "this edge does not give out vanity addresses",
                "omit_vanity",
            )
        device = self._device(p, req.device_id)
        try:
            address = self.store.add_managed_address(
                req.name,
                device.id,
                domain=domain,
                namespace=namespace_of(device.name, device.id),
                vanity=req.vanity,
            )
        except Conflict:
            raise _err(
                409, "address_taken", "that address is already taken", "choose_another_name"
            ) from None
        except ValueError as exc:
            raise _err(400, "validation_failed", str(exc), "fix_request_body") from None
        return m.ManagedAddressOut(**address.to_dict()).model_dump(mode="json")

    def delete_managed(self, p: Principal, address_id: str) -> dict[str, Any]:
        if not any(a.id == address_id for a in self.store.list_managed_addresses(self._account(p))):
            raise _not_found("address", address_id)
        self.store.delete_managed_address(address_id)
        return {"status": "deleted"}

    # -- BYOD addresses ----------------------------------------------------------------------

    def list_byod(self, p: Principal) -> dict[str, Any]:
        items = self.store.list_byod_addresses(self._account(p))
        return m.ByodAddressList(
            addresses=[m.ByodAddressOut(**a.to_dict()) for a in items]
        ).model_dump(mode="json")

    def create_byod(self, p: Principal, req: m.ByodAddressCreate) -> dict[str, Any]:
        domain = req.domain.lower().rstrip(".")
        route = self.store.get_route_by_domain(domain, self._account(p))
        if route is None or not p.sees(route.account_id):
            raise _err(
                409,
                "domain_not_prepared",
                f"{domain} is not prepared on this edge",
                "prepare_domain",
            )
        if route.type == "byod":
            setup = self.access.route_setup(route.id)
            if setup.prepared_at is None:
                raise _err(
                    409, "domain_not_prepared", f"{domain} is not prepared yet", "prepare_domain"
                )
            if not route.verified:
                raise _err(
                    409,
                    "domain_ownership_unverified",
                    f"ownership of {domain} is not verified",
                    "verify_ownership",
                )
        device = self._device(p, req.device_id or route.connector_id)
        try:
            address = self.store.add_byod_address(req.name, domain, device.id)
        except Conflict as exc:
            code = "address_taken" if "taken" in str(exc) else "account_mismatch"
            raise _err(409, code, str(exc), "choose_another_name") from None
        except ValueError as exc:
            raise _err(400, "validation_failed", str(exc), "fix_request_body") from None
        return m.ByodAddressOut(**address.to_dict()).model_dump(mode="json")

    def delete_byod(self, p: Principal, address_id: str) -> dict[str, Any]:
        if not any(a.id == address_id for a in self.store.list_byod_addresses(self._account(p))):
            raise _not_found("address", address_id)
        self.store.delete_byod_address(address_id)
        return {"status": "deleted"}

    # -- routes ------------------------------------------------------------------------------

    def list_routes(self, p: Principal) -> dict[str, Any]:
        return {"routes": [self.route_out(r) for r in self.store.list_routes(self._account(p))]}

    def create_route(self, p: Principal, req: m.RouteCreate) -> dict[str, Any]:
        """A new route: for a device, a claim on the domain until the ownership TXT record
        is found (a subdomain of the managed domain is the edge's to give and is verified at
        once, first come first served, as managed addresses are)."""
        domain = req.domain.lower().rstrip(".")
        managed = self.settings.managed_domain
        subdomain = req.type == "subdomain"
        if subdomain and not (managed and domain.endswith("." + managed)):
            raise _err(
                409,
                "not_a_managed_subdomain",
                f"{domain} is not under this edge's managed domain",
                "use_type_byod",
            )
        account = p.account_id or DEFAULT_ACCOUNT
        if req.connector_id is not None:
            account = self._device(p, req.connector_id, authorized=False).account_id
        self.check_connector_addr(p, req.connector_smtp_addr, domain)
        if self.store.get_route_by_domain(domain, account) is not None:
            raise _err(
                409,
                "domain_taken",
                f"a route for {domain} already exists",
                "patch_the_existing_route",
            )
        claim = self._claim_fields(p)
        if subdomain:
            claim["verified_at"] = self.now()
        try:
            route = self.store.create_route(
                domain,
                type=req.type,
                connector_id=req.connector_id or p.device_id,
                connector_smtp_addr=req.connector_smtp_addr or "",
                delivery_mode=req.delivery_mode,
                status="active" if subdomain else "pending_dns",
                setup_stage="active" if subdomain else "ready_for_dns",
                edge_mx_target=self._edge_target(req.edge_mx_target),
                mail_from_domain=req.mail_from_domain or "",
                account_id=account,
                **claim,
            )
        except ClaimLimit as exc:
            raise _claim_limit(exc) from None
        except Conflict:
            raise _err(
                409,
                "domain_taken",
                f"{domain} is routed by another account",
                "use_another_domain",
            ) from None
        except ValueError as exc:
            raise _err(400, "validation_failed", str(exc), "fix_request_body") from None
        return self.route_out(route)

    def patch_route(self, p: Principal, route_id: str, req: m.RoutePatch) -> dict[str, Any]:
        route = self._route(p, route_id)
        fields = {k: getattr(req, k) for k in req.model_fields_set}
        for key in ("status", "delivery_mode"):
            if key in fields and fields[key] is None:
                raise _err(400, "validation_failed", f"{key} cannot be null", "fix_request_body")
        if "status" in fields and p.kind != "admin":
            raise _err(
                403,
                "route_status_is_set_by_the_edge",
                "a route's status follows its DNS records; the edge sets it",
                "post_custom_domains_verify_ownership",
            )
        if fields.get("connector_id") is not None:
            self._device(p, fields["connector_id"], authorized=False)
        if "authoritative_hosts" in fields:
            fields["authoritative_hosts"] = [h.model_dump() for h in req.authoritative_hosts or []]
        for key in ("connector_smtp_addr", "mail_from_domain", "edge_mx_target"):
            if key in fields and fields[key] is None:
                fields[key] = ""
        self.check_connector_addr(p, fields.get("connector_smtp_addr"), route.domain)
        try:
            if "status" in fields:
                updated = self.store.override_route(
                    route_id, ADMIN, self.now(), "status set with the admin key", **fields
                )
                log.info(
                    "admin set route {route} of {domain} to {status}",
                    route=route_id,
                    domain=route.domain,
                    status=fields["status"],
                )
            else:
                updated = self.store.update_route(route_id, **fields)
        except Conflict as exc:
            raise _err(409, "domain_taken", str(exc), "use_another_domain") from None
        except ValueError as exc:
            raise _err(400, "validation_failed", str(exc), "fix_request_body") from None
        return self.route_out(updated)

    def delete_route(self, p: Principal, route_id: str) -> dict[str, Any]:
        self._route(p, route_id)
        self.store.delete_route(route_id)
        return {"status": "deleted"}

    # -- spam rules --------------------------------------------------------------------------

    def list_rules(self, p: Principal) -> dict[str, Any]:
        rules = self.store.list_spam_rules(self._account(p))
        return {"rules": [m.SpamRuleOut(**r.to_dict()).model_dump(mode="json") for r in rules]}

    def create_rule(self, p: Principal, body: m.SpamRuleCreate) -> tuple[int, dict[str, Any]]:
        req = body.root
        account = p.account_id or DEFAULT_ACCOUNT
        before = {(r.kind, r.value) for r in self.store.list_spam_rules(account, active_only=False)}
        try:
            rule = self.store.add_spam_rule(
                req.kind,
                req.value,
                action=req.action,
                note=req.note,
                source_message_ids=list(req.source_message_ids),
                account_id=account,
                edge_names=(
                    self.settings.managed_domain,
                    self.settings.edge_mx_target,
                    *self.settings.edge_names,
                ),
            )
        except ServedHere as exc:
            raise _err(409, "served_domain", str(exc), "block_the_sender_address") from None
        except ValueError as exc:
            raise _err(400, "validation_failed", str(exc), "fix_request_body") from None
        status = 200 if (rule.kind, rule.value) in before else 201
        return status, m.SpamRuleOut(**rule.to_dict()).model_dump(mode="json")

    def delete_rule(self, p: Principal, rule_id: str) -> dict[str, Any]:
        if not any(r.id == rule_id for r in self.store.list_spam_rules(self._account(p))):
            raise _not_found("rule", rule_id)
        self.store.delete_spam_rule(rule_id)
        return {"status": "deleted"}
