"""The encrypted columns of the store as raw tokens: checked at start, re-encrypted on rotation.

``SECRET_COLUMNS`` lists every column ``edge.store.models`` declares as ``EncryptedText``
(a test compares the two). ``check_keys`` opens every stored token with the key ring, so an
edge started with the wrong or a new key fails at start with a clear error instead of
failing later, one delivery at a time; ``rekey`` encrypts every token again under the
first key, after a new key was put first in the key file. Both read the tokens without
decrypting them through the ORM. This module must never log or return a decrypted value.
"""

from __future__ import annotations

from sqlalchemy import Engine, column, select, table, update

from edge.store.engine import WRITE_OPTION
from edge.store.keyring import StoreKeyError, StoreKeys

__all__ = ["SECRET_COLUMNS", "check_keys", "rekey"]

# (table, primary key, encrypted column)
SECRET_COLUMNS = (
    ("devices", "id", "connector_secret"),
    ("dkim_keys", "id", "private_key"),
)


def _tokens(engine: Engine, name: str, key: str, col: str) -> list[tuple[str, str]]:
    t = table(name, column(key), column(col))
    query = select(t.c[key], t.c[col]).where(t.c[col].is_not(None))
    with engine.connect() as conn:
        return [(str(k), str(v)) for k, v in conn.execute(query)]


def check_keys(engine: Engine, keys: StoreKeys) -> int:
    """How many stored secrets there are; StoreKeyError if ``keys`` fail to open any."""
    count = 0
    for name, key, col in SECRET_COLUMNS:
        for ident, token in _tokens(engine, name, key, col):
            if not keys.opens(token):
                raise StoreKeyError(
                    f"the store key ({keys.source}) does not open the secret in "
                    f"{name}.{col} of {ident}: it is not the key the store's secrets were "
                    "encrypted with. Every edge sharing the database needs the same key file; "
                    "restore it from another edge or from where the keys are kept"
                )
            count += 1
    return count


def rekey(engine: Engine, keys: StoreKeys) -> int:
    """Encrypt every stored secret again under the first key; how many were changed."""
    changed = 0
    with engine.connect().execution_options(**{WRITE_OPTION: True}) as conn, conn.begin():
        for name, key, col in SECRET_COLUMNS:
            t = table(name, column(key), column(col))
            rows = conn.execute(select(t.c[key], t.c[col]).where(t.c[col].is_not(None)))
            for ident, token in list(rows):
                if keys.primary_opens(str(token)):
                    continue
                fresh = keys.rotate(str(token))
                conn.execute(update(t).where(t.c[key] == ident).values({col: fresh}))
                changed += 1
    return changed
