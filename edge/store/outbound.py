"""The store's side of the relay for devices' outbound mail: who may send as an address, which
device relayed each queued message (and, by its resend key, whether it relayed it before),
and the delivery events of those messages.

An authorized device's account owns a sender address when the address is a managed or BYOD
address assigned to one of the account's devices, or when the address's domain has a
verified route of that account that is not disabled (a claim, a route of another account or
a domain that merely ends like the routed one never counts). Addresses compare as
``edge.store.resolve`` compares them: domains case-insensitively, local parts lower-cased.

``OutboundStore`` methods are blocking, one short transaction each: run them in a worker
thread. The two the relay runs for every message (`relayed_before`, `record`) go through
SQLAlchemy Core on one connection, without an ORM session, which costs more than the query.
Nothing here decides what an SMTP client is told, and nothing here does network or DNS
work.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import insert, select
from sqlalchemy.exc import IntegrityError

from edge.store.engine import WRITE_OPTION
from edge.store.errors import Conflict
from edge.store.events import DeliveryEvent
from edge.store.models import (
    ByodAddressRow,
    DeliveryEventRow,
    DeviceRow,
    EmailRouteRow,
    ManagedAddressRow,
    OutboundMessageRow,
)
from edge.store.store import Store
from edge.store.validate import split_address

__all__ = ["MAX_EVENTS", "OutboundStore"]

MAX_EVENTS = 500
"""The most events one `events` call returns."""


class OutboundStore:
    def __init__(self, store: Store) -> None:
        self.store = store

    def sender_account(self, device_id: str, address: str) -> str | None:
        """The account of the authorized device `device_id` if that account owns `address`
        (see the module's docstring), else None (also for a device that is unknown, pending
        or revoked, and for the null sender)."""
        parts = split_address(address)
        if parts is None:
            return None
        local, domain = parts
        full = f"{local}@{domain}"
        with self.store._read() as session:
            device = session.get(DeviceRow, device_id) if len(device_id) <= 64 else None
            if device is None or device.auth_status != "authorized":
                return None
            account = device.account_id
            for table in (ManagedAddressRow, ByodAddressRow):
                owner = session.scalars(
                    select(DeviceRow.account_id)
                    .join(table, table.device_id == DeviceRow.id)
                    .where(table.address == full)
                ).first()
                if owner is not None:
                    return account if owner == account else None
            route = session.scalars(
                select(EmailRouteRow.id).where(
                    EmailRouteRow.domain == domain,
                    EmailRouteRow.account_id == account,
                    EmailRouteRow.verified_at.is_not(None),
                    EmailRouteRow.status != "disabled",
                )
            ).first()
            return account if route is not None else None

    def record(
        self,
        queue_id: str,
        device_id: str,
        account_id: str,
        sender: str,
        at: datetime,
        message_key: str | None = None,
    ) -> None:
        """Remember that `device_id` relayed the message queued as `queue_id`, with its resend
        key (`edge.outbound.resend.message_key`) if it has one: one insert. The relay calls it
        once the message is spooled, so a key never names a message the spool lacks."""
        stmt = insert(OutboundMessageRow).values(
            queue_id=queue_id,
            device_id=device_id,
            account_id=account_id,
            sender=sender[:320],
            created_at=at,
            message_key=message_key,
        )
        engine = self.store.engine
        try:
            with engine.connect().execution_options(**{WRITE_OPTION: True}) as conn:
                with conn.begin():
                    conn.execute(stmt)
        except IntegrityError as exc:
            raise Conflict("conflicts with an existing record") from exc

    def relayed_before(self, device_id: str, message_key: str, since: datetime) -> str | None:
        """The queue id of the message with `message_key` that `device_id` relayed at or after
        `since` (the earliest), or None."""
        stmt = (
            select(OutboundMessageRow.queue_id)
            .where(
                OutboundMessageRow.device_id == device_id,
                OutboundMessageRow.message_key == message_key,
                OutboundMessageRow.created_at >= since,
            )
            .order_by(OutboundMessageRow.created_at)
            .limit(1)
        )
        with self.store.engine.connect() as conn, conn.begin():
            found: str | None = conn.execute(stmt).scalar()
            return found

    def relayed_by(self, queue_id: str) -> str | None:
        """The device that relayed `queue_id`, or None if no device did."""
        with self.store._read() as session:
            row = session.get(OutboundMessageRow, queue_id) if len(queue_id) <= 64 else None
            return row.device_id if row is not None else None

    def events(
        self, *, device_id: str | None, after: int = 0, limit: int = 100
    ) -> list[DeliveryEvent]:
        """The delivery events of relayed messages with an id above `after`, oldest first, at
        most `limit` (up to `MAX_EVENTS`): those of `device_id`'s messages, or of every
        device's when it is None."""
        stmt = (
            select(DeliveryEventRow)
            .join(OutboundMessageRow, OutboundMessageRow.queue_id == DeliveryEventRow.queue_id)
            .where(DeliveryEventRow.id > after)
            .order_by(DeliveryEventRow.id)
            .limit(max(1, min(limit, MAX_EVENTS)))
        )
        if device_id is not None:
            stmt = stmt.where(OutboundMessageRow.device_id == device_id)
        with self.store._read() as session:
            return [
                DeliveryEvent(r.id, r.queue_id, r.recipient, r.event, r.detail, r.created_at)
                for r in session.scalars(stmt)
            ]
