"""Control API: device keys, device registrations, DKIM keys, route setup, idempotency keys.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28

A migration is frozen once released: it must never import the ORM models (they move on) and
must never be edited to change the schema; add a new revision instead.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _ts(name: str, nullable: bool = False) -> sa.Column[object]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def _device_fk(table: str) -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint(
        ["device_id"],
        ["devices.id"],
        name=op.f(f"fk_{table}_device_id_devices"),
        ondelete="CASCADE",
    )


def upgrade() -> None:
    op.create_table(
        "device_keys",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("key_hash", sa.String(length=64), nullable=False),
        sa.Column("prefix", sa.String(length=16), nullable=False),
        sa.Column("registration_id", sa.String(length=64), nullable=True),
        _ts("created_at"),
        _ts("revoked_at", nullable=True),
        _device_fk("device_keys"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_device_keys")),
        sa.UniqueConstraint("key_hash", name=op.f("uq_device_keys_key_hash")),
    )
    op.create_index(op.f("ix_device_keys_device_id"), "device_keys", ["device_id"])

    op.create_table(
        "device_registrations",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("code", sa.String(length=16), nullable=False),
        sa.Column("poll_hash", sa.String(length=64), nullable=False),
        _ts("created_at"),
        _ts("expires_at"),
        _ts("approved_at", nullable=True),
        _device_fk("device_registrations"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_device_registrations")),
        sa.UniqueConstraint("code", name=op.f("uq_device_registrations_code")),
    )
    op.create_index(
        op.f("ix_device_registrations_device_id"), "device_registrations", ["device_id"]
    )

    op.create_table(
        "dkim_keys",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("domain", sa.String(length=253), nullable=False),
        sa.Column("selector", sa.String(length=63), nullable=False),
        sa.Column("algorithm", sa.String(length=16), nullable=False),
        sa.Column("private_key", sa.Text(), nullable=False),
        sa.Column("public_key", sa.Text(), nullable=False),
        sa.Column("active", sa.Boolean(), nullable=False),
        _ts("created_at"),
        sa.CheckConstraint("algorithm IN ('rsa', 'ed25519')", name=op.f("ck_dkim_keys_algorithm")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_dkim_keys")),
        sa.UniqueConstraint("domain", "selector", name=op.f("uq_dkim_keys_domain_selector")),
    )

    op.create_table(
        "route_setup",
        sa.Column("route_id", sa.String(length=64), nullable=False),
        _ts("ownership_verified_at", nullable=True),
        _ts("prepared_at", nullable=True),
        _ts("checked_at", nullable=True),
        sa.ForeignKeyConstraint(
            ["route_id"],
            ["email_routes.id"],
            name=op.f("fk_route_setup_route_id_email_routes"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("route_id", name=op.f("pk_route_setup")),
    )

    op.create_table(
        "idempotency_keys",
        sa.Column("scope", sa.String(length=64), nullable=False),
        sa.Column("key", sa.String(length=255), nullable=False),
        sa.Column("method", sa.String(length=8), nullable=False),
        sa.Column("path", sa.String(length=512), nullable=False),
        sa.Column("body_hash", sa.String(length=64), nullable=False),
        sa.Column("status", sa.Integer(), nullable=True),
        sa.Column("response", sa.Text(), nullable=False),
        _ts("created_at"),
        sa.PrimaryKeyConstraint("scope", "key", name=op.f("pk_idempotency_keys")),
    )
    op.create_index(op.f("ix_idempotency_keys_created_at"), "idempotency_keys", ["created_at"])


def downgrade() -> None:
    op.drop_table("idempotency_keys")
    op.drop_table("route_setup")
    op.drop_table("dkim_keys")
    op.drop_table("device_registrations")
    op.drop_table("device_keys")
