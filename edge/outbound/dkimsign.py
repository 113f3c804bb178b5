"""DKIM signatures for the mail the edge sends out (RFC 6376; Ed25519-SHA256 per RFC 8463).

``DkimSigner.sign(data, domain)`` returns the DKIM-Signature header fields to put in front
of a message: one per active key of the domain in the store (RSA first, then Ed25519),
relaxed/relaxed, CRLF line ends, folded under 80 columns; b"" when the domain has no active
key. The headers that matter are signed and oversigned: each one present is listed once
more than it occurs, and From, To, Cc, Subject, Date and Reply-To are listed even when
absent, so none can be added after signing without breaking the signature. The message is
canonicalized as bytes (``edge.outbound.canon``), once for all its signatures; the RSA and
Ed25519 operations are OpenSSL's, through ``cryptography``.

A domain's keys are read from the store and loaded at most once per ``ttl`` seconds (a
rotation or a new key takes effect within it); a loaded key is reused while its row is the
same. ``sign`` is blocking (a store read on a cache miss, then the signature) and safe to
call from several threads at once: callers run it in a thread pool, never on the reactor
thread. This module must never log, print or keep a private key outside the key objects it
signs with, and never sign with a key that is not active for the domain.
"""

from __future__ import annotations

import base64
import hashlib
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from edge.outbound.canon import crlf, relaxed_body, relaxed_field, split
from edge.store.access import AccessStore, DkimKey
from edge.store.validate import normalize_domain

__all__ = ["OVERSIGNED", "PROTECTED", "DkimSignError", "DkimSigner"]

OVERSIGNED: tuple[str, ...] = (
    "from",
    "sender",
    "reply-to",
    "subject",
    "date",
    "message-id",
    "to",
    "cc",
    "in-reply-to",
    "references",
    "mime-version",
    "content-type",
    "content-transfer-encoding",
    "content-disposition",
    "content-language",
    "list-id",
    "list-help",
    "list-post",
    "list-subscribe",
    "list-unsubscribe",
    "list-unsubscribe-post",
    "list-archive",
    "list-owner",
    "autocrypt",
    "openpgp",
)
"""The header fields signed: each one present is listed once more than it occurs."""

PROTECTED: frozenset[str] = frozenset({"from", "to", "cc", "subject", "date", "reply-to"})
"""Of those, the ones listed once even when absent, so they cannot be added later."""

_OVERSIGNED_BYTES = tuple((name, name.encode("ascii")) for name in OVERSIGNED)
_LINE = 78
_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_SELECTOR = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_MIN_RSA_BITS = 1024
_PKCS1 = padding.PKCS1v15()
_SHA256 = Prehashed(hashes.SHA256())

_PrivateKey = rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey


class DkimSignError(Exception):
    """A domain's active DKIM key cannot be used to sign (the message says which and why)."""


@dataclass(frozen=True)
class _Loaded:
    key_id: str
    selector: str
    algorithm: str  # "rsa" | "ed25519"
    private: _PrivateKey = field(repr=False)


def _load(key: DkimKey) -> _Loaded:
    """The signing object of a stored key (RSA: PKCS#8 PEM; Ed25519: base64 of the seed)."""
    where = f"DKIM key {key.selector!r} of {key.domain}"
    if not _SELECTOR.fullmatch(key.selector):
        raise DkimSignError(f"{where}: the selector is not a DNS name")
    text = key.private_key.strip()
    try:
        if key.algorithm == "rsa":
            private = serialization.load_pem_private_key(text.encode("ascii"), None)
            if not isinstance(private, rsa.RSAPrivateKey):
                raise DkimSignError(f"{where} is not an RSA private key")
            if private.key_size < _MIN_RSA_BITS:
                raise DkimSignError(f"{where} has {private.key_size} bits, fewer than 1024")
        elif key.algorithm == "ed25519":
            if text.startswith("-----"):
                private = serialization.load_pem_private_key(text.encode("ascii"), None)
                if not isinstance(private, ed25519.Ed25519PrivateKey):
                    raise DkimSignError(f"{where} is not an Ed25519 private key")
            else:
                seed = base64.b64decode(text, validate=True)
                private = ed25519.Ed25519PrivateKey.from_private_bytes(seed)
        else:
            raise DkimSignError(f"{where} has an unknown algorithm {key.algorithm!r}")
    except (ValueError, TypeError, UnicodeError, UnsupportedAlgorithm) as exc:
        raise DkimSignError(f"{where} cannot be loaded: {type(exc).__name__}") from None
    return _Loaded(key.id, key.selector, key.algorithm, private)


def _fold(words: Sequence[tuple[str, str]]) -> list[str]:
    """Lines of a header field under `_LINE` columns: each (separator, word) joins the
    current line, or starts a continuation line (a tab) when it does not fit."""
    lines = [""]
    for sep, word in words:
        if lines[-1] and len(lines[-1]) + len(sep) + len(word) > _LINE:
            lines.append("\t" + word)
        else:
            lines[-1] += sep + word
    return lines


