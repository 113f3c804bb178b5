"""Engines and schema migrations for the control-plane database.

``make_engine`` builds a SQLAlchemy engine for a URL and attaches the store key ring to it
(``edge.store.keyring``): for SQLite it makes the parent directory (mode 0700) and the
database file (mode 0600) before SQLite opens it, so the ``-wal``, ``-shm`` and journal files
SQLite makes take the same mode, narrows those modes on an existing install, turns on WAL, foreign keys and a busy timeout, and takes the write lock at the start
of write transactions (``BEGIN IMMEDIATE``) so concurrent writers wait instead of failing; for
PostgreSQL it can pin a schema through ``search_path``. ``alembic_config`` builds the Alembic
configuration in code (no ini file), pointing at the migrations shipped inside this package,
and ``upgrade_to_head`` applies them under a lock so several edges may start at once. This
module must never define tables or hold per-process state outside the engine it returns.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, Engine, create_engine, event, make_url, text
from sqlalchemy.pool import StaticPool

from edge.runtime.private import private_dir, private_file
from edge.store.keyring import StoreKeys, attach

if TYPE_CHECKING:
    from alembic.config import Config

# Alembic is imported only where a migration runs: a long-running edge migrates in a short
# child process (edge.store.migrate) and never loads it, which keeps its memory down.

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
WRITE_OPTION = "tailpost_write"
SQLITE_BUSY_TIMEOUT_MS = 30_000
# Arbitrary constant identifying the migration lock among PostgreSQL advisory locks.
_PG_MIGRATION_LOCK = 0x7A11_9057
_SCHEMA_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


SQLITE_SIDE_FILES = ("-wal", "-shm", "-journal")


def make_engine(url: str, *, schema: str | None = None, keys: StoreKeys | None = None) -> Engine:
    """An engine for ``url``; ``schema`` (PostgreSQL only) is created if missing and used.

    ``keys`` encrypt and decrypt the secret columns; without them the engine can read and
    write everything else (migrations of an empty database, tools that touch no secret)."""
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    connect_args: dict[str, Any] = {}
    kwargs: dict[str, Any] = {"pool_pre_ping": backend != "sqlite"}
    if backend == "sqlite":
        if schema is not None:
            raise ValueError("schema is only supported on PostgreSQL")
        database = parsed.database or ""
        if database and database != ":memory:" and not database.startswith("file:"):
            _private_sqlite_files(Path(database))
        else:
            # One shared connection, so every thread sees the same in-memory database.
            kwargs["poolclass"] = StaticPool
        connect_args["check_same_thread"] = False
        connect_args["timeout"] = SQLITE_BUSY_TIMEOUT_MS / 1000
    elif schema is not None:
        if not _SCHEMA_NAME.match(schema):
            raise ValueError(f"invalid schema name: {schema!r}")
        if backend != "postgresql":
            raise ValueError("schema is only supported on PostgreSQL")
        _create_schema(url, schema)
        connect_args["options"] = f"-csearch_path={schema}"
    engine = create_engine(parsed, connect_args=connect_args, **kwargs)
    attach(engine.dialect, keys)
    if backend == "sqlite":
        _configure_sqlite(engine)
    return engine


def _private_sqlite_files(database: Path) -> None:
    """The database's directory (0700 when made here) and its file 0600, made so before
    SQLite opens it.

    SQLite creates the ``-wal``, ``-shm`` and rollback journal files with the mode of the
    database file, so they follow; those an older version left more open are narrowed."""
    private_dir(database.parent, narrow=False)
    private_file(database, create=True)
    for suffix in SQLITE_SIDE_FILES:
        private_file(database.with_name(database.name + suffix))


def _create_schema(url: str, schema: str) -> None:
    bootstrap = create_engine(url)
    try:
        with bootstrap.begin() as conn:
            # IF NOT EXISTS alone still races with a concurrent CREATE SCHEMA: take the lock.
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_MIGRATION_LOCK})
            conn.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{schema}"'))
    finally:
        bootstrap.dispose()


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy's "begin" event below issue BEGIN rather than the driver.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
            cursor.execute("PRAGMA foreign_keys = ON")
            cursor.execute("PRAGMA journal_mode = WAL")
            cursor.execute("PRAGMA synchronous = NORMAL")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        if conn.get_execution_options().get(WRITE_OPTION):
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        else:
            conn.exec_driver_sql("BEGIN")


def alembic_config(connection: Connection | None = None) -> Config:
    """An Alembic config for this package's migrations; ``connection`` is used if given."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR).replace("%", "%%"))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def head_revision() -> str | None:
    """The newest migration revision shipped with this package."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at (None for an empty database)."""
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade_to_head(engine: Engine) -> None:
    """Apply pending migrations; a database already at head is left untouched."""
    from alembic import command

    head = head_revision()
    if current_revision(engine) == head:
        return
    with engine.connect().execution_options(**{WRITE_OPTION: True}) as conn:
        with conn.begin():
            if engine.dialect.name == "postgresql":
                conn.execute(
                    text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_MIGRATION_LOCK}
                )
            command.upgrade(alembic_config(conn), "head")
