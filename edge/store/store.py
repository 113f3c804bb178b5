"""The control-plane store: accounts, devices, addresses, routes and spam rules.

``open_store(url, keys=...)`` builds an engine with the store key (``edge.store.keyring``:
the secret columns are encrypted with it), migrates the database to head and returns a
``Store``.
Every public method runs in its own short transaction on its own session, so one ``Store`` can
be shared by threads (the reactor's thread pool, the API, the SMTP server). Methods return
frozen records (``edge.store.records``), never ORM rows. Invalid values raise ``ValueError``,
missing referenced records ``NotFound``, taken names ``Conflict``.

This module must never keep module-level state, hand out sessions or rows, or block the
reactor thread by being called from it for long work (callers use a thread pool).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime

from sqlalchemy import Engine, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from edge.store import addresses as _addresses
from edge.store import claims as _claims
from edge.store import routes as _routes
from edge.store import spam_rules as _spam
from edge.store.engine import WRITE_OPTION, make_engine, upgrade_to_head
from edge.store.errors import Conflict, NotFound
from edge.store.ids import new_id
from edge.store.keyring import StoreKeys
from edge.store.models import (
    AccountRow,
    AuditEventRow,
    ByodAddressRow,
    DeviceRow,
    EmailRouteRow,
    ManagedAddressRow,
    SpamRuleRow,
    utcnow,
)
from edge.store.records import (
    Account,
    AuditEvent,
    ByodAddress,
    Device,
    EmailRoute,
    ManagedAddress,
    RecipientTarget,
    SpamRule,
)
from edge.store.resolve import awaiting_route as _awaiting_route
from edge.store.resolve import resolve_recipient as _resolve
from edge.store.resolve import routed_domain as _routed_domain
from edge.store.validate import (
    DEVICE_AUTH_STATUSES,
    check_choice,
    check_device_update,
    check_smtp_addr,
    managed_address,
    normalize_domain,
    normalize_local_part,
    optional_text,
    required_text,
)
from edge.tls import is_pin

__all__ = ["Conflict", "NotFound", "Store", "open_store"]

DEFAULT_ACCOUNT = "acct_default"


def _is_key(value: object) -> bool:
    """Whether ``value`` can be a primary key at all (lookups of junk find nothing)."""
    return isinstance(value, str) and 0 < len(value) <= 64 and "\x00" not in value


def open_store(
    url: str,
    *,
    schema: str | None = None,
    migrate: bool = True,
    keys: StoreKeys | None = None,
) -> Store:
    """Open the database at ``url``, migrate it to head, and return a ``Store`` over it.

    ``schema`` (PostgreSQL only) keeps every table in that schema, created if missing.
    ``migrate=False`` when the migrations already ran (edge.store.migrate in a child).
    ``keys`` encrypt the secrets (``edge.store.keyring``); without them the store refuses
    to read or write a secret with ``StoreKeyError``, and everything else works.
    """
    engine = make_engine(url, schema=schema, keys=keys)
    if not migrate:
        return Store(engine)
    try:
        upgrade_to_head(engine)
    except BaseException:
        engine.dispose()
        raise
    return Store(engine)


class Store:
    """Control-plane records over one engine; safe to share between threads."""

    engine: Engine

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._sessions = sessionmaker(engine, expire_on_commit=False)
        # Bumped after every committed control-plane write in this process, so caches of
        # routes, devices and rules (edge.store.cache) see this process's changes at once.
        self.generation = 0

    def close(self) -> None:
        """Close every pooled connection; the store must not be used afterwards."""
        self.engine.dispose()

    @contextmanager
    def _read(self) -> Iterator[Session]:
        with self._sessions() as session, session.begin():
            yield session

    @contextmanager
    def _write(self, *, control: bool = True) -> Iterator[Session]:
        """A write transaction; integrity errors (a lost race on a unique key) are Conflict.

        `control=False` for writes that change no route, device, address or rule (logs)."""
        try:
            with self._sessions() as session, session.begin():
                session.connection(execution_options={WRITE_OPTION: True})
                yield session
        except IntegrityError as exc:
            raise Conflict("conflicts with an existing record") from exc
        if control:
            self.generation += 1

    def _delete(self, table: type[ManagedAddressRow] | type[ByodAddressRow], key: str) -> bool:
        if not _is_key(key):
            return False
        with self._write() as session:
            row = session.get(table, key)
            if row is None:
                return False
            session.delete(row)
            return True

    # accounts

    def ensure_account(self, account_id: str = DEFAULT_ACCOUNT, name: str = "default") -> Account:
        """The account ``account_id``, created with ``name`` if it does not exist yet."""
        account_id = required_text("account_id", account_id, 64)
        for _ in range(3):
            with self._read() as session:
                row = session.get(AccountRow, account_id)
                if row is not None:
                    return Account.from_row(row)
            try:
                with self._write() as session:
                    row = AccountRow(id=account_id, name=required_text("name", name))
                    session.add(row)
                    session.flush()
                    return Account.from_row(row)
            except Conflict:
                continue  # created by someone else in the meantime: read it
        raise Conflict(f"could not create account {account_id!r}")

    def _account_for(self, account_id: str) -> str:
        default_name = "default" if account_id == DEFAULT_ACCOUNT else account_id
        return self.ensure_account(account_id, default_name).id

    # devices

    def create_device(
        self,
        name: str,
        *,
        account_id: str = DEFAULT_ACCOUNT,
        connector_smtp_addr: str = "",
        connector_username: str | None = None,
        connector_secret: str | None = None,
        auth_status: str = "authorized",
        device_id: str | None = None,
        hostname: str = "",
    ) -> Device:
        row = DeviceRow(
            id=required_text("device_id", device_id, 64) if device_id else new_id("dev"),
            name=required_text("name", name),
            hostname=(optional_text("hostname", hostname) or "").strip(),
            auth_status=check_choice("auth_status", auth_status, DEVICE_AUTH_STATUSES),
            connector_smtp_addr=check_smtp_addr(connector_smtp_addr),
            connector_username=optional_text("connector_username", connector_username),
            connector_secret=optional_text("connector_secret", connector_secret),
        )
        row.account_id = self._account_for(account_id)
        with self._write() as session:
            if session.get(DeviceRow, row.id) is not None:
                raise Conflict(f"device {row.id!r} already exists")
            session.add(row)
            session.flush()
            return Device.from_row(row)

    def get_device(self, device_id: str) -> Device | None:
        if not _is_key(device_id):
            return None
        with self._read() as session:
            row = session.get(DeviceRow, device_id)
            return Device.from_row(row) if row is not None else None

    def list_devices(self, account_id: str | None = None) -> list[Device]:
        query = select(DeviceRow).order_by(DeviceRow.created_at, DeviceRow.id)
        if account_id is not None:
            query = query.where(DeviceRow.account_id == account_id)
        with self._read() as session:
            return [Device.from_row(row) for row in session.scalars(query)]

    def update_device(self, device_id: str, **fields: object) -> Device:
        """Change some of a device's fields (name, hostname, auth_status, connector_*,
        key_hash, last_seen_at); unknown fields raise ValueError."""
        values = check_device_update(fields)
        if not _is_key(device_id):
            raise NotFound(f"no device {device_id!r}")
        with self._write() as session:
            row = session.get(DeviceRow, device_id)
            if row is None:
                raise NotFound(f"no device {device_id!r}")
            for key, value in values.items():
                setattr(row, key, value)
            session.flush()
            return Device.from_row(row)

    def set_connector_tls_pin(self, device_id: str, pin: str | None) -> Device:
        """Pin the device's connector TLS key (`edge.tls.spki_pin`; None forgets it): from
        the next delivery on, the edge sends its credentials only to that key."""
        if pin is not None and not is_pin(pin):
            raise ValueError("connector_tls_pin must be the base64 SHA-256 of an SPKI")
        if not _is_key(device_id):
            raise NotFound(f"no device {device_id!r}")
        with self._write() as session:
            row = session.get(DeviceRow, device_id)
            if row is None:
                raise NotFound(f"no device {device_id!r}")
            row.connector_tls_pin = pin
            session.flush()
            return Device.from_row(row)

    # managed addresses

    def add_managed_address(
        self, name: str, device_id: str, *, domain: str, namespace: str | None, vanity: bool = False
    ) -> ManagedAddress:
        """Reserve ``name.namespace@domain`` (``name@domain`` when vanity or no namespace)."""
        local, domain, address = managed_address(name, domain, namespace, vanity)
        with self._write() as session:
            return _addresses.insert_managed(session, local, domain, address, device_id, vanity)

    def list_managed_addresses(self, account_id: str | None = None) -> list[ManagedAddress]:
        with self._read() as session:
            return _addresses.list_managed(session, account_id)

    def delete_managed_address(self, address_id: str) -> bool:
        return self._delete(ManagedAddressRow, address_id)

    # routes (see edge.store.routes for the field rules)

    def create_route(
        self,
        domain: str,
        *,
        type: str,
        connector_id: str | None,
        connector_smtp_addr: str = "",
        delivery_mode: str = "split",
        status: str = "pending_dns",
        setup_stage: str = "ready_for_dns",
        edge_mx_target: str = "",
        account_id: str = DEFAULT_ACCOUNT,
        route_id: str | None = None,
        verified_at: datetime | None = None,
        claim_expires_at: datetime | None = None,
        claim_limit: int | None = None,
        now: datetime | None = None,
        **extra: object,
    ) -> EmailRoute:
        """A new route for ``domain``; ``extra`` may set mail_from_domain, ownership_token
        (generated if absent), previous_mx, fallback_hosts and authoritative_hosts.

        Without ``verified_at`` the route is a claim (see edge.store.claims): it lapses at
        ``claim_expires_at`` (never if None), and claims past their time are dropped first
        (``now``). A route made ``ready`` or ``active`` from the start and not as a claim
        (no ``claim_expires_at``) is the operator's own, vouched for: verified at once. The
        API never makes one so for a device (webapi.v1.ops)."""
        values = _routes.check_fields(
            {
                "type": type,
                "connector_id": connector_id,
                "connector_smtp_addr": connector_smtp_addr,
                "delivery_mode": delivery_mode,
                "status": status,
                "setup_stage": setup_stage,
                "edge_mx_target": edge_mx_target,
                **extra,
            }
        )
        row = _routes.new_row(normalize_domain(domain), route_id, values)
        row.account_id = self._account_for(account_id)
        if verified_at is None and claim_expires_at is None and row.status in ("ready", "active"):
            verified_at = now or utcnow()
        row.verified_at = verified_at
        row.claim_expires_at = None if verified_at is not None else claim_expires_at
        with self._write() as session:
            _claims.purge_expired(session, now or utcnow())
            _routes.insert(session, row, claim_limit)
            return _routes.record(session, row)

    def get_route(self, route_id: str) -> EmailRoute | None:
        if not _is_key(route_id):
            return None
        with self._read() as session:
            row = session.get(EmailRouteRow, route_id)
            return _routes.record(session, row) if row is not None else None

    def get_route_by_domain(self, domain: str, account_id: str | None = None) -> EmailRoute | None:
        """With ``account_id``, that account's route (or claim) for ``domain``; without, the
        domain's verified route, else its oldest claim."""
        try:
            domain = normalize_domain(domain)
        except ValueError:
            return None
        query = select(EmailRouteRow).where(EmailRouteRow.domain == domain)
        if account_id is not None:
            query = query.where(EmailRouteRow.account_id == account_id)
        query = query.order_by(
            EmailRouteRow.verified_at.is_(None), EmailRouteRow.created_at, EmailRouteRow.id
        )
        with self._read() as session:
            row = session.scalars(query).first()
            return _routes.record(session, row) if row is not None else None

    def list_routes(self, account_id: str | None = None) -> list[EmailRoute]:
        with self._read() as session:
            return _routes.list_records(session, account_id)

    def update_route(self, route_id: str, **fields: object) -> EmailRoute:
        """Change some of a route's fields (not its domain or account)."""
        values = _routes.check_fields(fields)
        if not _is_key(route_id):
            raise NotFound(f"no route {route_id!r}")
        with self._write() as session:
            row = session.get(EmailRouteRow, route_id)
            if row is None:
                raise NotFound(f"no route {route_id!r}")
            _routes.apply(session, row, values)
            return _routes.record(session, row)

    def override_route(
        self, route_id: str, actor: str, now: datetime, why: str, **fields: object
    ) -> EmailRoute:
        """An operator's change to a route, put on record in the audit log. Setting the
        status to ``ready`` or ``active`` vouches for the domain: the route becomes its
        verified route (other claims are dropped; Conflict if another route is verified)."""
        values = _routes.check_fields(fields)
        if not _is_key(route_id):
            raise NotFound(f"no route {route_id!r}")
        with self._write() as session:
            row = session.get(EmailRouteRow, route_id)
            if row is None:
                raise NotFound(f"no route {route_id!r}")
            if values.get("status") in ("ready", "active"):
                _claims.verify(session, row, now, actor, "status set by the operator")
            changes = ", ".join(f"{k}={v!r}" for k, v in sorted(values.items()))
            _claims.audit(session, now, actor, "route_override", row.domain, f"{why}: {changes}")
            _routes.apply(session, row, values)
            return _routes.record(session, row)

    def advance_route(
        self, route_id: str, status: str, *, actor: str, now: datetime
    ) -> tuple[EmailRoute, bool]:
        """Move a verified route forward to ``status`` as its DNS records allow (see
        ``edge.store.routes.advance``); returns the route as it is now and whether this call
        moved it. The row is read under the write lock (``FOR UPDATE`` on PostgreSQL, the
        database lock on SQLite), so when several edges check one route at once it moves
        once, from the state it is really in, and only that move goes on the audit log."""
        if not _is_key(route_id):
            raise NotFound(f"no route {route_id!r}")
        with self._write() as session:
            row = session.get(EmailRouteRow, route_id, with_for_update=True)
            if row is None:
                raise NotFound(f"no route {route_id!r}")
            old = _routes.advance(row, status, now)
            if old is not None:
                detail = f"route {row.id}: {old} -> {status} (DNS records seen by the edge)"
                _claims.audit(session, now, actor, "route_status", row.domain, detail)
            session.flush()
            return _routes.record(session, row), old is not None

    def record_event(
        self, actor: str, action: str, subject: str, detail: str, now: datetime
    ) -> None:
        """Put one event in the audit log (edge.store.claims.audit) in its own transaction."""
        with self._write(control=False) as session:
            _claims.audit(session, now, actor, action, subject, detail)

    def audit_events(self, subject: str | None = None, limit: int = 100) -> list[AuditEvent]:
        """The audit log, newest first, optionally for one subject (a domain, a device)."""
        query = select(AuditEventRow).order_by(AuditEventRow.id.desc()).limit(limit)
        if subject is not None:
            query = query.where(AuditEventRow.subject == subject)
        with self._read() as session:
            return [AuditEvent.from_row(row) for row in session.scalars(query)]

    def delete_route(self, route_id: str) -> bool:
        """Delete a route and the BYOD addresses on it."""
        if not _is_key(route_id):
            return False
        with self._write() as session:
            row = session.get(EmailRouteRow, route_id)
            if row is None:
                return False
            for address in session.scalars(
                select(ByodAddressRow).where(ByodAddressRow.route_id == route_id)
            ):
                session.delete(address)
            session.flush()
            session.delete(row)
            return True

    # BYOD addresses

    def add_byod_address(self, name: str, domain: str, device_id: str) -> ByodAddress:
        """Attach ``name@domain`` to a device; the domain must have a route (else NotFound)."""
        local, domain = normalize_local_part(name), normalize_domain(domain)
        with self._write() as session:
            return _addresses.insert_byod(session, local, domain, device_id)

    def list_byod_addresses(self, account_id: str | None = None) -> list[ByodAddress]:
        with self._read() as session:
            return _addresses.list_byod(session, account_id)

    def delete_byod_address(self, address_id: str) -> bool:
        return self._delete(ByodAddressRow, address_id)

    # spam rules

    def add_spam_rule(
        self,
        kind: str,
        value: str,
        *,
        action: str = "reject",
        note: str = "",
        source_message_ids: list[str] | None = None,
        account_id: str = DEFAULT_ACCOUNT,
        edge_names: Iterable[str] = (),
    ) -> SpamRule:
        """Create a rule, or reactivate the existing (kind, value) rule: its action is set,
        its note replaced when ``note`` is non-empty, and new source message ids appended.

        ``ServedHere`` if it would block a domain the account or the edge serves (the
        account's and every verified route, ``edge_names`` and the names below them) or
        one of the account's own addresses (see edge.store.spam_rules)."""
        kind, value, action = _spam.check_rule(kind, value, action)
        if not isinstance(note, str):
            raise ValueError("note must be a string")
        ids = [str(m) for m in source_message_ids or []]
        account_id = self._account_for(account_id)
        for attempt in range(2):
            try:
                with self._write() as session:
                    _spam.refuse_served(session, account_id, kind, value, edge_names)
                    return _spam.upsert(session, account_id, kind, value, action, note, ids)
            except Conflict:
                if attempt:
                    raise  # lost the insert race twice: give up
        raise AssertionError("unreachable")

    def list_spam_rules(
        self, account_id: str | None = None, active_only: bool = True
    ) -> list[SpamRule]:
        query = select(SpamRuleRow).order_by(SpamRuleRow.created_at, SpamRuleRow.id)
        if account_id is not None:
            query = query.where(SpamRuleRow.account_id == account_id)
        if active_only:
            query = query.where(SpamRuleRow.active.is_(True))
        with self._read() as session:
            return [SpamRule.from_row(row) for row in session.scalars(query)]

    def delete_spam_rule(self, rule_id: str) -> bool:
        """Deactivate a rule (adding it again reactivates it); False if absent or inactive."""
        if not _is_key(rule_id):
            return False
        with self._write() as session:
            row = session.get(SpamRuleRow, rule_id)
            if row is None or not row.active:
                return False
            row.active = False
            row.updated_at = utcnow()
            return True

    # recipient resolution

    def resolve_recipient(self, address: str) -> RecipientTarget | None:
        """Where mail for ``address`` goes (see edge.store.resolve); None if nobody takes it."""
        with self._read() as session:
            return _resolve(session, address)

    def awaiting_route(self, address: str) -> bool:
        """Whether ``address`` is refused only until its domain's verified route becomes
        active (see edge.store.resolve): a temporary refusal, not a permanent one."""
        with self._read() as session:
            return _awaiting_route(session, address)

    def routed_domain(self, domain: str) -> bool:
        """Whether ``domain`` has a verified, active route (see edge.store.resolve)."""
        with self._read() as session:
            return _routed_domain(session, domain)
