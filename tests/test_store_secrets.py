"""Secrets in the store are encrypted with the store key, on SQLite and on PostgreSQL.

A database read without the key shows no connector secret and no DKIM private key; the
store reads them back in the clear; migration 0006 encrypts what an older version stored in
the clear and its downgrade decrypts it; a wrong key fails with StoreKeyError, never with
garbage; the key file's format and its rotation (``edge.store.rekey``).
"""

from __future__ import annotations

import os
import sqlite3
import stat
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from sqlalchemy import select, text

from edge.domains.scan import generate_dkim_keys
from edge.store import open_store
from edge.store.access import AccessStore
from edge.store.engine import alembic_config, current_revision, make_engine, upgrade_to_head
from edge.store.keyring import StoreKeyError, StoreKeys, load_keys, load_or_create_keys
from edge.store.models import Base, EncryptedText
from edge.store.sealed import SECRET_COLUMNS, check_keys, rekey
from tests.test_store_support import Database, database_fixture  # noqa: F401

SECRET = "connector-pa55word-XYZZY"

BEFORE = "0005_connector_tls_pin"
"""The revision before the secrets were encrypted."""


def _raw(database: Database, query: str) -> list[tuple[Any, ...]]:
    engine = make_engine(database.url, schema=database.schema)  # no key: raw values only
    try:
        with engine.connect() as conn:
            return [tuple(r) for r in conn.execute(text(query))]
    finally:
        engine.dispose()


def _fill(database: Database) -> tuple[str, str, str]:
    """A device with a connector secret and a DKIM key; (device id, private PEM, raw pem line)."""
    store = database.open()
    try:
        device = store.create_device("laptop", connector_username="edge", connector_secret=SECRET)
        key = generate_dkim_keys("202701")[0]
        AccessStore(store).add_dkim_key(
            "example.org", key.selector, key.algorithm, key.private_pem, key.public_b64
        )
    finally:
        store.close()
    body = [ln for ln in key.private_pem.splitlines() if ln and not ln.startswith("-----")]
    return device.id, key.private_pem, body[1]


def test_secret_columns_are_the_encrypted_ones() -> None:
    declared = {
        (t.name, c.name)
        for t in Base.metadata.sorted_tables
        for c in t.columns
        if isinstance(c.type, EncryptedText)
    }
    assert declared == {(name, col) for name, _key, col in SECRET_COLUMNS}


def test_secrets_are_stored_encrypted_and_read_in_the_clear(database: Database) -> None:
    device_id, pem, pem_line = _fill(database)
    raw_secret = _raw(database, "SELECT connector_secret FROM devices")[0][0]
    raw_pem = _raw(database, "SELECT private_key FROM dkim_keys")[0][0]
    assert isinstance(raw_secret, str) and SECRET not in raw_secret
    assert isinstance(raw_pem, str) and pem_line not in raw_pem and "PRIVATE" not in raw_pem
    assert database.keys.decrypt(raw_secret) == SECRET
    store = database.open()
    try:
        device = store.get_device(device_id)
        assert device is not None and device.connector_secret == SECRET
        keys = AccessStore(store).dkim_keys("example.org")
        assert [k.private_key for k in keys] == [pem]
        assert check_keys(store.engine, database.keys) == 2
    finally:
        store.close()


def test_a_wrong_key_is_an_error_not_garbage(database: Database) -> None:
    device_id, _pem, _line = _fill(database)
    other = StoreKeys.generate("the wrong key")
    engine = make_engine(database.url, schema=database.schema, keys=other)
    try:
        with pytest.raises(StoreKeyError, match="same key file"):
            check_keys(engine, other)
    finally:
        engine.dispose()
    wrong = open_store(database.url, schema=database.schema, keys=other)
    try:
        with pytest.raises(StoreKeyError, match="cannot be decrypted"):
            wrong.get_device(device_id)
        with pytest.raises(StoreKeyError):
            AccessStore(wrong).dkim_keys("example.org")
    finally:
        wrong.close()
    keyless = open_store(database.url, schema=database.schema)
    try:
        with pytest.raises(StoreKeyError, match="no store key"):
            keyless.get_device(device_id)
        assert keyless.list_routes() == []  # what holds no secret still works
    finally:
        keyless.close()


def test_migration_encrypts_plaintext_and_downgrade_decrypts(database: Database) -> None:
    engine = database.engine()
    try:
        with engine.begin() as conn:
            command.upgrade(alembic_config(conn), BEFORE)
        with engine.begin() as conn:
            conn.execute(
                text("INSERT INTO accounts (id, name, created_at) VALUES ('a', 'a', :t)"),
                {"t": "2026-01-01 00:00:00"},
            )
            conn.execute(
                text(
                    "INSERT INTO devices (id, account_id, name, hostname, auth_status, "
                    "connector_smtp_addr, connector_username, connector_secret, created_at) "
                    "VALUES ('d1', 'a', 'd', '', 'authorized', '', 'edge', :s, :t), "
                    "('d2', 'a', 'e', '', 'pending', '', NULL, NULL, :t)"
                ),
                {"s": SECRET, "t": "2026-01-01 00:00:00"},
            )
            conn.execute(
                text(
                    "INSERT INTO dkim_keys (id, domain, selector, algorithm, private_key, "
                    "public_key, active, created_at) VALUES ('k1', 'example.org', 's', "
                    "'ed25519', 'c2VlZC1zZWNyZXQ=', 'cHVi', :true, :t)"
                ),
                {"t": "2026-01-01 00:00:00", "true": True},
            )
        upgrade_to_head(engine)
        rows = dict(_raw(database, "SELECT id, connector_secret FROM devices"))
        assert rows["d2"] is None
        assert rows["d1"] != SECRET and database.keys.decrypt(str(rows["d1"])) == SECRET
        token = _raw(database, "SELECT private_key FROM dkim_keys")[0][0]
        assert database.keys.decrypt(str(token)) == "c2VlZC1zZWNyZXQ="
        store = database.open()
        try:
            device = store.get_device("d1")
            assert device is not None and device.connector_secret == SECRET
        finally:
            store.close()
        with engine.begin() as conn:
            command.downgrade(alembic_config(conn), BEFORE)
        assert dict(_raw(database, "SELECT id, connector_secret FROM devices"))["d1"] == SECRET
        assert _raw(database, "SELECT private_key FROM dkim_keys")[0][0] == "c2VlZC1zZWNyZXQ="
    finally:
        engine.dispose()


