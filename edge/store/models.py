"""ORM rows of the edge's control plane: accounts, devices, routes, addresses, spam rules,
and for the management API: device keys, registrations, DKIM keys, route setup, idempotency.

These are the SQLAlchemy 2 declarative tables that the Alembic migrations create. They are an
implementation detail of :mod:`edge.store.store`: rows never leave a session; callers get the
frozen records of :mod:`edge.store.records` instead. Every schema change here needs a new
migration under ``migrations/versions`` (a test compares the two). This module must never
open connections, hold state, or contain business rules beyond column constraints.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    CheckConstraint,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from edge.store.keyring import keys_of
from edge.store.validate import DEVICE_AUTH_STATUSES

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

ROUTE_TYPES = ("byod", "subdomain")
DELIVERY_MODES = ("split", "device")
ROUTE_STATUSES = ("pending_dns", "ready", "active", "disabled")
SPAM_RULE_KINDS = ("sender", "domain")
SPAM_RULE_ACTIONS = ("reject", "quarantine", "tag")


def utcnow() -> datetime:
    """The current time, timezone-aware, in UTC."""
    return datetime.now(UTC)


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp stored as UTC and always read back timezone-aware (UTC).

    PostgreSQL keeps ``timestamptz``; SQLite has no time zones, so the UTC wall time is stored
    and UTC is attached again on the way out. Naive datetimes are refused on the way in.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if not isinstance(value, datetime) or value.tzinfo is None:
            raise ValueError(f"timestamps must be timezone-aware datetimes, got {value!r}")
        value = value.astimezone(UTC)
        if dialect.name == "sqlite":
            return value.replace(tzinfo=None)
        return value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        assert isinstance(value, datetime)
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


class EncryptedText(TypeDecorator[str]):
    """A secret, stored as a Fernet token (``edge.store.keyring``) and read back in the clear.

    The key ring is the one attached to the engine's dialect when the engine was made
    (``edge.store.engine.make_engine(keys=...)``): SQLAlchemy gives a type only the dialect,
    and each engine has its own. An engine without keys, or a token the keys do not open,
    raises ``StoreKeyError`` instead of returning anything. Comparing such a column in SQL
    is meaningless (every encryption differs), so it is never used in a WHERE clause.
    """

    impl = Text
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Dialect) -> str | None:
        if value is None:
            return None
        if not isinstance(value, str):
            raise ValueError(f"a secret must be a string, got {type(value).__name__}")
        return keys_of(dialect).encrypt(value)

    def process_result_value(self, value: Any, dialect: Dialect) -> str | None:
        if value is None:
            return None
        return keys_of(dialect).decrypt(str(value))


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class AccountRow(Base):
    __tablename__ = "accounts"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class DeviceRow(Base):
    __tablename__ = "devices"
    __table_args__ = (
        CheckConstraint(_in("auth_status", DEVICE_AUTH_STATUSES), name="auth_status"),
        Index(None, "account_id"),
    )

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    account_id: Mapped[str] = mapped_column(
        String(64), ForeignKey("accounts.id", ondelete="CASCADE")
    )
    name: Mapped[str] = mapped_column(String(255))
    hostname: Mapped[str] = mapped_column(String(255), default="")
    auth_status: Mapped[str] = mapped_column(String(16), default="pending")
    connector_smtp_addr: Mapped[str] = mapped_column(String(300), default="")
    connector_username: Mapped[str | None] = mapped_column(String(255))
    connector_secret: Mapped[str | None] = mapped_column(EncryptedText())
    # The connector's TLS key pin (edge.tls.spki_pin): delivery requires STARTTLS to that key.
    connector_tls_pin: Mapped[str | None] = mapped_column(String(64))
    key_hash: Mapped[str | None] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    last_seen_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class EmailRouteRow(Base):
    __tablename__ = "email_routes"
    __table_args__ = (
        CheckConstraint(_in("type", ROUTE_TYPES), name="type"),
        CheckConstraint(_in("delivery_mode", DELIVERY_MODES), name="delivery_mode"),
        CheckConstraint(_in("status", ROUTE_STATUSES), name="status"),
        Index(None, "account_id"),
        Index(None, "connector_id"),
        Index(None, "domain"),
        # One route per domain and account; many accounts may claim a domain, but only one
        # route per domain is ever verified (its owner proved control, or the operator said so).
        UniqueConstraint("account_id", "domain"),
        Index(
            "uq_email_routes_verified_domain",
            "domain",
            unique=True,
            sqlite_where=text("verified_at IS NOT NULL"),
            postgresql_where=text("verified_at IS NOT NULL"),
        ),
    )

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    account_id: Mapped[str] = mapped_column(
        String(64), ForeignKey("accounts.id", ondelete="CASCADE")
    )
    domain: Mapped[str] = mapped_column(String(253))
    type: Mapped[str] = mapped_column(String(16))
    connector_id: Mapped[str | None] = mapped_column(
        String(64), ForeignKey("devices.id", ondelete="SET NULL")
    )
    connector_smtp_addr: Mapped[str] = mapped_column(String(300), default="")
    delivery_mode: Mapped[str] = mapped_column(String(16), default="split")
    status: Mapped[str] = mapped_column(String(16), default="pending_dns")
    setup_stage: Mapped[str] = mapped_column(String(64), default="ready_for_dns")
    edge_mx_target: Mapped[str] = mapped_column(String(253), default="")
    mail_from_domain: Mapped[str] = mapped_column(String(253), default="")
    ownership_token: Mapped[str] = mapped_column(String(128), default="")
    previous_mx: Mapped[list[Any]] = mapped_column(JSON, default=list)
    fallback_hosts: Mapped[list[Any]] = mapped_column(JSON, default=list)
    authoritative_hosts: Mapped[list[Any]] = mapped_column(JSON, default=list)
    # When the account proved control of the domain (or the operator vouched for it); NULL
    # while the route is only a claim, which lapses at claim_expires_at.
    verified_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    claim_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class ManagedAddressRow(Base):
    __tablename__ = "managed_addresses"
    __table_args__ = (Index(None, "account_id"), Index(None, "device_id"))

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    account_id: Mapped[str] = mapped_column(
        String(64), ForeignKey("accounts.id", ondelete="CASCADE")
    )
    name: Mapped[str] = mapped_column(String(64))
    address: Mapped[str] = mapped_column(String(320), unique=True)
    domain: Mapped[str] = mapped_column(String(253))
    device_id: Mapped[str] = mapped_column(String(64), ForeignKey("devices.id", ondelete="CASCADE"))
    vanity: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class ByodAddressRow(Base):
    __tablename__ = "byod_addresses"
    __table_args__ = (
        Index(None, "account_id"),
        Index(None, "device_id"),
        Index(None, "route_id"),
    )

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    account_id: Mapped[str] = mapped_column(
        String(64), ForeignKey("accounts.id", ondelete="CASCADE")
    )
    name: Mapped[str] = mapped_column(String(64))
    address: Mapped[str] = mapped_column(String(320), unique=True)
    domain: Mapped[str] = mapped_column(String(253))
    route_id: Mapped[str] = mapped_column(
        String(64), ForeignKey("email_routes.id", ondelete="CASCADE")
    )
    device_id: Mapped[str] = mapped_column(String(64), ForeignKey("devices.id", ondelete="CASCADE"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class SpamRuleRow(Base):
    __tablename__ = "spam_rules"
    __table_args__ = (
        UniqueConstraint("account_id", "kind", "value"),
        CheckConstraint(_in("kind", SPAM_RULE_KINDS), name="kind"),
        CheckConstraint(_in("action", SPAM_RULE_ACTIONS), name="action"),
    )

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    account_id: Mapped[str] = mapped_column(
        String(64), ForeignKey("accounts.id", ondelete="CASCADE")
    )
    kind: Mapped[str] = mapped_column(String(16))
    value: Mapped[str] = mapped_column(String(320))
    action: Mapped[str] = mapped_column(String(16), default="reject")
    note: Mapped[str] = mapped_column(Text, default="")
    source_message_ids: Mapped[list[Any]] = mapped_column(JSON, default=list)
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


DKIM_ALGORITHMS = ("rsa", "ed25519")


class DeviceKeyRow(Base):
    """An API key of a device: only its SHA-256 is kept; revoked keys stay for the record."""

    __tablename__ = "device_keys"
    __table_args__ = (Index(None, "device_id"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    device_id: Mapped[str] = mapped_column(String(64), ForeignKey("devices.id", ondelete="CASCADE"))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    registration_id: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class RegistrationRow(Base):
    """A device's request to join: a short approval code, the hash of its poll secret and
    what the device said of itself. Until an operator approves it, nothing else exists: the
    device (with the id reserved here) and its account are made at approval."""

    __tablename__ = "device_registrations"
    __table_args__ = (
        Index(None, "device_id"),
        Index(None, "created_at"),
        Index(None, "source"),
    )

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    device_id: Mapped[str] = mapped_column(String(64))
    code: Mapped[str] = mapped_column(String(16), unique=True)
    poll_hash: Mapped[str] = mapped_column(String(64))
    name: Mapped[str] = mapped_column(String(255), default="")
    hostname: Mapped[str] = mapped_column(String(255), default="")
    connector_smtp_addr: Mapped[str] = mapped_column(String(300), default="")
    connector_tls_pin: Mapped[str | None] = mapped_column(String(64))
    source: Mapped[str] = mapped_column(String(64), default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime())
    approved_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class DkimKeyRow(Base):
    """A domain's DKIM key under one selector: private key as PKCS#8 PEM (RSA) or the base64
    of the 32-byte seed (Ed25519), encrypted with the store key; public key as the base64 of
    the DNS record's ``p=``."""

    __tablename__ = "dkim_keys"
    __table_args__ = (
        UniqueConstraint("domain", "selector"),
        CheckConstraint(_in("algorithm", DKIM_ALGORITHMS), name="algorithm"),
    )

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    domain: Mapped[str] = mapped_column(String(253))
    selector: Mapped[str] = mapped_column(String(63))
    algorithm: Mapped[str] = mapped_column(String(16))
    private_key: Mapped[str] = mapped_column(EncryptedText())
    public_key: Mapped[str] = mapped_column(Text)
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class RouteSetupRow(Base):
    """Onboarding progress of a route: ownership proof, preparation, last DNS check."""

    __tablename__ = "route_setup"

    route_id: Mapped[str] = mapped_column(
        String(64), ForeignKey("email_routes.id", ondelete="CASCADE"), primary_key=True
    )
    ownership_verified_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    prepared_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    checked_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class IdempotencyRow(Base):
    """The remembered reply to one Idempotency-Key of one caller (status NULL: in progress)."""

    __tablename__ = "idempotency_keys"
    __table_args__ = (Index(None, "created_at"),)

    scope: Mapped[str] = mapped_column(String(64), primary_key=True)
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    method: Mapped[str] = mapped_column(String(8))
    path: Mapped[str] = mapped_column(String(512))
    body_hash: Mapped[str] = mapped_column(String(64))
    status: Mapped[int | None] = mapped_column(Integer)
    response: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


