"""Managed and BYOD mailbox addresses: inserts and listings, used by ``Store``.

An address is unique across both kinds: a managed address can never shadow a BYOD one or the
other way round. The records carry the owning device's current connector address. This
module must never open sessions or commit; the caller owns the transaction.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from edge.store.errors import Conflict, NotFound
from edge.store.ids import new_id
from edge.store.models import ByodAddressRow, DeviceRow, EmailRouteRow, ManagedAddressRow
from edge.store.records import ByodAddress, ManagedAddress


def _check_free(session: Session, address: str) -> None:
    for table in (ManagedAddressRow, ByodAddressRow):
        if session.scalars(select(table.id).where(table.address == address)).first():
            raise Conflict(f"address {address} is already taken")


def _device(session: Session, device_id: str) -> DeviceRow:
    device = session.get(DeviceRow, device_id) if isinstance(device_id, str) else None
    if device is None:
        raise NotFound(f"no device {device_id!r}")
    return device


def insert_managed(
    session: Session, local: str, domain: str, address: str, device_id: str, vanity: bool
) -> ManagedAddress:
    device = _device(session, device_id)
    _check_free(session, address)
    row = ManagedAddressRow(
        id=new_id("addr"),
        account_id=device.account_id,
        name=local,
        address=address,
        domain=domain,
        device_id=device.id,
        vanity=bool(vanity),
    )
    session.add(row)
    session.flush()
    return ManagedAddress.from_row(row, connector_smtp_addr=device.connector_smtp_addr)


def insert_byod(session: Session, local: str, domain: str, device_id: str) -> ByodAddress:
    route = session.scalars(select(EmailRouteRow).where(EmailRouteRow.domain == domain)).first()
    if route is None:
        raise NotFound(f"no route for domain {domain}")
    device = _device(session, device_id)
    if device.account_id != route.account_id:
        raise Conflict(f"device {device_id!r} and the route for {domain} differ in account")
    address = f"{local}@{domain}"
    _check_free(session, address)
    row = ByodAddressRow(
        id=new_id("byod"),
        account_id=route.account_id,
        name=local,
        address=address,
        domain=domain,
        route_id=route.id,
        device_id=device.id,
    )
    session.add(row)
    session.flush()
    return ByodAddress.from_row(row, connector_smtp_addr=device.connector_smtp_addr)


def list_managed(session: Session, account_id: str | None) -> list[ManagedAddress]:
    query = (
        select(ManagedAddressRow, DeviceRow.connector_smtp_addr)
        .join(DeviceRow, DeviceRow.id == ManagedAddressRow.device_id)
        .order_by(ManagedAddressRow.created_at, ManagedAddressRow.id)
    )
    if account_id is not None:
        query = query.where(ManagedAddressRow.account_id == account_id)
    return [
        ManagedAddress.from_row(row, connector_smtp_addr=smtp)
        for row, smtp in session.execute(query)
    ]


def list_byod(session: Session, account_id: str | None) -> list[ByodAddress]:
    query = (
        select(ByodAddressRow, DeviceRow.connector_smtp_addr)
        .join(DeviceRow, DeviceRow.id == ByodAddressRow.device_id)
        .order_by(ByodAddressRow.created_at, ByodAddressRow.id)
    )
    if account_id is not None:
        query = query.where(ByodAddressRow.account_id == account_id)
    return [
        ByodAddress.from_row(row, connector_smtp_addr=smtp) for row, smtp in session.execute(query)
    ]