def test_migrating_secrets_needs_the_key(database: Database) -> None:
    engine = make_engine(database.url, schema=database.schema)  # no key
    try:
        with engine.begin() as conn:
            command.upgrade(alembic_config(conn), BEFORE)
        with engine.begin() as conn:
            conn.execute(
                text("INSERT INTO accounts (id, name, created_at) VALUES ('a', 'a', :t)"),
                {"t": "2026-01-01 00:00:00"},
            )
            conn.execute(
                text(
                    "INSERT INTO devices (id, account_id, name, hostname, auth_status, "
                    "connector_smtp_addr, connector_secret, created_at) "
                    "VALUES ('d1', 'a', 'd', '', 'authorized', '', :s, :t)"
                ),
                {"s": SECRET, "t": "2026-01-01 00:00:00"},
            )
        with pytest.raises(StoreKeyError, match="no store key"):
            upgrade_to_head(engine)
        # Nothing half-done: still at the revision before, the secret as it was.
        assert current_revision(engine) == BEFORE
        assert dict(_raw(database, "SELECT id, connector_secret FROM devices"))["d1"] == SECRET
    finally:
        engine.dispose()


def test_rekey_moves_every_secret_to_the_first_key(database: Database) -> None:
    device_id, pem, _line = _fill(database)
    old = database.keys
    new = StoreKeys.generate()
    ring = StoreKeys((*new.keys, *old.keys), "new and old")
    engine = make_engine(database.url, schema=database.schema, keys=ring)
    try:
        assert rekey(engine, ring) == 2
        assert rekey(engine, ring) == 0
        with pytest.raises(StoreKeyError):
            check_keys(engine, old)  # the old key alone opens nothing any more
        assert check_keys(engine, new) == 2
    finally:
        engine.dispose()
    store = open_store(database.url, schema=database.schema, keys=new)
    try:
        device = store.get_device(device_id)
        assert device is not None and device.connector_secret == SECRET
        assert [k.private_key for k in AccessStore(store).dkim_keys("example.org")] == [pem]
    finally:
        store.close()


def test_key_file_is_made_private_and_checked(tmp_path: Path) -> None:
    path = tmp_path / "store.key"
    old_umask = os.umask(0)  # the mode must not depend on the umask
    try:
        keys, created = load_or_create_keys(path)
    finally:
        os.umask(old_umask)
    assert created and stat.S_IMODE(path.stat().st_mode) == 0o600
    again, created_again = load_or_create_keys(path)
    assert not created_again and again.keys == keys.keys
    token = keys.encrypt("x")
    assert again.decrypt(token) == "x"
    path.write_text("# comment\nnot-a-key\n")
    with pytest.raises(StoreKeyError, match="line 2 .* is not a Fernet key"):
        load_keys(path)
    path.write_text("# only a comment\n")
    with pytest.raises(StoreKeyError, match="holds no key"):
        load_keys(path)
    with pytest.raises(StoreKeyError, match="does not exist"):
        load_keys(tmp_path / "missing.key")
    assert keys.keys[0].decode() not in repr(keys)


def test_sqlite_files_are_private_whatever_the_umask(tmp_path: Path) -> None:
    old_umask = os.umask(0)
    try:
        keys = StoreKeys.generate()
        store = open_store(f"sqlite:///{tmp_path / 'db' / 'store.db'}", keys=keys)
        try:
            store.create_device("laptop", connector_secret=SECRET)
            with store.engine.connect() as conn:
                conn.execute(select(text("1")))
            files = sorted(p.name for p in (tmp_path / "db").iterdir())
            assert "store.db-wal" in files and "store.db-shm" in files
            for name in files:
                mode = stat.S_IMODE((tmp_path / "db" / name).stat().st_mode)
                assert mode == 0o600, (name, oct(mode))
            assert stat.S_IMODE((tmp_path / "db").stat().st_mode) == 0o700
            raw = b"".join((tmp_path / "db" / n).read_bytes() for n in files)
            assert SECRET.encode() not in raw
            rows = sqlite3.connect(tmp_path / "db" / "store.db").execute(
                "SELECT connector_secret FROM devices"
            )
            assert all(SECRET not in str(r[0]) for r in rows)
        finally:
            store.close()
    finally:
        os.umask(old_umask)
