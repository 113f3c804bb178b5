"""Spam block rules: value normalisation and the create-or-reactivate upsert.

A rule blocks a sender address (``kind="sender"``) or a whole sender domain
(``kind="domain"``) for one account; values are stored lower-case. Adding a rule that exists
reactivates it. A rule never covers what is served here (``refuse_served``): no domain rule
for, or above, a domain of the account's routes and addresses, a verified route of any
account, or the edge's own names (its managed domain, MX target and host name, with every
name below them); no sender rule for one of the account's own addresses. Whoever asks (a
device reporting spam, the admin key), such a rule is refused with ``ServedHere``. This module must never open sessions or commit (the caller owns the
transaction) and never evaluates messages against rules.
"""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from edge.store.errors import ServedHere
from edge.store.ids import new_id
from edge.store.models import (
    SPAM_RULE_ACTIONS,
    SPAM_RULE_KINDS,
    ByodAddressRow,
    EmailRouteRow,
    ManagedAddressRow,
    SpamRuleRow,
    utcnow,
)
from edge.store.records import SpamRule
from edge.store.validate import check_choice, normalize_domain, split_address


def check_rule(kind: object, value: object, action: object) -> tuple[str, str, str]:
    """``(kind, value, action)`` checked, with the value normalised; else ValueError."""
    kind = check_choice("kind", kind, SPAM_RULE_KINDS)
    action = check_choice("action", action, SPAM_RULE_ACTIONS)
    if kind == "sender":
        parts = split_address(value)
        if parts is None:
            raise ValueError(f"invalid sender address: {value!r}")
        return kind, f"{parts[0]}@{parts[1]}", action
    if not isinstance(value, str):
        raise ValueError("value must be a string")
    return kind, normalize_domain(value.strip().lstrip("@")), action


def _covers(rule_domain: str, domain: str) -> bool:
    """Whether a domain rule for `rule_domain` matches mail from `domain` (and subdomains)."""
    return domain == rule_domain or domain.endswith("." + rule_domain)


def refuse_served(
    session: Session, account_id: str, kind: str, value: str, edge_names: Iterable[str]
) -> None:
    """Raise ServedHere if the rule would block what the account or the edge serves."""
    if kind == "sender":
        for table in (ManagedAddressRow, ByodAddressRow):
            own = session.scalars(
                select(table.id).where(table.account_id == account_id, table.address == value)
            ).first()
            if own is not None:
                raise ServedHere(f"{value} is one of this account's own addresses")
        return
    for name in edge_names:
        name = name.strip().lower().rstrip(".")
        if name and (_covers(value, name) or _covers(name, value)):
            raise ServedHere(f"{value} is served by this edge ({name})")
    covered = or_(
        EmailRouteRow.domain == value,
        EmailRouteRow.domain.endswith("." + value, autoescape=True),
    )
    route = session.scalars(
        select(EmailRouteRow.domain)
        .where(covered)
        .where(or_(EmailRouteRow.account_id == account_id, EmailRouteRow.verified_at.is_not(None)))
        .limit(1)
    ).first()
    if route is not None:
        raise ServedHere(f"{value} would cover {route}, a domain served by this edge")
    for table in (ManagedAddressRow, ByodAddressRow):
        domain = session.scalars(
            select(table.domain)
            .where(table.account_id == account_id)
            .where(or_(table.domain == value, table.domain.endswith("." + value, autoescape=True)))
            .limit(1)
        ).first()
        if domain is not None:
            raise ServedHere(f"{value} would cover {domain}, a domain of this account")


def upsert(
    session: Session, account_id: str, kind: str, value: str, action: str, note: str, ids: list[str]
) -> SpamRule:
    """Insert the rule, or reactivate the existing one: action set, note replaced when
    non-empty, new source message ids appended (no duplicates). The row is locked while
    it is read and changed, so concurrent reactivations do not lose ids."""
    row = session.scalars(
        select(SpamRuleRow)
        .where(
            SpamRuleRow.account_id == account_id,
            SpamRuleRow.kind == kind,
            SpamRuleRow.value == value,
        )
        .with_for_update()
    ).first()
    if row is None:
        row = SpamRuleRow(
            id=new_id("rule"),
            account_id=account_id,
            kind=kind,
            value=value,
            action=action,
            note=note,
            source_message_ids=list(dict.fromkeys(ids)),
            active=True,
        )
        session.add(row)
    else:
        row.active = True
        row.action = action
        if note:
            row.note = note
        row.source_message_ids = list(dict.fromkeys([*(row.source_message_ids or []), *ids]))
        row.updated_at = utcnow()
    session.flush()
    return SpamRule.from_row(row)
