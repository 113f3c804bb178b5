"""`python -m edge.store.migrate`: migrate the store to the newest schema.

The edge runs this in a short child process at start (`migrate_in_child`), so that the
long-running process never loads Alembic. The store's URL and the path of its key file
(empty: none) come on standard input, one a line, so neither shows in a process listing; the
key encrypts the secrets a migration finds in the clear. Exit status 0 when the database is
at head, 1 with the reason on standard error otherwise. It never prints the URL's password
or a key.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from sqlalchemy import make_url

from edge.config import ConfigError


def migrate_in_child(url: str, key_file: Path | None = None, timeout: float = 300.0) -> None:
    """Run the migrations in a child Python process; raise ConfigError if they fail."""
    done = subprocess.run(
        [sys.executable, "-m", "edge.store.migrate"],
        input=f"{url}\n{key_file or ''}\n",
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if done.returncode != 0:
        shown = make_url(url).render_as_string(hide_password=True)
        raise ConfigError(f"migrating the store at {shown} failed: {done.stderr.strip()}")


def main() -> int:
    from edge.store.engine import make_engine, upgrade_to_head
    from edge.store.keyring import load_keys

    url = sys.stdin.readline().strip()
    key_file = sys.stdin.readline().strip()
    try:
        engine = make_engine(url, keys=load_keys(Path(key_file)) if key_file else None)
        try:
            upgrade_to_head(engine)
        finally:
            engine.dispose()
    except Exception as exc:
        sys.stderr.write(f"{type(exc).__name__}: {exc}\n")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