def _chunks(text: str, first: int, size: int = _LINE - 2) -> list[str]:
    """`text` in pieces: `first` characters, then `size` at a time."""
    first = max(first, 0)
    return [text[:first]] + [text[i : i + size] for i in range(first, len(text), size)]


class DkimSigner:
    """Signs outbound mail with its sender domain's active DKIM keys from ``access``.

    ``ttl``: seconds a domain's keys (or their absence) are kept before the store is read
    again; ``clock``: monotonic seconds for that; ``wall``: Unix time for the ``t=`` tag."""

    def __init__(
        self,
        access: AccessStore,
        *,
        ttl: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        max_domains: int = 10_000,
    ) -> None:
        self.access = access
        self.ttl = ttl
        self.clock = clock
        self.wall = wall
        self.max_domains = max_domains
        self._lock = threading.Lock()
        self._cache: dict[str, tuple[float, tuple[_Loaded, ...]]] = {}

    def _keys(self, domain: str) -> tuple[_Loaded, ...]:
        """The loaded active keys of `domain` (normalized), from the cache while it is fresh."""
        now = self.clock()
        with self._lock:
            cached = self._cache.get(domain)
        if cached is not None and cached[0] > now:
            return cached[1]
        previous = {(k.selector, k.key_id): k for k in cached[1]} if cached else {}
        active = sorted(self.access.dkim_keys(domain), key=lambda k: (k.algorithm != "rsa",))
        loaded = tuple(previous.get((key.selector, key.id)) or _load(key) for key in active)
        with self._lock:
            if len(self._cache) >= self.max_domains:
                for name in [n for n, (until, _) in self._cache.items() if until <= now]:
                    del self._cache[name]
                if len(self._cache) >= self.max_domains:
                    self._cache.clear()
            self._cache[domain] = (now + self.ttl, loaded)
        return loaded

    def forget(self, domain: str = "") -> None:
        """Drop the cached keys of `domain` (every domain when empty): the next signature
        reads the store."""
        with self._lock:
            if domain:
                self._cache.pop(normalize_domain(domain), None)
            else:
                self._cache.clear()

    def sign(self, data: bytes, domain: str) -> bytes:
        """The DKIM-Signature header fields (CRLF-terminated) to prepend to `data`, signed
        for `domain` with each of its active keys; b"" when it has none. ValueError for a
        malformed domain, DkimSignError for an active key that cannot be used."""
        domain = normalize_domain(domain)
        keys = self._keys(domain)
        if not keys:
            return b""
        fields, body = split(crlf(data))
        body_hash = base64.b64encode(hashlib.sha256(relaxed_body(body)).digest()).decode("ascii")
        present: dict[bytes, list[bytes]] = {}
        for field_name, value in fields:
            present.setdefault(field_name, []).append(value)
        names: list[str] = []
        signed: list[bytes] = []
        for name, raw_name in _OVERSIGNED_BYTES:
            found = present.get(raw_name)
            if found:
                names.extend([name] * (len(found) + 1))
                # The n-th listing of a name takes its n-th instance from the bottom.
                signed.extend(relaxed_field(raw_name, v) for v in reversed(found))
            elif name in PROTECTED:
                names.append(name)
        head = b"".join(signed)
        stamp = int(self.wall())
        out: list[bytes] = []
        for key in keys:
            out.append(self._signature(key, domain, stamp, names, body_hash, head))
        return b"".join(out)

    def _signature(
        self, key: _Loaded, domain: str, stamp: int, names: list[str], body_hash: str, head: bytes
    ) -> bytes:
        words: list[tuple[str, str]] = [
            ("", "DKIM-Signature:"),
            (" ", "v=1;"),
            (" ", f"a={key.algorithm}-sha256;"),
            (" ", "c=relaxed/relaxed;"),
            (" ", f"d={domain};"),
            (" ", f"s={key.selector};"),
            (" ", f"t={stamp};"),
        ]
        for i, name in enumerate(names):
            last = i == len(names) - 1
            words.append(
                (" " if i == 0 else "", ("h=" if i == 0 else "") + name + (";" if last else ":"))
            )
        words.append((" ", f"bh={body_hash};"))
        lines = _fold(words)
        lines.append("\tb=")
        unsigned = "\r\n".join(lines)
        name, _, value = unsigned.partition(":")
        canonical = relaxed_field(name.encode("ascii"), value.encode("ascii"))[:-2]
        digest = hashlib.sha256(head + canonical).digest()
        if isinstance(key.private, rsa.RSAPrivateKey):
            raw = key.private.sign(digest, _PKCS1, _SHA256)
        else:
            raw = key.private.sign(digest)
        pieces = _chunks(base64.b64encode(raw).decode("ascii"), _LINE - len("\tb="))
        return (unsigned + "\r\n\t".join(pieces) + "\r\n").encode("ascii")