DELIVERY_EVENTS = ("accepted", "delivered", "deferred", "bounced", "expired", "deleted")


class DeliveryEventRow(Base):
    """One thing that happened to one recipient of a queued message."""

    __tablename__ = "delivery_events"
    __table_args__ = (
        Index(None, "queue_id"),
        Index(None, "recipient"),
        Index(None, "created_at"),
        CheckConstraint(_in("event", DELIVERY_EVENTS), name="event"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    queue_id: Mapped[str] = mapped_column(String(64))
    recipient: Mapped[str] = mapped_column(String(320))
    event: Mapped[str] = mapped_column(String(16))
    detail: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class AuditEventRow(Base):
    """One thing done to the control plane that must stay on record: an operator's override
    (a route status set by hand, a connector address outside the device networks), an
    ownership proof and the claims it dropped."""

    __tablename__ = "audit_events"
    __table_args__ = (Index(None, "created_at"), Index(None, "subject"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    actor: Mapped[str] = mapped_column(String(64))
    action: Mapped[str] = mapped_column(String(64))
    subject: Mapped[str] = mapped_column(String(320))
    detail: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class OutboundMessageRow(Base):
    """A message a device relayed (`edge.outbound`): which device, under which queue id. Its
    delivery events are the `delivery_events` rows of that queue id. `message_key`
    (`edge.outbound.resend`) is set once the message is spooled: a resend is recognised by it."""

    __tablename__ = "outbound_messages"
    __table_args__ = (
        Index(None, "device_id"),
        Index(None, "account_id"),
        Index(None, "device_id", "message_key"),
    )

    queue_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    device_id: Mapped[str] = mapped_column(String(64))
    account_id: Mapped[str] = mapped_column(String(64))
    sender: Mapped[str] = mapped_column(String(320))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    message_key: Mapped[str | None] = mapped_column(String(64), nullable=True, default=None)
