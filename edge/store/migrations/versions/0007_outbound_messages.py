"""Outbound messages: which device relayed each queue id (for its delivery events).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07

No foreign key to the device: the record of what a device sent outlives the device.

A migration is frozen once released: it must never import the ORM models (they move on) and
must never be edited to change the schema; add a new revision instead.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "outbound_messages",
        sa.Column("queue_id", sa.String(length=64), nullable=False),
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("account_id", sa.String(length=64), nullable=False),
        sa.Column("sender", sa.String(length=320), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("queue_id", name=op.f("pk_outbound_messages")),
    )
    op.create_index(op.f("ix_outbound_messages_device_id"), "outbound_messages", ["device_id"])
    op.create_index(op.f("ix_outbound_messages_account_id"), "outbound_messages", ["account_id"])


def downgrade() -> None:
    op.drop_table("outbound_messages")
