"""Plain, immutable records the store hands out, and their JSON shapes.

Each record is a frozen dataclass copied out of an ORM row while its session is open, so it
can cross threads and outlive the session. ``to_dict()`` gives the JSON shape used by the
``/v1`` API (timestamps as ISO-8601 UTC with ``Z``). Secrets (a device's connector secret and
API key hash) are kept out of ``repr`` and ``to_dict``. This module must never import a
session, touch the database, or expose ORM rows.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from edge.store.models import (
    AccountRow,
    AuditEventRow,
    ByodAddressRow,
    DeviceRow,
    EmailRouteRow,
    ManagedAddressRow,
    SpamRuleRow,
)

OWNERSHIP_TXT_PREFIX = "_tailpost"
OWNERSHIP_VALUE_PREFIX = "tailpost-verification="


def isoformat(value: datetime | None) -> str | None:
    """``2026-04-03T19:12:24Z`` for an aware datetime (converted to UTC), None for None."""
    if value is None:
        return None
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class Account:
    id: str
    name: str
    created_at: datetime

    @classmethod
    def from_row(cls, row: AccountRow) -> Account:
        return cls(id=row.id, name=row.name, created_at=row.created_at)

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "created_at": isoformat(self.created_at)}


@dataclass(frozen=True)
class Device:
    id: str
    account_id: str
    name: str
    hostname: str
    auth_status: str
    connector_smtp_addr: str
    connector_username: str | None
    connector_secret: str | None = field(repr=False)
    key_hash: str | None = field(repr=False)
    created_at: datetime
    last_seen_at: datetime | None
    connector_tls_pin: str | None = None
    """The pin of the connector's TLS key (`edge.tls.spki_pin`), once the device sent it."""

    @classmethod
    def from_row(cls, row: DeviceRow) -> Device:
        return cls(
            id=row.id,
            account_id=row.account_id,
            name=row.name,
            hostname=row.hostname,
            auth_status=row.auth_status,
            connector_smtp_addr=row.connector_smtp_addr,
            connector_username=row.connector_username,
            connector_secret=row.connector_secret,
            key_hash=row.key_hash,
            created_at=row.created_at,
            last_seen_at=row.last_seen_at,
            connector_tls_pin=row.connector_tls_pin,
        )

    @property
    def authorized(self) -> bool:
        return self.auth_status == "authorized"

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "hostname": self.hostname,
            "auth_status": self.auth_status,
            "connector_smtp_addr": self.connector_smtp_addr,
            "connector_username": self.connector_username,
            "connector_tls_pin": self.connector_tls_pin,
            "created_at": isoformat(self.created_at),
            "last_seen_at": isoformat(self.last_seen_at),
        }


@dataclass(frozen=True)
class ManagedAddress:
    id: str
    account_id: str
    name: str
    address: str
    domain: str
    device_id: str
    vanity: bool
    connector_smtp_addr: str
    created_at: datetime

    @classmethod
    def from_row(cls, row: ManagedAddressRow, connector_smtp_addr: str) -> ManagedAddress:
        return cls(
            id=row.id,
            account_id=row.account_id,
            name=row.name,
            address=row.address,
            domain=row.domain,
            device_id=row.device_id,
            vanity=row.vanity,
            connector_smtp_addr=connector_smtp_addr,
            created_at=row.created_at,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "address": self.address,
            "domain": self.domain,
            "device_id": self.device_id,
            "connector_smtp_addr": self.connector_smtp_addr,
            "vanity": self.vanity,
            "created_at": isoformat(self.created_at),
        }


@dataclass(frozen=True)
class ByodAddress:
    id: str
    account_id: str
    name: str
    address: str
    domain: str
    route_id: str
    device_id: str
    connector_smtp_addr: str
    created_at: datetime

    @classmethod
    def from_row(cls, row: ByodAddressRow, connector_smtp_addr: str) -> ByodAddress:
        return cls(
            id=row.id,
            account_id=row.account_id,
            name=row.name,
            address=row.address,
            domain=row.domain,
            route_id=row.route_id,
            device_id=row.device_id,
            connector_smtp_addr=connector_smtp_addr,
            created_at=row.created_at,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "address": self.address,
            "domain": self.domain,
            "device_id": self.device_id,
            "connector_smtp_addr": self.connector_smtp_addr,
            "created_at": isoformat(self.created_at),
        }


