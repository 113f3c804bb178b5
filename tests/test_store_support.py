"""Fixtures for the store tests: each test runs on SQLite and on PostgreSQL.

PostgreSQL tests get a fresh schema each (dropped afterwards) on the server at
``TAILPOST_TEST_POSTGRES_URL`` (default ``postgresql+psycopg://root@127.0.0.1:5432/test``) and
skip, saying why, only when that server cannot be reached. This module holds no tests.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import Engine, make_url

from edge.store import Store, open_store
from edge.store.engine import make_engine
from edge.store.keyring import StoreKeys

POSTGRES_URL = os.environ.get(
    "TAILPOST_TEST_POSTGRES_URL", "postgresql+psycopg://root@127.0.0.1:5432/test"
)
_pg_error: list[str | None] = []


def _libpq_dsn(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def postgres_unreachable() -> str | None:
    """Why the PostgreSQL server cannot be used, or None if it can (checked once)."""
    if not _pg_error:
        try:
            with psycopg.connect(_libpq_dsn(POSTGRES_URL), connect_timeout=3) as conn:
                conn.execute("SELECT 1")
            _pg_error.append(None)
        except psycopg.Error as exc:
            _pg_error.append(f"PostgreSQL at {POSTGRES_URL} is unreachable: {exc}")
    return _pg_error[0]


def drop_schema(schema: str) -> None:
    with psycopg.connect(_libpq_dsn(POSTGRES_URL), autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


@dataclass(frozen=True)
class Database:
    """Where one test's database lives: a URL and, on PostgreSQL, a schema of its own, and the
    store key its secrets are encrypted with."""

    backend: str
    url: str
    schema: str | None
    keys: StoreKeys = field(default_factory=StoreKeys.generate)

    def open(self) -> Store:
        return open_store(self.url, schema=self.schema, keys=self.keys)

    def engine(self) -> Engine:
        return make_engine(self.url, schema=self.schema, keys=self.keys)


@pytest.fixture(
    name="database",
    params=[
        pytest.param("sqlite", id="sqlite"),
        pytest.param("postgres", id="postgres", marks=pytest.mark.postgres),
    ],
)
def database_fixture(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    if request.param == "sqlite":
        yield Database("sqlite", f"sqlite:///{tmp_path / 'data' / 'control.db'}", None)
        return
    reason = postgres_unreachable()
    if reason is not None:
        if os.environ.get("TAILPOST_REQUIRE_POSTGRES"):
            pytest.fail(f"PostgreSQL is required here: {reason}")
        pytest.skip(reason)
    schema = f"t_{secrets.token_hex(6)}"
    try:
        yield Database("postgres", POSTGRES_URL, schema)
    finally:
        drop_schema(schema)


@pytest.fixture(name="store")
def store_fixture(database: Database) -> Iterator[Store]:
    opened = database.open()
    try:
        yield opened
    finally:
        opened.close()
