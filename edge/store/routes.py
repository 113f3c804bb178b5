"""Field rules and row handling for email routes, used by ``edge.store.store.Store``.

A route's ``connector_smtp_addr`` may be left empty: the route then follows its connector
device's address, and the record shows that effective address. The ownership token is
generated when not given. The domain and account of a route never change once created; who
may hold a route for a domain is ``edge.store.claims``'s rule. A verified route's state only
moves forward along ``PROGRESS`` (``advance``), never back and never out of ``disabled``.
This module must never open sessions or commit; the caller owns the transaction.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from edge.store.claims import check_claim
from edge.store.errors import Conflict, NotFound
from edge.store.ids import new_id, new_token
from edge.store.models import (
    DELIVERY_MODES,
    ROUTE_STATUSES,
    ROUTE_TYPES,
    DeviceRow,
    EmailRouteRow,
    RouteSetupRow,
    utcnow,
)
from edge.store.records import EmailRoute
from edge.store.validate import (
    check_choice,
    check_hosts,
    check_json_list,
    check_smtp_addr,
    normalize_domain,
)

PROGRESS = ("pending_dns", "ready", "active")
"""The states a verified route moves through as the edge sees its DNS records, in order."""
STAGE_OF = {"pending_dns": "ready_for_dns", "ready": "awaiting_mx", "active": "active"}
"""The setup stage shown with each of those states."""

ROUTE_FIELDS = frozenset(
    {
        "type",
        "connector_id",
        "connector_smtp_addr",
        "delivery_mode",
        "status",
        "setup_stage",
        "edge_mx_target",
        "mail_from_domain",
        "ownership_token",
        "previous_mx",
        "fallback_hosts",
        "authoritative_hosts",
    }
)


def _host_or_empty(field: str, value: object) -> str:
    if value is None or value == "":
        return ""
    if not isinstance(value, str):
        raise ValueError(f"{field} must be a string")
    try:
        return normalize_domain(value)
    except ValueError as exc:
        raise ValueError(f"{field} is not a host name: {value!r}") from exc


def check_fields(fields: dict[str, object]) -> dict[str, Any]:
    """Validated, normalised copies of route fields; unknown fields raise ValueError."""
    unknown = set(fields) - ROUTE_FIELDS
    if unknown:
        raise ValueError(f"unknown route field(s): {', '.join(sorted(unknown))}")
    out: dict[str, Any] = {}
    for key, value in fields.items():
        if key == "type":
            out[key] = check_choice("type", value, ROUTE_TYPES)
        elif key == "delivery_mode":
            out[key] = check_choice("delivery_mode", value, DELIVERY_MODES)
        elif key == "status":
            out[key] = check_choice("status", value, ROUTE_STATUSES)
        elif key == "connector_id":
            if value is not None and not (
                isinstance(value, str) and 0 < len(value) <= 64 and "\x00" not in value
            ):
                raise ValueError("connector_id must be a device id or null")
            out[key] = value
        elif key == "connector_smtp_addr":
            out[key] = check_smtp_addr(value if isinstance(value, str) else str(value or ""))
        elif key in ("edge_mx_target", "mail_from_domain"):
            out[key] = _host_or_empty(key, value)
        elif key in ("setup_stage", "ownership_token"):
            if not isinstance(value, str) or len(value) > 128:
                raise ValueError(f"{key} must be a string of at most 128 characters")
            out[key] = value.strip()
        elif key == "authoritative_hosts":
            out[key] = check_hosts(value)
        elif key == "fallback_hosts":
            hosts = check_json_list(key, value)
            if not all(isinstance(h, str) and h.strip() for h in hosts):
                raise ValueError("fallback_hosts must be a list of host names")
            out[key] = [h.strip().lower().rstrip(".") for h in hosts]
        else:  # previous_mx
            out[key] = check_json_list(key, value)
    return out


def new_row(domain: str, route_id: str | None, values: dict[str, Any]) -> EmailRouteRow:
    """An unsaved row for ``domain`` with ``values`` (from check_fields) and defaults."""
    if route_id is not None and (not isinstance(route_id, str) or not 0 < len(route_id) <= 64):
        raise ValueError("route_id must be a string of 1 to 64 characters")
    row = EmailRouteRow(
        id=route_id or new_id("route"),
        domain=domain,
        connector_smtp_addr="",
        delivery_mode="split",
        status="pending_dns",
        setup_stage="ready_for_dns",
        edge_mx_target="",
        mail_from_domain="",
        ownership_token="",
        previous_mx=[],
        fallback_hosts=[],
        authoritative_hosts=[],
    )
    for key, value in values.items():
        setattr(row, key, value)
    if not row.ownership_token:
        row.ownership_token = new_token()
    now = utcnow()
    row.created_at = now
    row.updated_at = now
    return row


def _check_connector(session: Session, connector_id: str | None) -> None:
    if connector_id is not None and session.get(DeviceRow, connector_id) is None:
        raise NotFound(f"no device {connector_id!r}")


def insert(session: Session, row: EmailRouteRow, claim_limit: int | None = None) -> None:
    """Add a new route, refusing a taken id, a domain this account already routes or another
    account verified, claims past ``claim_limit`` and an unknown connector."""
    if session.get(EmailRouteRow, row.id) is not None:
        raise Conflict(f"route {row.id!r} already exists")
    check_claim(session, row, claim_limit)
    _check_connector(session, row.connector_id)
    session.add(row)
    session.flush()


def apply(session: Session, row: EmailRouteRow, values: dict[str, Any]) -> None:
    """Set checked ``values`` on ``row`` and bump its updated_at."""
    if "connector_id" in values:
        _check_connector(session, values["connector_id"])
    for key, value in values.items():
        setattr(row, key, value)
    row.updated_at = utcnow()
    session.flush()


def advance(row: EmailRouteRow, status: str, now: datetime) -> str | None:
    """Move ``row`` (read under the write lock) forward to ``status`` if it is a verified route
    at an earlier state of ``PROGRESS``; returns the state it left, or None if it stays. A
    route still in ``pending_dns`` gets that state's stage (claims too). Never moves a route
    back, out of ``disabled``, or a claim."""
    if status not in PROGRESS:
        raise ValueError(f"status must be one of {', '.join(PROGRESS)}")
    if row.status not in PROGRESS:
        return None
    if row.verified_at is not None and PROGRESS.index(status) > PROGRESS.index(row.status):
        old = row.status
        row.status = status
        row.setup_stage = STAGE_OF[status]
        row.updated_at = now
        return old
    if row.status == "pending_dns" and row.setup_stage != STAGE_OF["pending_dns"]:
        row.setup_stage = STAGE_OF["pending_dns"]
        row.updated_at = now
    return None


def record(session: Session, row: EmailRouteRow) -> EmailRoute:
    """The record for ``row``, with the connector device's address filled in if empty."""
    device_addr = ""
    if not row.connector_smtp_addr and row.connector_id is not None:
        device = session.get(DeviceRow, row.connector_id)
        device_addr = device.connector_smtp_addr if device is not None else ""
    setup = session.get(RouteSetupRow, row.id)
    return EmailRoute.from_row(row, device_addr, setup.checked_at if setup is not None else None)


def list_records(session: Session, account_id: str | None) -> list[EmailRoute]:
    query = (
        select(EmailRouteRow, DeviceRow.connector_smtp_addr, RouteSetupRow.checked_at)
        .outerjoin(DeviceRow, DeviceRow.id == EmailRouteRow.connector_id)
        .outerjoin(RouteSetupRow, RouteSetupRow.route_id == EmailRouteRow.id)
        .order_by(EmailRouteRow.created_at, EmailRouteRow.id)
    )
    if account_id is not None:
        query = query.where(EmailRouteRow.account_id == account_id)
    return [
        EmailRoute.from_row(row, addr or "", checked)
        for row, addr, checked in session.execute(query)
    ]
