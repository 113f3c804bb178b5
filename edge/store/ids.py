"""Identifiers for control-plane records: a prefix and a sortable random string.

An id looks like ``dev_01JZ3W8KPXKQ2GMSY5P9J7Q2TM``: the prefix names the kind of record, the
26 characters after it are a ULID-like value (48 bits of milliseconds since the epoch, then 80
random bits, in Crockford base 32), so ids sort roughly by creation time and never collide in
practice. This module must never depend on the database or on any clock other than the one
passed in, and must never use a non-cryptographic random source.
"""

from __future__ import annotations

import secrets
import time

_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def _encode(value: int, length: int) -> str:
    chars = []
    for _ in range(length):
        value, rem = divmod(value, 32)
        chars.append(_ALPHABET[rem])
    return "".join(reversed(chars))


def ulid(now: float | None = None) -> str:
    """A 26-character ULID-like string for the time ``now`` (seconds since the epoch)."""
    millis = int((time.time() if now is None else now) * 1000) & ((1 << 48) - 1)
    return _encode(millis, 10) + _encode(secrets.randbits(80), 16)


def new_id(prefix: str, now: float | None = None) -> str:
    """A new id such as ``addr_01JZ...``; ``prefix`` is given without the underscore."""
    return f"{prefix}_{ulid(now)}"


def new_token(nbytes: int = 16) -> str:
    """A random lower-case hex token, e.g. for a domain's ownership TXT record."""
    return secrets.token_hex(nbytes)
