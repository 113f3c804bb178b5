"""Secrets encrypted at rest: devices' connector secrets and DKIM private keys.

Revision ID: 0006
Revises: 0005_connector_tls_pin
Create Date: 2026-12-07

Every stored value of ``devices.connector_secret`` and ``dkim_keys.private_key`` is
encrypted with the store key (``edge.store.keyring``: Fernet, the first key of the key
file); the downgrade decrypts them again. A Fernet token is longer than the secret, so
``connector_secret`` becomes TEXT. The key ring is the one attached to the connection's
engine (``make_engine(keys=...)``); a database holding secrets cannot be migrated without
it. Device API keys and poll secrets are stored as SHA-256 hashes already and stay so.

A migration is frozen once released: it must never import the ORM models (they move on) and
must never be edited to change the schema; add a new revision instead.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import sqlalchemy as sa
from alembic import op

from edge.store.keyring import StoreKeys, keys_of

revision: str = "0006"
down_revision: str | None = "0005_connector_tls_pin"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_SECRETS = (("devices", "id", "connector_secret"), ("dkim_keys", "id", "private_key"))


def _convert(change: Callable[[StoreKeys, str], str]) -> None:
    bind = op.get_bind()
    keys: StoreKeys | None = None
    for name, key, col in _SECRETS:
        t = sa.table(name, sa.column(key, sa.String()), sa.column(col, sa.Text()))
        rows = list(bind.execute(sa.select(t.c[key], t.c[col]).where(t.c[col].is_not(None))))
        for ident, value in rows:
            if keys is None:
                keys = keys_of(bind.dialect)  # StoreKeyError when the engine has none
            bind.execute(
                sa.update(t).where(t.c[key] == ident).values({col: change(keys, str(value))})
            )


def upgrade() -> None:
    with op.batch_alter_table("devices") as batch:
        batch.alter_column(
            "connector_secret",
            existing_type=sa.String(length=255),
            type_=sa.Text(),
            existing_nullable=True,
        )
    _convert(lambda keys, plain: keys.encrypt(plain))


def downgrade() -> None:
    _convert(lambda keys, token: keys.decrypt(token))
    with op.batch_alter_table("devices") as batch:
        batch.alter_column(
            "connector_secret",
            existing_type=sa.Text(),
            type_=sa.String(length=255),
            existing_nullable=True,
        )
