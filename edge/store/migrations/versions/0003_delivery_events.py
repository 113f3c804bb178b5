"""Delivery events: accepted, delivered, deferred, bounced, expired, deleted per recipient.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-21

A migration is frozen once released: it must never import the ORM models (they move on) and
must never be edited to change the schema; add a new revision instead.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "delivery_events",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("queue_id", sa.String(length=64), nullable=False),
        sa.Column("recipient", sa.String(length=320), nullable=False),
        sa.Column("event", sa.String(length=16), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "event IN ('accepted', 'delivered', 'deferred', 'bounced', 'expired', 'deleted')",
            name=op.f("ck_delivery_events_event"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_delivery_events")),
    )
    op.create_index(op.f("ix_delivery_events_queue_id"), "delivery_events", ["queue_id"])
    op.create_index(op.f("ix_delivery_events_recipient"), "delivery_events", ["recipient"])
    op.create_index(op.f("ix_delivery_events_created_at"), "delivery_events", ["created_at"])


def downgrade() -> None:
    op.drop_table("delivery_events")
