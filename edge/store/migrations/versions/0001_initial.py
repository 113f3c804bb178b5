"""Initial control-plane schema: accounts, devices, routes, addresses, spam rules.

Revision ID: 0001
Revises:
Create Date: 2026-11-21

A migration is frozen once released: it must never import the ORM models (they move on) and
must never be edited to change the schema; add a new revision instead.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _ts(name: str, nullable: bool = False) -> sa.Column[object]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def _account_fk(table: str) -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint(
        ["account_id"],
        ["accounts.id"],
        name=op.f(f"fk_{table}_account_id_accounts"),
        ondelete="CASCADE",
    )


def upgrade() -> None:
    op.create_table(
        "accounts",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        _ts("created_at"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_accounts")),
    )

    op.create_table(
        "devices",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("account_id", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("hostname", sa.String(length=255), nullable=False),
        sa.Column("auth_status", sa.String(length=16), nullable=False),
        sa.Column("connector_smtp_addr", sa.String(length=300), nullable=False),
        sa.Column("connector_username", sa.String(length=255), nullable=True),
        sa.Column("connector_secret", sa.String(length=255), nullable=True),
        sa.Column("key_hash", sa.String(length=255), nullable=True),
        _ts("created_at"),
        _ts("last_seen_at", nullable=True),
        sa.CheckConstraint(
            "auth_status IN ('pending', 'authorized', 'revoked')",
            name=op.f("ck_devices_auth_status"),
        ),
        _account_fk("devices"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_devices")),
    )
    op.create_index(op.f("ix_devices_account_id"), "devices", ["account_id"])

    op.create_table(
        "spam_rules",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("account_id", sa.String(length=64), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("value", sa.String(length=320), nullable=False),
        sa.Column("action", sa.String(length=16), nullable=False),
        sa.Column("note", sa.Text(), nullable=False),
        sa.Column("source_message_ids", sa.JSON(), nullable=False),
        sa.Column("active", sa.Boolean(), nullable=False),
        _ts("created_at"),
        _ts("updated_at"),
        sa.CheckConstraint(
            "action IN ('reject', 'quarantine', 'tag')", name=op.f("ck_spam_rules_action")
        ),
        sa.CheckConstraint("kind IN ('sender', 'domain')", name=op.f("ck_spam_rules_kind")),
        _account_fk("spam_rules"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_spam_rules")),
        sa.UniqueConstraint(
            "account_id", "kind", "value", name=op.f("uq_spam_rules_account_id_kind_value")
        ),
    )

    op.create_table(
        "email_routes",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("account_id", sa.String(length=64), nullable=False),
        sa.Column("domain", sa.String(length=253), nullable=False),
        sa.Column("type", sa.String(length=16), nullable=False),
        sa.Column("connector_id", sa.String(length=64), nullable=True),
        sa.Column("connector_smtp_addr", sa.String(length=300), nullable=False),
        sa.Column("delivery_mode", sa.String(length=16), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("setup_stage", sa.String(length=64), nullable=False),
        sa.Column("edge_mx_target", sa.String(length=253), nullable=False),
        sa.Column("mail_from_domain", sa.String(length=253), nullable=False),
        sa.Column("ownership_token", sa.String(length=128), nullable=False),
        sa.Column("previous_mx", sa.JSON(), nullable=False),
        sa.Column("fallback_hosts", sa.JSON(), nullable=False),
        sa.Column("authoritative_hosts", sa.JSON(), nullable=False),
        _ts("created_at"),
        _ts("updated_at"),
        sa.CheckConstraint(
            "delivery_mode IN ('split', 'device')", name=op.f("ck_email_routes_delivery_mode")
        ),
        sa.CheckConstraint(
            "status IN ('pending_dns', 'ready', 'active', 'disabled')",
            name=op.f("ck_email_routes_status"),
        ),
        sa.CheckConstraint("type IN ('byod', 'subdomain')", name=op.f("ck_email_routes_type")),
        _account_fk("email_routes"),
        sa.ForeignKeyConstraint(
            ["connector_id"],
            ["devices.id"],
            name=op.f("fk_email_routes_connector_id_devices"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_email_routes")),
        sa.UniqueConstraint("domain", name=op.f("uq_email_routes_domain")),
    )
    op.create_index(op.f("ix_email_routes_account_id"), "email_routes", ["account_id"])
    op.create_index(op.f("ix_email_routes_connector_id"), "email_routes", ["connector_id"])

    op.create_table(
        "managed_addresses",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("account_id", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("address", sa.String(length=320), nullable=False),
        sa.Column("domain", sa.String(length=253), nullable=False),
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("vanity", sa.Boolean(), nullable=False),
        _ts("created_at"),
        _account_fk("managed_addresses"),
        sa.ForeignKeyConstraint(
            ["device_id"],
            ["devices.id"],
            name=op.f("fk_managed_addresses_device_id_devices"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_managed_addresses")),
        sa.UniqueConstraint("address", name=op.f("uq_managed_addresses_address")),
    )
    op.create_index(op.f("ix_managed_addresses_account_id"), "managed_addresses", ["account_id"])
    op.create_index(op.f("ix_managed_addresses_device_id"), "managed_addresses", ["device_id"])

    op.create_table(
        "byod_addresses",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("account_id", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("address", sa.String(length=320), nullable=False),
        sa.Column("domain", sa.String(length=253), nullable=False),
        sa.Column("route_id", sa.String(length=64), nullable=False),
        sa.Column("device_id", sa.String(length=64), nullable=False),
        _ts("created_at"),
        _account_fk("byod_addresses"),
        sa.ForeignKeyConstraint(
            ["device_id"],
            ["devices.id"],
            name=op.f("fk_byod_addresses_device_id_devices"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["route_id"],
            ["email_routes.id"],
            name=op.f("fk_byod_addresses_route_id_email_routes"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_byod_addresses")),
        sa.UniqueConstraint("address", name=op.f("uq_byod_addresses_address")),
    )
    op.create_index(op.f("ix_byod_addresses_account_id"), "byod_addresses", ["account_id"])
    op.create_index(op.f("ix_byod_addresses_device_id"), "byod_addresses", ["device_id"])
    op.create_index(op.f("ix_byod_addresses_route_id"), "byod_addresses", ["route_id"])


def downgrade() -> None:
    op.drop_table("byod_addresses")
    op.drop_table("managed_addresses")
    op.drop_table("email_routes")
    op.drop_table("spam_rules")
    op.drop_table("devices")
    op.drop_table("accounts")
