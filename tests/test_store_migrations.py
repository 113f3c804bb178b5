"""Migrations, engine settings and concurrent use of the store, on SQLite and PostgreSQL."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import event, inspect, text

from edge.store import Store, open_store
from edge.store.engine import (
    MIGRATIONS_DIR,
    alembic_config,
    current_revision,
    head_revision,
    upgrade_to_head,
)
from edge.store.models import Base
from tests.test_store_support import (  # noqa: F401
    Database,
    database_fixture,
    store_fixture,
)

TABLES = {
    "accounts",
    "devices",
    "email_routes",
    "managed_addresses",
    "byod_addresses",
    "spam_rules",
}


def test_migrations_ship_inside_the_package() -> None:
    assert (MIGRATIONS_DIR / "env.py").is_file()
    assert (MIGRATIONS_DIR / "script.py.mako").is_file()
    assert head_revision() == "0008"


def test_empty_database_is_migrated_to_head(database: Database) -> None:
    engine = database.engine()
    try:
        assert current_revision(engine) is None
        upgrade_to_head(engine)
        assert current_revision(engine) == head_revision()
        assert TABLES <= set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_second_open_is_a_no_op(database: Database) -> None:
    first = database.open()
    device = first.create_device("laptop")
    first.close()

    engine = database.engine()
    statements: list[str] = []

    @event.listens_for(engine, "before_cursor_execute")
    def _record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        statements.append(statement)

    try:
        upgrade_to_head(engine)
    finally:
        engine.dispose()
    changes = [
        s
        for s in statements
        if s.lstrip().upper().startswith(("CREATE", "ALTER", "DROP", "INSERT", "UPDATE"))
    ]
    assert changes == []

    again = database.open()
    try:
        assert again.get_device(device.id) == device
    finally:
        again.close()


def test_models_and_migrations_do_not_drift(database: Database) -> None:
    engine = database.engine()
    try:
        upgrade_to_head(engine)
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            assert compare_metadata(context, Base.metadata) == []
            command.check(alembic_config(conn))  # raises if autogenerate finds changes
    finally:
        engine.dispose()


def test_drift_would_be_noticed(database: Database) -> None:
    """The drift check can fail: a column missing from the database is reported."""
    engine = database.engine()
    try:
        upgrade_to_head(engine)
        with engine.begin() as conn:
            conn.execute(text("DROP INDEX ix_devices_account_id"))
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
            assert [d[0] for d in diff] == ["add_index"]
    finally:
        engine.dispose()


def test_downgrade_and_upgrade_again(database: Database) -> None:
    engine = database.engine()
    try:
        upgrade_to_head(engine)
        with engine.begin() as conn:
            command.downgrade(alembic_config(conn), "base")
        assert not TABLES & set(inspect(engine).get_table_names())
        upgrade_to_head(engine)
        assert TABLES <= set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_sqlite_settings(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "er" / "control.db"
    opened = open_store(f"sqlite:///{path}")
    try:
        assert path.is_file()
        with opened.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000
        statements: list[str] = []

        @event.listens_for(opened.engine, "before_cursor_execute")
        def _record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
            statements.append(statement)

        device = opened.create_device("laptop")
        assert "BEGIN IMMEDIATE" in statements  # writers queue for the lock up front
        statements.clear()
        opened.get_device(device.id)
        assert "BEGIN" in statements and "BEGIN IMMEDIATE" not in statements
    finally:
        opened.close()


def test_in_memory_sqlite_is_shared_between_threads() -> None:
    opened = open_store("sqlite://")
    try:
        device = opened.create_device("laptop")
        with ThreadPoolExecutor(2) as pool:
            assert pool.submit(opened.get_device, device.id).result() == device
    finally:
        opened.close()


def test_schema_option_is_postgres_only(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        open_store(f"sqlite:///{tmp_path / 'x.db'}", schema="t_x")


def test_concurrent_opens_migrate_once(database: Database) -> None:
    barrier = threading.Barrier(4)

    def open_one() -> Store:
        barrier.wait()
        return database.open()

    with ThreadPoolExecutor(4) as pool:
        stores = list(pool.map(lambda _: open_one(), range(4)))
    try:
        assert {current_revision(s.engine) for s in stores} == {head_revision()}
    finally:
        for s in stores:
            s.close()


def _run_threads(count: int, fn: Callable[[int], None]) -> None:
    barrier = threading.Barrier(count)

    def run(i: int) -> None:
        barrier.wait()
        fn(i)

    with ThreadPoolExecutor(count) as pool:
        for future in [pool.submit(run, i) for i in range(count)]:
            future.result()  # re-raises anything a thread raised


def test_concurrent_use(store: Store) -> None:
    threads, rounds = 6, 5
    device = store.create_device("shared", connector_smtp_addr="shared.ts.net:2525")
    store.create_route("example.com", type="byod", connector_id=device.id)

    def work(i: int) -> None:
        own = store.create_device(f"dev-{i}", connector_smtp_addr=f"d{i}.ts.net:2525")
        for n in range(rounds):
            store.add_managed_address(
                f"u{i}-{n}", own.id, domain="mail.example.net", namespace=None
            )
            store.add_byod_address(f"b{i}-{n}", "example.com", own.id)
            store.add_spam_rule("domain", "spam.example", source_message_ids=[f"m{i}-{n}"])
            target = store.resolve_recipient(f"u{i}-{n}@mail.example.net")
            assert target is not None and target.device_id == own.id
            store.list_managed_addresses()

    _run_threads(threads, work)
    assert len(store.list_devices()) == threads + 1
    assert len(store.list_managed_addresses()) == threads * rounds
    assert len(store.list_byod_addresses()) == threads * rounds
    rules = store.list_spam_rules()
    assert len(rules) == 1
    assert sorted(rules[0].source_message_ids) == sorted(
        f"m{i}-{n}" for i in range(threads) for n in range(rounds)
    )


def test_concurrent_claims_of_one_address(store: Store) -> None:
    from edge.store import Conflict

    device = store.create_device("laptop")
    outcomes: list[str] = []
    lock = threading.Lock()

    def claim(i: int) -> None:
        try:
            store.add_managed_address("alice", device.id, domain="mail.example.net", namespace=None)
            result = "won"
        except Conflict:
            result = "conflict"
        with lock:
            outcomes.append(result)

    _run_threads(6, claim)
    assert sorted(outcomes) == ["conflict"] * 5 + ["won"]
    assert len(store.list_managed_addresses()) == 1
