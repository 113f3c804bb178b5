"""Recipient resolution: which device connector or upstream host takes mail for an address.

Called by the SMTP server at RCPT TO through ``Store.resolve_recipient``. The rules, in order:

1. an exact managed or BYOD address goes to its device, if that device is authorized (an
   address of a pending or revoked device is refused outright, as is a BYOD address whose
   route is not verified and ``active``);
2. else a role address (``postmaster@``, RFC 5321 §4.5.1; ``abuse@``, RFC 2142) of a domain
   whose verified route is ``active`` goes to the device that owns the domain (the route's
   connector), if that device is authorized, whatever the route's delivery mode: the
   domain's owner, not its previous provider, answers for it;
3. else the domain's verified route, if ``active``: in ``device`` delivery mode it sends
   every address to the route's connector device (if authorized);
4. in ``split`` mode with authoritative hosts it passes the address on to those hosts (the
   domain's previous provider), in priority order;
5. else nobody takes it (None), and the SMTP server refuses the recipient (unless the edge's
   own postmaster rule takes it: ``edge.delivery.routing.RecipientResolver``).

Only a verified route takes mail: a claim (``edge.store.claims``) or a route still in
``pending_dns`` or ``ready`` never does, whatever its delivery mode.

``awaiting_route`` tells the one case apart where a refusal is only for now: the address
would be taken by the rules above if its domain's verified route, now in ``pending_dns`` or
``ready``, were ``active`` (its owner proved the domain and the edge is waiting to see its
DNS records). The MX answers such a recipient with a temporary refusal, so senders retry
until the edge's re-check (``edge.domains.routewatch``) makes the route active. A claim, a disabled
route or an address nobody would take never counts.

Domains compare case-insensitively and local parts are lower-cased; plus-addresses are not
stripped. This module must never raise on malformed input, never write to the database, and
never do DNS lookups.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

from sqlalchemy import select
from sqlalchemy.orm import Session

from edge.store.models import ByodAddressRow, DeviceRow, EmailRouteRow, ManagedAddressRow
from edge.store.records import RecipientTarget
from edge.store.validate import split_address

ROLE_LOCAL_PARTS = frozenset({"postmaster", "abuse"})
"""Local parts every mail domain must accept (RFC 5321 §4.5.1, RFC 2142)."""
ROUTE_TAKES_MAIL = "active"
ROUTE_ON_ITS_WAY = frozenset({"pending_dns", "ready"})
"""States of a verified route that the edge's DNS checks move on to ``active``."""


def _takes_mail(route: EmailRouteRow | None) -> bool:
    return route is not None and route.verified_at is not None and route.status == ROUTE_TAKES_MAIL


def _on_its_way(route: EmailRouteRow | None) -> bool:
    return route is not None and route.verified_at is not None and route.status in ROUTE_ON_ITS_WAY


def _device_target(
    address: str, device: DeviceRow, route_id: str | None, smtp_addr: str = ""
) -> RecipientTarget | None:
    if device.auth_status != "authorized":
        return None
    return RecipientTarget(
        kind="device",
        address=address,
        device_id=device.id,
        connector_smtp_addr=smtp_addr or device.connector_smtp_addr,
        connector_username=device.connector_username,
        connector_secret=device.connector_secret,
        route_id=route_id,
        upstream_hosts=[],
        connector_tls_pin=device.connector_tls_pin,
    )


def resolve_recipient(session: Session, address: object) -> RecipientTarget | None:
    """The target for ``address`` per the module's rules, or None (see module docstring)."""
    return _resolve(session, address, _takes_mail)


def awaiting_route(session: Session, address: object) -> bool:
    """Whether ``address``, taken by nobody now, would be taken once its domain's verified
    route (now ``pending_dns`` or ``ready``) is active (see module docstring)."""
    if resolve_recipient(session, address) is not None:
        return False
    return _resolve(session, address, _on_its_way) is not None


def _resolve(
    session: Session, address: object, takes_mail: Callable[[EmailRouteRow | None], bool]
) -> RecipientTarget | None:
    """The module's rules, with ``takes_mail`` saying which routes take mail."""
    parts = split_address(address)
    if parts is None:
        return None
    local, domain = parts
    full = f"{local}@{domain}"

    route = session.scalars(
        select(EmailRouteRow).where(
            EmailRouteRow.domain == domain, EmailRouteRow.verified_at.is_not(None)
        )
    ).first()

    managed = session.execute(
        select(ManagedAddressRow.id, DeviceRow)
        .join(DeviceRow, DeviceRow.id == ManagedAddressRow.device_id)
        .where(ManagedAddressRow.address == full)
    ).first()
    if managed is not None:
        return _device_target(full, managed[1], route.id if route is not None else None)

    byod = session.execute(
        select(ByodAddressRow.route_id, DeviceRow)
        .join(DeviceRow, DeviceRow.id == ByodAddressRow.device_id)
        .where(ByodAddressRow.address == full)
    ).first()
    if byod is not None:
        owner = session.get(EmailRouteRow, byod[0])
        if owner is None or not takes_mail(owner):
            return None
        return _device_target(full, byod[1], owner.id)

    if route is None or not takes_mail(route):
        return None
    if local in ROLE_LOCAL_PARTS and route.connector_id is not None:
        keeper = session.get(DeviceRow, route.connector_id)
        found = (
            None
            if keeper is None
            else _device_target(full, keeper, route.id, route.connector_smtp_addr)
        )
        if found is not None:
            return found
    if route.delivery_mode == "device":
        if route.connector_id is None:
            return None
        device = session.get(DeviceRow, route.connector_id)
        if device is None:
            return None
        return _device_target(full, device, route.id, route.connector_smtp_addr)
    if route.delivery_mode == "split" and route.authoritative_hosts:
        return RecipientTarget(
            kind="upstream",
            address=full,
            device_id=None,
            connector_smtp_addr="",
            connector_username=None,
            connector_secret=None,
            route_id=route.id,
            upstream_hosts=copy.deepcopy(list(route.authoritative_hosts)),
        )
    return None


def routed_domain(session: Session, domain: object) -> bool:
    """Whether ``domain`` has a verified, active route (the edge receives its mail); a claim
    or a route on its way there does not count."""
    if not isinstance(domain, str) or not domain or len(domain) > 255:
        return False
    name = domain.strip().lower().rstrip(".")
    route = session.scalars(
        select(EmailRouteRow).where(
            EmailRouteRow.domain == name, EmailRouteRow.verified_at.is_not(None)
        )
    ).first()
    return _takes_mail(route)
