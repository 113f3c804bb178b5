"""Who may use the control API, and the records of onboarding: device registrations and
API keys, DKIM keys and route setup progress.

``AccessStore`` works on the same engine as ``edge.store.Store``; every method is one short
transaction and returns frozen records. API keys and poll secrets are random 256-bit tokens
of which only the SHA-256 is stored; the plain value is returned once, to the one caller that
asked for it. A registration is one row until an operator approves it (the device and its
account are made then), and registrations are counted per source address and in total over
a window, in the database, so the limit holds across every edge sharing it. Time comes from
the injected ``now``. This module must never log or keep a plain key, never hand out ORM
rows, and never do network or DNS work.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, func, select, text

from edge.runtime.adminkeys import hash_secret
from edge.store import claims
from edge.store import routes as _routes
from edge.store.errors import Conflict, NotFound
from edge.store.ids import new_id
from edge.store.models import (
    AccountRow,
    DeviceKeyRow,
    DeviceRow,
    DkimKeyRow,
    EmailRouteRow,
    RegistrationRow,
    RouteSetupRow,
    utcnow,
)
from edge.store.records import Device, EmailRoute, StoreRecord
from edge.store.store import Store
from edge.store.validate import check_smtp_addr, optional_text, required_text
from edge.tls import is_pin

__all__ = [
    "AccessStore",
    "DkimKey",
    "Issued",
    "PollRefused",
    "RateLimited",
    "RegistrationLimits",
    "RegistrationRecord",
    "RouteSetup",
    "hash_secret",
]

_CODE_ALPHABET = "ABCDEFGHJKMNPQRSTVWXYZ23456789"
# Arbitrary constant naming the registration counter among PostgreSQL advisory locks.
_PG_REGISTRATION_LOCK = 0x7A11_0E61


class PollRefused(Exception):
    """A registration was polled with the wrong poll secret."""


class RateLimited(Exception):
    """Too many registrations from one source, or in total, within the window."""

    def __init__(self, scope: str, retry_after: float) -> None:
        super().__init__(f"too many registrations ({scope}); retry in {retry_after:.0f} s")
        self.scope = scope
        self.retry_after = retry_after


@dataclass(frozen=True)
class RegistrationLimits:
    """How many registrations one source address, and everyone together, may start within
    ``window`` seconds (approved or not: every one counts until the window has passed)."""

    per_source: int = 5
    total: int = 100
    window: float = 3600.0


def new_code() -> str:
    """A short approval code a person can read out, e.g. ``K7QX-M2PD``."""
    raw = "".join(secrets.choice(_CODE_ALPHABET) for _ in range(8))
    return f"{raw[:4]}-{raw[4:]}"


def normalize_code(code: str) -> str:
    cleaned = "".join(ch for ch in code.upper() if ch.isalnum())
    return f"{cleaned[:4]}-{cleaned[4:]}" if len(cleaned) == 8 else code.strip().upper()


@dataclass(frozen=True)
class RegistrationRecord(StoreRecord):
    id: str
    device_id: str
    code: str
    created_at: datetime
    expires_at: datetime
    approved_at: datetime | None
    name: str = ""
    hostname: str = ""
    connector_smtp_addr: str = ""
    connector_tls_pin: str | None = None


@dataclass(frozen=True)
class Issued:
    """What an approved device receives, once per poll: its key and connector secret."""

    device: Device
    key: str = field(repr=False)


@dataclass(frozen=True)
class DkimKey(StoreRecord):
    id: str
    domain: str
    selector: str
    algorithm: str
    public_key: str
    private_key: str = field(repr=False)
    created_at: datetime | None = None

    def dns_value(self) -> str:
        """The DKIM TXT record value for this key (RFC 6376 and RFC 8463)."""
        return f"v=DKIM1; k={self.algorithm}; p={self.public_key}"


@dataclass(frozen=True)
class RouteSetup(StoreRecord):
    route_id: str
    ownership_verified_at: datetime | None = None
    prepared_at: datetime | None = None
    checked_at: datetime | None = None


class AccessStore:
    """Registrations, device keys, DKIM keys, route setup and idempotency over a ``Store``."""

    def __init__(self, store: Store, now: Callable[[], datetime] = utcnow) -> None:
        self.store = store
        self.now = now

    # -- registrations -----------------------------------------------------------------------

    def register(
        self,
        name: str,
        hostname: str,
        connector_smtp_addr: str,
        ttl: float,
        source: str = "",
        limits: RegistrationLimits | None = None,
        connector_tls_pin: str | None = None,
    ) -> tuple[RegistrationRecord, str]:
        """A pending registration (nothing else is made until approval); returns it and the
        plain poll secret (only its hash is kept). RateLimited past ``limits``.
        ``connector_tls_pin``: the pin of the device connector's TLS key, pinned at approval."""
        name = required_text("name", name, 64)
        if connector_tls_pin is not None and not is_pin(connector_tls_pin):
            raise ValueError("connector_tls_pin must be the base64 SHA-256 of an SPKI")
        hostname = (optional_text("hostname", hostname) or "").strip()
        check_smtp_addr(connector_smtp_addr)
        limits = limits or RegistrationLimits()
        poll = "tpr_" + secrets.token_urlsafe(32)
        now = self.now()
        for _ in range(5):
            try:
                with self.store._write(control=False) as session:
                    self._count(session, source[:64], limits, now)
                    row = RegistrationRow(
                        id=new_id("reg"),
                        device_id=new_id("dev"),
                        code=new_code(),
                        poll_hash=hash_secret(poll),
                        name=name,
                        hostname=hostname[:255],
                        connector_smtp_addr=connector_smtp_addr.strip(),
                        connector_tls_pin=connector_tls_pin,
                        source=source[:64],
                        created_at=now,
                        expires_at=now + timedelta(seconds=ttl),
                    )
                    session.add(row)
                    session.flush()
                    return RegistrationRecord.from_row(row), poll
            except RateLimited:
                raise
            except Conflict:
                continue  # the code was taken: draw another
        raise Conflict("could not allocate an approval code")

    @staticmethod
    def _count(session: Any, source: str, limits: RegistrationLimits, now: datetime) -> None:
        """Drop lapsed registrations out of the window, then refuse one past a limit."""
        if session.get_bind().dialect.name == "postgresql":
            # Serialise the count and the insert across edges sharing the database.
            session.execute(
                text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_REGISTRATION_LOCK}
            )
        since = now - timedelta(seconds=limits.window)
        session.execute(
            delete(RegistrationRow)
            .where(
                RegistrationRow.approved_at.is_(None),
                RegistrationRow.expires_at <= now,
                RegistrationRow.created_at <= since,
            )
            .execution_options(synchronize_session=False)
        )
        recent = select(func.count(), func.min(RegistrationRow.created_at)).where(
            RegistrationRow.created_at > since
        )
        for scope, query, limit in (
            (
                "from this address",
                recent.where(RegistrationRow.source == source),
                limits.per_source,
            ),
            ("on this edge", recent, limits.total),
        ):
            count, oldest = session.execute(query).one()
            if count >= limit:
                wait = (oldest + timedelta(seconds=limits.window) - now).total_seconds()
                raise RateLimited(scope, max(1.0, wait))

    def registrations(self) -> list[RegistrationRecord]:
        with self.store._read() as session:
            query = select(RegistrationRow).order_by(RegistrationRow.created_at)
            return [RegistrationRecord.from_row(row) for row in session.scalars(query)]

    def find_registration(self, ref: str) -> RegistrationRecord | None:
        """A registration by its id, its code (any case, dash optional) or its device id."""
        if not isinstance(ref, str) or not 0 < len(ref) <= 64:
            return None
        with self.store._read() as session:
            query = select(RegistrationRow).where(
                (RegistrationRow.id == ref)
                | (RegistrationRow.code == normalize_code(ref))
                | (RegistrationRow.device_id == ref)
            )
            row = session.scalars(query.order_by(RegistrationRow.created_at.desc())).first()
            return RegistrationRecord.from_row(row) if row is not None else None

    def approve(self, ref: str, account_id: str | None = None) -> Device:
        """Authorize the device of a registration (by code, registration or device id): the
        device and, unless it joins the existing ``account_id``, its own account are made
        now. Approving an approved device again (or one made before registrations held
        their own data) authorizes it in place."""
        reg = self.find_registration(ref)
        device = self.store.get_device(reg.device_id if reg else ref)
        if device is None and reg is None:
            raise NotFound(f"no registration or device {ref!r}")
        if device is not None and device.auth_status == "revoked":
            raise Conflict(f"device {device.id} was revoked; it must register again")
        if reg is not None and reg.approved_at is None and reg.expires_at <= self.now():
            raise Conflict(f"registration {reg.code} has expired; the device must start again")
        with self.store._write() as session:
            if account_id is not None and session.get(AccountRow, account_id) is None:
                raise NotFound(f"no account {account_id!r}")
            if device is None:
                assert reg is not None
                row = self._create_device(session, reg, account_id)
            else:
                found = session.get(DeviceRow, device.id)
                if found is None:
                    raise NotFound(f"no device {device.id!r}")
                row = found
                self._move(session, row, account_id)
            row.auth_status = "authorized"
            if not row.connector_secret:
                row.connector_username = "edge"
                row.connector_secret = secrets.token_urlsafe(24)
            if reg is not None:
                reg_row = session.get(RegistrationRow, reg.id)
                if reg_row is not None and reg_row.approved_at is None:
                    reg_row.approved_at = self.now()
            session.flush()
            return Device.from_row(row)

    def _create_device(
        self, session: Any, reg: RegistrationRecord, account_id: str | None
    ) -> DeviceRow:
        now = self.now()
        if account_id is None:
            account = AccountRow(id=new_id("acct"), name=reg.name or "device", created_at=now)
            session.add(account)
            session.flush()
            account_id = account.id
        row = DeviceRow(
            id=reg.device_id,
            account_id=account_id,
            name=reg.name or "device",
            hostname=reg.hostname,
            auth_status="pending",
            connector_smtp_addr=reg.connector_smtp_addr,
            connector_tls_pin=reg.connector_tls_pin,
            created_at=now,
        )
        session.add(row)
        session.flush()
        return row

    @staticmethod
    def _move(session: Any, row: DeviceRow, account_id: str | None) -> None:
        """Move a device into ``account_id``; its old account goes if it is left empty."""
        if account_id is None or account_id == row.account_id:
            return
        old = row.account_id
        row.account_id = account_id
        session.flush()
        if not session.scalars(select(DeviceRow.id).where(DeviceRow.account_id == old)).first():
            orphan = session.get(AccountRow, old)
            if orphan is not None:
                session.delete(orphan)

    def poll(self, registration_id: str, poll_secret: str) -> tuple[str, Issued | None]:
        """The state of a registration for the device holding its poll secret: ``pending``,
        ``expired``, ``revoked`` or ``authorized`` (then with a freshly issued key; keys
        issued to this registration before are revoked, as their reply may have been lost)."""
        with self.store._read() as session:
            row = (
                session.get(RegistrationRow, registration_id)
                if len(registration_id) <= 64
                else None
            )
            if row is None:
                raise NotFound(f"no registration {registration_id!r}")
            if not secrets.compare_digest(row.poll_hash, hash_secret(poll_secret)):
                raise PollRefused("the poll secret does not match")
            reg = RegistrationRecord.from_row(row)
        device = self.store.get_device(reg.device_id)
        if device is None and reg.approved_at is None:
            return ("expired" if reg.expires_at <= self.now() else "pending"), None
        if device is None or device.auth_status == "revoked":
            return "revoked", None
        if device.auth_status != "authorized":
            return ("expired" if reg.expires_at <= self.now() else "pending"), None
        key = self.issue_key(device.id, registration_id=reg.id)
        return "authorized", Issued(device, key)

    # -- device keys -------------------------------------------------------------------------

    def issue_key(self, device_id: str, registration_id: str | None = None) -> str:
        """A new key for an authorized device (returned once; only its hash is kept)."""
        key = "tpk_" + secrets.token_urlsafe(32)
        now = self.now()
        with self.store._write() as session:
            device = session.get(DeviceRow, device_id)
            if device is None or device.auth_status != "authorized":
                raise NotFound(f"no authorized device {device_id!r}")
            if registration_id is not None:
                for old in session.scalars(
                    select(DeviceKeyRow).where(
                        DeviceKeyRow.registration_id == registration_id,
                        DeviceKeyRow.revoked_at.is_(None),
                    )
                ):
                    old.revoked_at = now
            session.add(
                DeviceKeyRow(
                    id=new_id("key"),
                    device_id=device_id,
                    key_hash=hash_secret(key),
                    prefix=key[:12],
                    registration_id=registration_id,
                    created_at=now,
                )
            )
        return key

    def authenticate(self, key: str) -> Device | None:
        """The authorized device whose live key this is, else None."""
        if not isinstance(key, str) or not key.startswith("tpk_") or len(key) > 128:
            return None
        with self.store._read() as session:
            found = session.execute(
                select(DeviceRow)
                .join(DeviceKeyRow, DeviceKeyRow.device_id == DeviceRow.id)
                .where(DeviceKeyRow.key_hash == hash_secret(key), DeviceKeyRow.revoked_at.is_(None))
            ).first()
            if found is None or found[0].auth_status != "authorized":
                return None
            return Device.from_row(found[0])

    def revoke_device(self, device_id: str) -> Device:
        """Revoke a device and every key it holds; its mail is refused from now on."""
        now = self.now()
        with self.store._write() as session:
            row = session.get(DeviceRow, device_id) if len(device_id) <= 64 else None
            if row is None:
                raise NotFound(f"no device {device_id!r}")
            row.auth_status = "revoked"
            for key in session.scalars(
                select(DeviceKeyRow).where(
                    DeviceKeyRow.device_id == device_id, DeviceKeyRow.revoked_at.is_(None)
                )
            ):
                key.revoked_at = now
            session.flush()
            return Device.from_row(row)

    # -- DKIM keys ---------------------------------------------------------------------------

    def dkim_keys(self, domain: str) -> list[DkimKey]:
        with self.store._read() as session:
            query = (
                select(DkimKeyRow)
                .where(DkimKeyRow.domain == domain, DkimKeyRow.active.is_(True))
                .order_by(DkimKeyRow.algorithm.desc(), DkimKeyRow.selector)
            )
            return [DkimKey.from_row(r) for r in session.scalars(query)]

    def add_dkim_key(
        self, domain: str, selector: str, algorithm: str, private_pem: str, public_b64: str
    ) -> DkimKey:
        with self.store._write() as session:
            row = DkimKeyRow(
                id=new_id("dkim"),
                domain=domain,
                selector=selector,
                algorithm=algorithm,
                private_key=private_pem,
                public_key=public_b64,
                active=True,
                created_at=self.now(),
            )
            session.add(row)
            session.flush()
            return DkimKey.from_row(row)

    # -- route setup -------------------------------------------------------------------------

    def route_setup(self, route_id: str) -> RouteSetup:
        with self.store._read() as session:
            row = session.get(RouteSetupRow, route_id)
            if row is None:
                return RouteSetup(route_id)
            return RouteSetup.from_row(row)

    def routes_to_check(self, limit: int, checked_before: datetime) -> list[EmailRoute]:
        """At most ``limit`` routes on their way to ``active``: verified, prepared (their DKIM
        keys made), in ``pending_dns`` or ``ready``, and not checked since ``checked_before``;
        the longest unchecked first. Claims and disabled routes are never among them. The
        records carry the route's own connector address only (not its device's)."""
        query = (
            select(EmailRouteRow, RouteSetupRow.checked_at)
            .join(RouteSetupRow, RouteSetupRow.route_id == EmailRouteRow.id)
            .where(
                EmailRouteRow.verified_at.is_not(None),
                EmailRouteRow.status.in_(_routes.PROGRESS[:-1]),
                RouteSetupRow.prepared_at.is_not(None),
                RouteSetupRow.checked_at.is_(None) | (RouteSetupRow.checked_at < checked_before),
            )
            .order_by(RouteSetupRow.checked_at.asc().nulls_first(), EmailRouteRow.id)
            .limit(max(0, limit))
        )
        with self.store._read() as session:
            rows = session.execute(query).all()
            return [EmailRoute.from_row(row, "", checked) for row, checked in rows]

    def mark_route(
        self, route_id: str, *, ownership: bool = False, prepared: bool = False, actor: str = ""
    ) -> RouteSetup:
        """Record progress (never undone here): a DNS check, ownership proven, preparation.

        Proven ownership makes the route its domain's verified route and drops every other
        account's claim on the domain (``edge.store.claims.verify``); Conflict if another
        account's route for the domain is verified already."""
        now = self.now()
        with self.store._write() as session:
            if ownership:
                route = session.get(EmailRouteRow, route_id)
                if route is None:
                    raise NotFound(f"no route {route_id!r}")
                claims.verify(session, route, now, actor or "edge", "ownership TXT record found")
            row = session.get(RouteSetupRow, route_id)
            if row is None:
                row = RouteSetupRow(route_id=route_id)
                session.add(row)
            row.checked_at = now
            if ownership and row.ownership_verified_at is None:
                row.ownership_verified_at = now
            if prepared and row.prepared_at is None:
                row.prepared_at = now
            session.flush()
            return RouteSetup.from_row(row)
