"""Domain claims, registrations that hold nothing until approved, and the audit log.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02

Routes: a domain may be claimed by several accounts at once, but only one route per domain is
verified (partial unique index); ``verified_at`` and ``claim_expires_at`` say which is which.
Routes that already took mail (ready or active) or whose ownership was proven are verified.
Registrations: the device id is only reserved (no foreign key), and the row keeps what the
device said of itself and where it registered from.

A migration is frozen once released: it must never import the ORM models (they move on) and
must never be edited to change the schema; add a new revision instead.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_VERIFIED = sa.text("verified_at IS NOT NULL")


def upgrade() -> None:
    with op.batch_alter_table("email_routes") as batch:
        batch.add_column(sa.Column("verified_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("claim_expires_at", sa.DateTime(timezone=True), nullable=True))
        batch.drop_constraint(op.f("uq_email_routes_domain"), type_="unique")
        batch.create_unique_constraint(
            op.f("uq_email_routes_account_id_domain"), ["account_id", "domain"]
        )
    op.create_index(op.f("ix_email_routes_domain"), "email_routes", ["domain"])
    op.execute(
        "UPDATE email_routes SET verified_at = updated_at WHERE status IN ('ready', 'active') "
        "OR id IN (SELECT route_id FROM route_setup WHERE ownership_verified_at IS NOT NULL)"
    )
    op.create_index(
        "uq_email_routes_verified_domain",
        "email_routes",
        ["domain"],
        unique=True,
        sqlite_where=_VERIFIED,
        postgresql_where=_VERIFIED,
    )

    with op.batch_alter_table("device_registrations") as batch:
        batch.drop_constraint(op.f("fk_device_registrations_device_id_devices"), type_="foreignkey")
        for name, length in (
            ("name", 255),
            ("hostname", 255),
            ("connector_smtp_addr", 300),
            ("source", 64),
        ):
            batch.add_column(
                sa.Column(name, sa.String(length=length), nullable=False, server_default="")
            )
    with op.batch_alter_table("device_registrations") as batch:
        for name in ("name", "hostname", "connector_smtp_addr", "source"):
            batch.alter_column(name, server_default=None)
    op.create_index(
        op.f("ix_device_registrations_created_at"), "device_registrations", ["created_at"]
    )
    op.create_index(op.f("ix_device_registrations_source"), "device_registrations", ["source"])

    op.create_table(
        "audit_events",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("actor", sa.String(length=64), nullable=False),
        sa.Column("action", sa.String(length=64), nullable=False),
        sa.Column("subject", sa.String(length=320), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_events")),
    )
    op.create_index(op.f("ix_audit_events_created_at"), "audit_events", ["created_at"])
    op.create_index(op.f("ix_audit_events_subject"), "audit_events", ["subject"])


def downgrade() -> None:
    op.drop_table("audit_events")
    op.drop_index(op.f("ix_device_registrations_source"), "device_registrations")
    op.drop_index(op.f("ix_device_registrations_created_at"), "device_registrations")
    with op.batch_alter_table("device_registrations") as batch:
        for name in ("name", "hostname", "connector_smtp_addr", "source"):
            batch.drop_column(name)
        batch.create_foreign_key(
            op.f("fk_device_registrations_device_id_devices"),
            "devices",
            ["device_id"],
            ["id"],
            ondelete="CASCADE",
        )
    op.drop_index("uq_email_routes_verified_domain", "email_routes")
    op.drop_index(op.f("ix_email_routes_domain"), "email_routes")
    with op.batch_alter_table("email_routes") as batch:
        batch.drop_constraint(op.f("uq_email_routes_account_id_domain"), type_="unique")
        batch.create_unique_constraint(op.f("uq_email_routes_domain"), ["domain"])
        batch.drop_column("claim_expires_at")
        batch.drop_column("verified_at")
