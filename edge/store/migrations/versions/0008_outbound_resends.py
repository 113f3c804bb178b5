"""Outbound messages: the key of what a device relayed, so a resend is recognised.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-08

`message_key` is a digest of the message's Message-ID, envelope and content
(`edge.outbound.resend.message_key`), set once the message is in the spool; NULL for a
message relayed before this revision or without a usable Message-ID.

A migration is frozen once released: it must never import the ORM models (they move on) and
must never be edited to change the schema; add a new revision instead.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("outbound_messages", sa.Column("message_key", sa.String(length=64)))
    op.create_index(
        op.f("ix_outbound_messages_device_id_message_key"),
        "outbound_messages",
        ["device_id", "message_key"],
    )


def downgrade() -> None:
    op.drop_index(
        op.f("ix_outbound_messages_device_id_message_key"), table_name="outbound_messages"
    )
    with op.batch_alter_table("outbound_messages") as batch:
        batch.drop_column("message_key")