@dataclass(frozen=True)
class EmailRoute:
    id: str
    account_id: str
    domain: str
    type: str
    connector_id: str | None
    connector_smtp_addr: str
    delivery_mode: str
    status: str
    setup_stage: str
    edge_mx_target: str
    mail_from_domain: str
    ownership_token: str
    previous_mx: list[dict[str, Any]]
    fallback_hosts: list[str]
    authoritative_hosts: list[dict[str, Any]]
    created_at: datetime
    updated_at: datetime
    verified_at: datetime | None = None
    claim_expires_at: datetime | None = None
    last_checked_at: datetime | None = None
    """When the edge last looked up the route's DNS records (an API call or its re-check)."""

    @property
    def verified(self) -> bool:
        """Whether this is its domain's route (ownership proven or vouched for), not a claim."""
        return self.verified_at is not None

    @classmethod
    def from_row(
        cls,
        row: EmailRouteRow,
        device_smtp_addr: str = "",
        last_checked_at: datetime | None = None,
    ) -> EmailRoute:
        """``device_smtp_addr`` stands in when the route has no address of its own;
        ``last_checked_at`` is the route setup's ``checked_at``."""
        return cls(
            id=row.id,
            account_id=row.account_id,
            domain=row.domain,
            type=row.type,
            connector_id=row.connector_id,
            connector_smtp_addr=row.connector_smtp_addr or device_smtp_addr,
            delivery_mode=row.delivery_mode,
            status=row.status,
            setup_stage=row.setup_stage,
            edge_mx_target=row.edge_mx_target,
            mail_from_domain=row.mail_from_domain,
            ownership_token=row.ownership_token,
            previous_mx=copy.deepcopy(list(row.previous_mx or [])),
            fallback_hosts=list(row.fallback_hosts or []),
            authoritative_hosts=copy.deepcopy(list(row.authoritative_hosts or [])),
            created_at=row.created_at,
            updated_at=row.updated_at,
            verified_at=row.verified_at,
            claim_expires_at=row.claim_expires_at,
            last_checked_at=last_checked_at,
        )

    @property
    def ownership_txt_host(self) -> str:
        """Where the ownership TXT record lives: ``_tailpost.<domain>``."""
        return f"{OWNERSHIP_TXT_PREFIX}.{self.domain}"

    @property
    def ownership_txt_value(self) -> str:
        """The ownership TXT value: ``tailpost-verification=<token>``."""
        return f"{OWNERSHIP_VALUE_PREFIX}{self.ownership_token}"

    def ownership_dns_record(self) -> dict[str, Any]:
        """The ownership TXT record to publish (without a check status)."""
        return {
            "label": "Ownership TXT",
            "host": self.ownership_txt_host,
            "type": "TXT",
            "value": self.ownership_txt_value,
            "required": True,
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "domain": self.domain,
            "type": self.type,
            "status": self.status,
            "setup_stage": self.setup_stage,
            "connector_id": self.connector_id,
            "connector_smtp_addr": self.connector_smtp_addr,
            "delivery_mode": self.delivery_mode,
            "mail_from_domain": self.mail_from_domain,
            "edge_mx_target": self.edge_mx_target,
            "previous_mx": copy.deepcopy(self.previous_mx),
            "fallback_hosts": list(self.fallback_hosts),
            "authoritative_hosts": copy.deepcopy(self.authoritative_hosts),
            "ownership_verified": self.verified,
            "claim_expires_at": isoformat(self.claim_expires_at),
            "last_checked_at": isoformat(self.last_checked_at),
            "created_at": isoformat(self.created_at),
            "updated_at": isoformat(self.updated_at),
        }


@dataclass(frozen=True)
class SpamRule:
    id: str
    account_id: str
    kind: str
    value: str
    action: str
    note: str
    source_message_ids: list[str]
    active: bool
    created_at: datetime
    updated_at: datetime

    @classmethod
    def from_row(cls, row: SpamRuleRow) -> SpamRule:
        return cls(
            id=row.id,
            account_id=row.account_id,
            kind=row.kind,
            value=row.value,
            action=row.action,
            note=row.note,
            source_message_ids=[str(m) for m in row.source_message_ids or []],
            active=row.active,
            created_at=row.created_at,
            updated_at=row.updated_at,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": self.kind,
            "value": self.value,
            "action": self.action,
            "note": self.note,
            "source_message_ids": list(self.source_message_ids),
            "active": self.active,
            "created_at": isoformat(self.created_at),
            "updated_at": isoformat(self.updated_at),
        }


@dataclass(frozen=True)
class RecipientTarget:
    """Where mail for one accepted recipient goes: a device connector or upstream hosts."""

    kind: Literal["device", "upstream"]
    address: str
    device_id: str | None
    connector_smtp_addr: str
    connector_username: str | None
    connector_secret: str | None = field(repr=False)
    route_id: str | None
    upstream_hosts: list[dict[str, Any]]
    connector_tls_pin: str | None = None
    """For a device: the pin its connector's TLS key must match (None: no pin known)."""


@dataclass(frozen=True)
class AuditEvent:
    """One entry of the control plane's audit log (see edge.store.claims.audit)."""

    id: int
    actor: str
    action: str
    subject: str
    detail: str
    created_at: datetime

    @classmethod
    def from_row(cls, row: AuditEventRow) -> AuditEvent:
        return cls(row.id, row.actor, row.action, row.subject, row.detail, row.created_at)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "actor": self.actor,
            "action": self.action,
            "subject": self.subject,
            "detail": self.detail,
            "created_at": isoformat(self.created_at),
        }
