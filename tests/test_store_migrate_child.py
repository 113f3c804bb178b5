"""Migrations in a child process, so that a long-running edge never loads Alembic."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from edge.config import ConfigError
from edge.store import open_store
from edge.store.engine import current_revision, head_revision
from edge.store.migrate import migrate_in_child


def test_child_migrates_a_new_database(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'store.db'}"
    migrate_in_child(url)
    store = open_store(url, migrate=False)
    try:
        assert current_revision(store.engine) == head_revision()
        assert store.create_device("home").auth_status == "authorized"
    finally:
        store.close()


def test_a_failing_migration_names_the_store_without_its_password(tmp_path: Path) -> None:
    url = "postgresql+psycopg://tailpost:s3cret@127.0.0.1:1/nowhere"
    with pytest.raises(ConfigError) as err:
        migrate_in_child(url, timeout=60)
    assert "s3cret" not in str(err.value) and "127.0.0.1:1/nowhere" in str(err.value)


def test_building_the_edge_does_not_load_alembic(tmp_path: Path) -> None:
    code = (
        "import sys; from twisted.internet import reactor; from edge.app import build_edge; "
        "from edge.config import Config; "
        f"c = Config(data_dir={str(tmp_path)!r}); c.edge.mx_listen = '127.0.0.1:0'; "
        "c.edge.control_listen = c.edge.relay_listen = '127.0.0.1:0'; build_edge(c, reactor); "
        "print('alembic' in sys.modules)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert done.stdout.strip().splitlines()[-1] == "False"
    assert (tmp_path / "edge" / "store.db").exists()
