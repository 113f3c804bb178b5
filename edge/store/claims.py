"""Who may route a domain: claims, the ownership proof that turns one into the domain's route,
and the audit log of what was decided, used inside ``Store`` and ``AccessStore`` transactions.

Any account may claim a domain (a route with ``verified_at`` NULL); a claim never takes mail
(``edge.store.resolve`` only follows verified, active routes), never blocks another account's
claim, and lapses at ``claim_expires_at``. The first account whose ownership TXT record the
edge finds gets its route verified; every other claim on that domain is dropped in the same
transaction, and a partial unique index makes sure no second route of the domain is ever
verified. This module must never open sessions or commit (the caller owns the transaction),
never do DNS lookups, and never decide on its own that a domain is owned: it records what the
caller proved.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from edge.store.errors import Conflict
from edge.store.models import AuditEventRow, EmailRouteRow

__all__ = ["ClaimLimit", "audit", "check_claim", "purge_expired", "verify"]


class ClaimLimit(Conflict):
    """The account holds as many unproven claims as it may."""


def audit(
    session: Session, now: datetime, actor: str, action: str, subject: str, detail: str = ""
) -> None:
    """Put one event on record (in the caller's transaction)."""
    session.add(
        AuditEventRow(
            actor=actor[:64],
            action=action[:64],
            subject=subject[:320],
            detail=detail[:2000],
            created_at=now,
        )
    )


def purge_expired(session: Session, now: datetime) -> int:
    """Delete every unproven claim whose time is up; returns how many went."""
    result = session.execute(
        delete(EmailRouteRow)
        .where(
            EmailRouteRow.verified_at.is_(None),
            EmailRouteRow.claim_expires_at.is_not(None),
            EmailRouteRow.claim_expires_at <= now,
        )
        .execution_options(synchronize_session=False)
    )
    return int(getattr(result, "rowcount", 0) or 0)


def _verified(session: Session, domain: str) -> EmailRouteRow | None:
    return session.scalars(
        select(EmailRouteRow).where(
            EmailRouteRow.domain == domain, EmailRouteRow.verified_at.is_not(None)
        )
    ).first()


def check_claim(session: Session, row: EmailRouteRow, limit: int | None) -> None:
    """Refuse a new route for a domain another account's route is verified for, a second
    route of one account for one domain, and claims beyond ``limit`` per account."""
    same = select(EmailRouteRow.id).where(
        EmailRouteRow.domain == row.domain, EmailRouteRow.account_id == row.account_id
    )
    if session.scalars(same).first() is not None:
        raise Conflict(f"a route for {row.domain} already exists")
    if _verified(session, row.domain) is not None:
        raise Conflict(f"a route for {row.domain} already exists")
    if row.verified_at is None and limit is not None:
        held = session.scalar(
            select(func.count())
            .select_from(EmailRouteRow)
            .where(EmailRouteRow.account_id == row.account_id, EmailRouteRow.verified_at.is_(None))
        )
        if (held or 0) >= limit:
            raise ClaimLimit(f"account {row.account_id} already holds {limit} unproven claims")


def verify(session: Session, row: EmailRouteRow, now: datetime, actor: str, why: str) -> list[str]:
    """Make ``row`` its domain's verified route and drop every other claim on the domain;
    returns the dropped routes' ids. Conflict if another route of the domain is verified."""
    if row.verified_at is not None:
        return []
    other = _verified(session, row.domain)
    if other is not None and other.id != row.id:
        raise Conflict(f"{row.domain} is verified for another account")
    row.verified_at = now
    row.claim_expires_at = None
    row.updated_at = now
    losers = list(
        session.scalars(
            select(EmailRouteRow).where(
                EmailRouteRow.domain == row.domain,
                EmailRouteRow.id != row.id,
                EmailRouteRow.verified_at.is_(None),
            )
        )
    )
    for loser in losers:
        session.delete(loser)
    session.flush()
    audit(session, now, actor, "domain_verified", row.domain, f"route {row.id}: {why}")
    for loser in losers:
        audit(
            session,
            now,
            actor,
            "claim_dropped",
            row.domain,
            f"route {loser.id} of account {loser.account_id} lost to {row.account_id}",
        )
    return [loser.id for loser in losers]
