"""The admin keys of the control API: where their file is, and reading it (made on first use).

One key per line, `#` comments allowed; a missing file is created with one random key, mode
0600. Used by the control listener to check requests and by `tailpost queue` to make them.
`hash_secret` is the one hash of keys and secrets (admin keys, device keys, poll secrets):
they are compared and stored only in that form. This module must never log or print a key.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from pathlib import Path

from edge.config import Config, ConfigError

__all__ = ["admin_key_path", "hash_secret", "load_admin_keys"]


def hash_secret(value: str | bytes) -> str:
    """The stored and compared form of a key or secret: SHA-256, in hex (they are random, so
    a plain hash fits). A str is hashed as UTF-8."""
    raw = value.encode("utf-8") if isinstance(value, str) else value
    return hashlib.sha256(raw).hexdigest()


def admin_key_path(config: Config) -> Path:
    return (
        Path(config.edge.admin_key_file)
        if config.edge.admin_key_file
        else config.data_path / "edge" / "admin.key"
    )


def load_admin_keys(path: Path) -> list[str]:
    """The admin keys in ``path``; a missing file is created with one new key (mode 0600)."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        key = "tpa_" + secrets.token_urlsafe(32)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(f"# admin keys of the control API, one per line\n{key}\n")
            fh.flush()
            os.fsync(fh.fileno())
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise ConfigError(f"cannot read the admin key file {path}: {exc.strerror}") from exc
    keys = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    if not keys:
        raise ConfigError(f"the admin key file {path} holds no key")
    if any(len(k) < 16 for k in keys):
        raise ConfigError(f"every key in {path} must be at least 16 characters")
    return keys
