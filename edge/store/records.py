"""Plain, immutable records the store hands out, and their JSON shapes.

Each record is a frozen dataclass copied out of an ORM row while its session is open, so it
can cross threads and outlive the session. ``to_dict()`` gives the JSON shape used by the
``/v1`` API (timestamps as ISO-8601 UTC with ``Z``). Secrets (a device's connector secret and
API key hash) are kept out of ``repr`` and ``to_dict``. `StoreRecord` does the copying both ways,
field for field: ``from_row`` takes each field from the row's attribute of the same name
(unless given), ``to_dict`` gives the names in ``JSON_FIELDS`` (all fields when empty), in
that order. This module must never import a session, touch the database, or expose ORM rows.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from typing import Any, ClassVar, Literal, Self

from edge.store.models import EmailRouteRow, SpamRuleRow

OWNERSHIP_TXT_PREFIX = "_tailpost"
OWNERSHIP_VALUE_PREFIX = "tailpost-verification="


ISO_SECONDS = "%Y-%m-%dT%H:%M:%SZ"


def isoformat(value: datetime | None, form: str = ISO_SECONDS) -> str | None:
    """``2026-04-03T19:12:24Z`` for an aware datetime (converted to UTC), None for None."""
    if value is None:
        return None
    return value.astimezone(UTC).strftime(form)


def _copied(value: Any) -> Any:
    """A list or dict copied (deep), so that a record shares nothing with a row or a reply."""
    return copy.deepcopy(value) if isinstance(value, list | dict) else value


class StoreRecord:
    """What every record is: a frozen dataclass copied field for field out of an ORM row
    (`from_row`) and into its JSON shape (`to_dict`)."""

    JSON_FIELDS: ClassVar[tuple[str, ...]] = ()
    """The keys of `to_dict`, in order: fields or properties. Empty: every field."""
    TIME_FORMAT: ClassVar[str] = ISO_SECONDS
    """How `to_dict` writes a datetime (in UTC)."""

    @classmethod
    def from_row(cls, row: Any, **given: Any) -> Self:
        """The record of `row`: each field from the row's attribute of the same name, except
        those `given`; lists and dicts are copied."""
        names = [f.name for f in fields(cls)]  # type: ignore[arg-type]
        return cls(**{n: given[n] if n in given else _copied(getattr(row, n)) for n in names})

    def to_dict(self) -> dict[str, Any]:
        names = self.JSON_FIELDS or tuple(f.name for f in fields(self))  # type: ignore[arg-type]
        out: dict[str, Any] = {}
        for name in names:
            value = getattr(self, name)
            out[name] = (
                isoformat(value, self.TIME_FORMAT)
                if isinstance(value, datetime)
                else _copied(value)
            )
        return out


@dataclass(frozen=True)
class Account(StoreRecord):
    id: str
    name: str
    created_at: datetime


@dataclass(frozen=True)
class Device(StoreRecord):
    JSON_FIELDS = (
        "id",
        "name",
        "hostname",
        "auth_status",
        "connector_smtp_addr",
        "connector_username",
        "connector_tls_pin",
        "created_at",
        "last_seen_at",
    )

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

    @property
    def authorized(self) -> bool:
        return self.auth_status == "authorized"


@dataclass(frozen=True)
class ManagedAddress(StoreRecord):
    JSON_FIELDS = (
        "id",
        "name",
        "address",
        "domain",
        "device_id",
        "connector_smtp_addr",
        "vanity",
        "created_at",
    )

    id: str
    account_id: str
    name: str
    address: str
    domain: str
    device_id: str
    vanity: bool
    connector_smtp_addr: str
    created_at: datetime


@dataclass(frozen=True)
class ByodAddress(StoreRecord):
    JSON_FIELDS = (
        "id",
        "name",
        "address",
        "domain",
        "device_id",
        "connector_smtp_addr",
        "created_at",
    )

    id: str
    account_id: str
    name: str
    address: str
    domain: str
    route_id: str
    device_id: str
    connector_smtp_addr: str
    created_at: datetime


@dataclass(frozen=True)
class EmailRoute(StoreRecord):
    JSON_FIELDS = (
        "id",
        "domain",
        "type",
        "status",
        "setup_stage",
        "connector_id",
        "connector_smtp_addr",
        "delivery_mode",
        "mail_from_domain",
        "edge_mx_target",
        "previous_mx",
        "fallback_hosts",
        "authoritative_hosts",
        "ownership_verified",
        "claim_expires_at",
        "last_checked_at",
        "created_at",
        "updated_at",
    )

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
        **given: Any,
    ) -> Self:
        """``device_smtp_addr`` stands in when the route has no address of its own;
        ``last_checked_at`` is the route setup's ``checked_at``."""
        return super().from_row(
            row,
            connector_smtp_addr=row.connector_smtp_addr or device_smtp_addr,
            previous_mx=copy.deepcopy(list(row.previous_mx or [])),
            fallback_hosts=list(row.fallback_hosts or []),
            authoritative_hosts=copy.deepcopy(list(row.authoritative_hosts or [])),
            last_checked_at=last_checked_at,
            **given,
        )

    @property
    def ownership_verified(self) -> bool:
        """`verified`, as the API names it."""
        return self.verified

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


@dataclass(frozen=True)
class SpamRule(StoreRecord):
    JSON_FIELDS = (
        "id",
        "kind",
        "value",
        "action",
        "note",
        "source_message_ids",
        "active",
        "created_at",
        "updated_at",
    )

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
    def from_row(cls, row: SpamRuleRow, **given: Any) -> Self:
        ids = [str(m) for m in row.source_message_ids or []]
        return super().from_row(row, **{"source_message_ids": ids, **given})


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
class AuditEvent(StoreRecord):
    """One entry of the control plane's audit log (see edge.store.claims.audit)."""

    id: int
    actor: str
    action: str
    subject: str
    detail: str
    created_at: datetime
