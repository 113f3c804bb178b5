"""Packaging: every package of the source tree is installed, with the files it needs."""

from __future__ import annotations

import configparser
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def declared_packages() -> set[str]:
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    return {line.strip() for line in cfg["options"]["packages"].splitlines() if line.strip()}


def test_every_package_is_declared_in_setup_cfg() -> None:
    found = {
        ".".join(path.parent.relative_to(REPO).parts)
        for top in ("edge", "connector", "maildir", "webapi")
        for path in (REPO / top).rglob("__init__.py")
    }
    missing = found - declared_packages()
    assert not missing, f"add these to [options] packages in setup.cfg: {sorted(missing)}"
    assert "twisted.plugins" in declared_packages()


def test_package_data_covers_the_migrations() -> None:
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    data = cfg["options.package_data"]["edge.store"]
    assert "migrations/versions/*.py" in data and "migrations/*.mako" in data
