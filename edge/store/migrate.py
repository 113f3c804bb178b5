"""`python -m edge.store.migrate URL`: migrate the store at URL to the newest schema.

The edge runs this in a short child process at start (`migrate_in_child`), so that the
long-running process never loads Alembic. Exit status 0 when the database is at head, 1
with the reason on standard error otherwise. It never prints the URL's password.
"""

from __future__ import annotations

import subprocess
import sys

from sqlalchemy import make_url

from edge.config import ConfigError


def migrate_in_child(url: str, timeout: float = 300.0) -> None:
    """Run the migrations in a child Python process; raise ConfigError if they fail."""
    done = subprocess.run(
        [sys.executable, "-m", "edge.store.migrate"],
        input=url,
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

    url = sys.stdin.readline().strip()
    try:
        engine = make_engine(url)
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
