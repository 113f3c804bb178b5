"""Spam block rules: value normalisation and the create-or-reactivate upsert.

A rule blocks a sender address (``kind="sender"``) or a whole sender domain
(``kind="domain"``) for one account; values are stored lower-case. Adding a rule that exists
reactivates it. This module must never open sessions or commit (the caller owns the
transaction) and never evaluates messages against rules.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from edge.store.ids import new_id
from edge.store.models import SPAM_RULE_ACTIONS, SPAM_RULE_KINDS, SpamRuleRow, utcnow
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
