"""The store key: what encrypts the secrets kept in the control-plane database.

Connector secrets and DKIM private keys are stored encrypted with Fernet (AES-128-CBC with
HMAC-SHA256, from ``cryptography``), so a copied database alone reveals none of them. The
keys are in a file of their own (default ``<data_dir>/edge/store.key``, mode 0600), one
Fernet key a line, the newest first; lines starting with ``#`` are comments. The first key
encrypts, every key decrypts (``MultiFernet``), which is how a key is rotated: put the new
key first, restart every edge, run ``python -m edge.store.rekey``, then drop the old key.
Every edge sharing one database must have the same file.

SQLAlchemy hands a column type's converters only the dialect, and every engine has a
dialect object of its own, so an engine's key ring is attached to its dialect
(``attach``) when the engine is made and found there by ``EncryptedText`` in
``edge.store.models`` (``keys_of``); there is no module-level key. This module must never
log or print a key or a decrypted value.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

__all__ = [
    "StoreKeyError",
    "StoreKeys",
    "attach",
    "keys_of",
    "load_keys",
    "load_or_create_keys",
]

_ATTRIBUTE = "tailpost_store_keys"
_HEADER = (
    "# the store key of tailpost's edge: one Fernet key a line, the newest first.\n"
    "# Every edge sharing the database needs this same file. Keep it out of backups of the\n"
    "# database, or the backup is no longer protected by it.\n"
)


class StoreKeyError(Exception):
    """The store key is missing, unreadable, malformed, or does not open the stored secrets."""


class StoreKeys:
    """A ring of Fernet keys: the first encrypts, any of them decrypts. `source` names where
    the keys came from, for error messages."""

    def __init__(self, keys: tuple[bytes, ...], source: str = "") -> None:
        if not keys:
            raise StoreKeyError(f"the store key file {source} holds no key")
        self.keys = keys
        self.source = source
        self._fernet = MultiFernet([Fernet(k) for k in keys])

    def __repr__(self) -> str:
        return f"StoreKeys({len(self.keys)} key(s) from {self.source!r})"

    @classmethod
    def generate(cls, source: str = "a key of this process") -> StoreKeys:
        return cls((Fernet.generate_key(),), source)

    def encrypt(self, plain: str) -> str:
        return self._fernet.encrypt(plain.encode("utf-8")).decode("ascii")

    def decrypt(self, token: str) -> str:
        try:
            return self._fernet.decrypt(token.encode("ascii")).decode("utf-8")
        except (InvalidToken, UnicodeError) as exc:
            raise StoreKeyError(
                f"a secret in the store cannot be decrypted with the store key "
                f"({self.source}): the key is not the one the secrets were encrypted with. "
                "Every edge sharing the database needs the same key file; restore it from "
                "another edge or a backup"
            ) from exc

    def opens(self, token: str) -> bool:
        """Whether `token` decrypts with these keys."""
        try:
            self._fernet.decrypt(token.encode("ascii"))
        except (InvalidToken, UnicodeError):
            return False
        return True

    def rotate(self, token: str) -> str:
        """`token` encrypted again under the first key (StoreKeyError if no key opens it)."""
        try:
            return self._fernet.rotate(token.encode("ascii")).decode("ascii")
        except (InvalidToken, UnicodeError):
            self.decrypt(token)  # raises the explained error
            raise

    def primary_opens(self, token: str) -> bool:
        """Whether `token` is encrypted under the first key already."""
        try:
            Fernet(self.keys[0]).decrypt(token.encode("ascii"))
        except (InvalidToken, UnicodeError):
            return False
        return True


def load_keys(path: Path) -> StoreKeys:
    """The key ring in `path`; StoreKeyError, saying what is wrong, if it cannot be used."""
    try:
        text = Path(path).read_text(encoding="ascii")
    except FileNotFoundError:
        raise StoreKeyError(f"the store key file {path} does not exist") from None
    except (OSError, UnicodeError) as exc:
        raise StoreKeyError(f"cannot read the store key file {path}: {exc}") from None
    keys = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            Fernet(line.encode("ascii"))
        except ValueError:
            raise StoreKeyError(
                f"line {number} of the store key file {path} is not a Fernet key "
                "(32 url-safe base64-encoded bytes)"
            ) from None
        keys.append(line.encode("ascii"))
    return StoreKeys(tuple(keys), str(path))


def load_or_create_keys(path: Path) -> tuple[StoreKeys, bool]:
    """The key ring in `path`, made with one new key (mode 0600) when the file is missing;
    the flag tells whether it was made now."""
    path = Path(path)
    created = False
    if not path.exists():
        key = Fernet.generate_key().decode("ascii")
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass  # another process made it first: use theirs
        except OSError as exc:
            raise StoreKeyError(f"cannot create the store key file {path}: {exc}") from None
        else:
            with os.fdopen(fd, "w", encoding="ascii") as fh:
                fh.write(f"{_HEADER}{key}\n")
                fh.flush()
                os.fsync(fh.fileno())
            created = True
    return load_keys(path), created


def attach(dialect: Any, keys: StoreKeys | None) -> None:
    """Give an engine's dialect its key ring (None: the engine can hold no secrets)."""
    setattr(dialect, _ATTRIBUTE, keys)


def keys_of(dialect: Any) -> StoreKeys:
    """The key ring attached to `dialect`; StoreKeyError when the engine was made without one."""
    keys: StoreKeys | None = getattr(dialect, _ATTRIBUTE, None)
    if keys is None:
        raise StoreKeyError(
            "this database connection has no store key, so it cannot read or write secrets"
        )
    return keys
