"""The pin of each device connector's TLS key, learned at registration.

Revision ID: 0005_connector_tls_pin
Revises: 0004
Create Date: 2026-12-07

``devices.connector_tls_pin`` (and, until approval, ``device_registrations.connector_tls_pin``)
hold the base64 SHA-256 of the connector certificate's SubjectPublicKeyInfo. Null for a
device that never sent one: the edge then uses STARTTLS where offered, without a pin.

A migration is frozen once released: it must never import the ORM models (they move on) and
must never be edited to change the schema; add a new revision instead.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005_connector_tls_pin"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_TABLES = ("devices", "device_registrations")


def upgrade() -> None:
    for table in _TABLES:
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column("connector_tls_pin", sa.String(64), nullable=True))


def downgrade() -> None:
    for table in _TABLES:
        with op.batch_alter_table(table) as batch:
            batch.drop_column("connector_tls_pin")
