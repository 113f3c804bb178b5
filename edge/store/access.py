"""Who may use the control API, and the records of onboarding: device registrations and
API keys, DKIM keys and route setup progress.

``AccessStore`` works on the same engine as ``edge.store.Store``; every method is one short
transaction and returns frozen records. API keys and poll secrets are random 256-bit tokens
of which only the SHA-256 is stored; the plain value is returned once, to the one caller that
asked for it. Time comes from the injected ``now``. This module must never log or keep a
plain key, never hand out ORM rows, and never do network or DNS work.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import select

from edge.store.errors import Conflict, NotFound
from edge.store.ids import new_id
from edge.store.models import (
    AccountRow,
    DeviceKeyRow,
    DeviceRow,
    DkimKeyRow,
    RegistrationRow,
    RouteSetupRow,
    utcnow,
)
from edge.store.records import Device
from edge.store.store import Store
from edge.store.validate import check_smtp_addr, required_text

__all__ = [
    "AccessStore",
    "DkimKey",
    "Issued",
    "PollRefused",
    "Registration",
    "RouteSetup",
    "hash_secret",
]

_CODE_ALPHABET = "ABCDEFGHJKMNPQRSTVWXYZ23456789"


class PollRefused(Exception):
    """A registration was polled with the wrong poll secret."""


def hash_secret(value: str) -> str:
    """The stored form of a key or poll secret (they are random, so a plain SHA-256 fits)."""
    return hashlib.sha256(value.encode("utf-8")).hexdigest()


def new_code() -> str:
    """A short approval code a person can read out, e.g. ``K7QX-M2PD``."""
    raw = "".join(secrets.choice(_CODE_ALPHABET) for _ in range(8))
    return f"{raw[:4]}-{raw[4:]}"


def normalize_code(code: str) -> str:
    cleaned = "".join(ch for ch in code.upper() if ch.isalnum())
    return f"{cleaned[:4]}-{cleaned[4:]}" if len(cleaned) == 8 else code.strip().upper()


@dataclass(frozen=True)
class Registration:
    id: str
    device_id: str
    code: str
    created_at: datetime
    expires_at: datetime
    approved_at: datetime | None


@dataclass(frozen=True)
class Issued:
    """What an approved device receives, once per poll: its key and connector secret."""

    device: Device
    key: str = field(repr=False)


@dataclass(frozen=True)
class DkimKey:
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
class RouteSetup:
    route_id: str
    ownership_verified_at: datetime | None = None
    prepared_at: datetime | None = None
    checked_at: datetime | None = None


def _registration(row: RegistrationRow) -> Registration:
    return Registration(
        row.id, row.device_id, row.code, row.created_at, row.expires_at, row.approved_at
    )


class AccessStore:
    """Registrations, device keys, DKIM keys, route setup and idempotency over a ``Store``."""

    def __init__(self, store: Store, now: Callable[[], datetime] = utcnow) -> None:
        self.store = store
        self.now = now

    # -- registrations -----------------------------------------------------------------------

    def register(
        self, name: str, hostname: str, connector_smtp_addr: str, ttl: float
    ) -> tuple[Registration, str]:
        """A pending device in an account of its own, and its registration; returns the
        registration and the plain poll secret (only its hash is kept)."""
        name = required_text("name", name, 64)
        check_smtp_addr(connector_smtp_addr)
        account = self.store.ensure_account(new_id("acct"), name)
        device = self.store.create_device(
            name,
            account_id=account.id,
            hostname=hostname,
            connector_smtp_addr=connector_smtp_addr,
            auth_status="pending",
        )
        poll = "tpr_" + secrets.token_urlsafe(32)
        now = self.now()
        for _ in range(5):
            try:
                with self.store._write() as session:
                    row = RegistrationRow(
                        id=new_id("reg"),
                        device_id=device.id,
                        code=new_code(),
                        poll_hash=hash_secret(poll),
                        created_at=now,
                        expires_at=now + timedelta(seconds=ttl),
                    )
                    session.add(row)
                    session.flush()
                    return _registration(row), poll
            except Conflict:
                continue  # the code was taken: draw another
        raise Conflict("could not allocate an approval code")

    def registrations(self) -> list[Registration]:
        with self.store._read() as session:
            query = select(RegistrationRow).order_by(RegistrationRow.created_at)
            return [_registration(row) for row in session.scalars(query)]

    def find_registration(self, ref: str) -> Registration | None:
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
            return _registration(row) if row is not None else None

    def approve(self, ref: str, account_id: str | None = None) -> Device:
        """Authorize the device of a registration (by code, registration or device id); with
        ``account_id`` it joins that existing account instead of keeping its own."""
        reg = self.find_registration(ref)
        device = self.store.get_device(reg.device_id if reg else ref)
        if device is None:
            raise NotFound(f"no registration or device {ref!r}")
        if device.auth_status == "revoked":
            raise Conflict(f"device {device.id} was revoked; it must register again")
        if reg is not None and reg.approved_at is None and reg.expires_at <= self.now():
            raise Conflict(f"registration {reg.code} has expired; the device must start again")
        with self.store._write() as session:
            row = session.get(DeviceRow, device.id)
            if row is None:
                raise NotFound(f"no device {device.id!r}")
            if account_id is not None and account_id != row.account_id:
                if session.get(AccountRow, account_id) is None:
                    raise NotFound(f"no account {account_id!r}")
                old = row.account_id
                row.account_id = account_id
                session.flush()
                if not session.scalars(
                    select(DeviceRow.id).where(DeviceRow.account_id == old)
                ).first():
                    orphan = session.get(AccountRow, old)
                    if orphan is not None:
                        session.delete(orphan)
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
            reg = _registration(row)
        device = self.store.get_device(reg.device_id)
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
            return [
                DkimKey(
                    r.id,
                    r.domain,
                    r.selector,
                    r.algorithm,
                    r.public_key,
                    r.private_key,
                    r.created_at,
                )
                for r in session.scalars(query)
            ]

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
            return DkimKey(
                row.id, domain, selector, algorithm, public_b64, private_pem, row.created_at
            )

    # -- route setup -------------------------------------------------------------------------

    def route_setup(self, route_id: str) -> RouteSetup:
        with self.store._read() as session:
            row = session.get(RouteSetupRow, route_id)
            if row is None:
                return RouteSetup(route_id)
            return RouteSetup(route_id, row.ownership_verified_at, row.prepared_at, row.checked_at)

    def mark_route(
        self, route_id: str, *, ownership: bool = False, prepared: bool = False
    ) -> RouteSetup:
        """Record progress (never undone here): a DNS check, ownership proven, preparation."""
        now = self.now()
        with self.store._write() as session:
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
            return RouteSetup(route_id, row.ownership_verified_at, row.prepared_at, row.checked_at)
