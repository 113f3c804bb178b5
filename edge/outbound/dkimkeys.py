"""A domain's DKIM keys as an operator handles them: made when missing, and shown as the DNS
records to publish.

``ensure_dkim_keys`` gives a domain a new RSA-2048 and Ed25519 pair when it has no active
key (selectors ``tp<YYYYMM>r`` and ``tp<YYYYMM>e``); ``dkim_records`` turns the active keys
into TXT records: the host, the whole value, the value cut into character-strings of at most
255 octets (RFC 1035 §3.3; a 2048-bit RSA key needs two) and the zone-file line. Blocking
(store reads and writes, key generation): callers run it in a thread or at start-up. This
module must never return, print or log a private key.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from edge.domains.scan import generate_dkim_keys
from edge.store import Conflict
from edge.store.access import AccessStore, DkimKey
from edge.store.validate import normalize_domain

__all__ = ["DkimRecord", "dkim_records", "ensure_dkim_keys", "txt_strings"]

TXT_STRING_MAX = 255


@dataclass(frozen=True)
class DkimRecord:
    """The TXT record of one active DKIM key."""

    selector: str
    algorithm: str  # "rsa" | "ed25519"
    host: str  # <selector>._domainkey.<domain>, without the final dot
    value: str  # the whole record value: v=DKIM1; k=...; p=...
    strings: tuple[str, ...]  # the value in character-strings of at most 255 octets

    def zone_line(self) -> str:
        """The record as a zone-file line: ``host. IN TXT "..." "..."``."""
        quoted = " ".join(f'"{s}"' for s in self.strings)
        return f"{self.host}. IN TXT {quoted}"

    def to_dict(self) -> dict[str, object]:
        return {
            "selector": self.selector,
            "algorithm": self.algorithm,
            "host": self.host,
            "type": "TXT",
            "value": self.value,
            "txt_strings": list(self.strings),
            "zone_line": self.zone_line(),
        }


def txt_strings(value: str) -> tuple[str, ...]:
    """`value` (ASCII, as a DKIM record is) in pieces of at most 255 octets."""
    data = value.encode("ascii")
    return tuple(
        data[i : i + TXT_STRING_MAX].decode("ascii") for i in range(0, len(data), TXT_STRING_MAX)
    ) or ("",)


def dkim_records(domain: str, keys: Sequence[DkimKey]) -> list[DkimRecord]:
    """The TXT records to publish for `keys` of `domain` (normalized), in the keys' order."""
    domain = normalize_domain(domain)
    return [
        DkimRecord(
            key.selector,
            key.algorithm,
            f"{key.selector}._domainkey.{domain}",
            key.dns_value(),
            txt_strings(key.dns_value()),
        )
        for key in keys
    ]


def ensure_dkim_keys(
    access: AccessStore,
    domain: str,
    now: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> tuple[list[DkimKey], bool]:
    """The active keys of `domain` (normalized), made first (RSA-2048 and Ed25519) when it
    has none; the flag tells whether they were made now."""
    domain = normalize_domain(domain)
    keys = access.dkim_keys(domain)
    if keys:
        return keys, False
    try:
        for key in generate_dkim_keys(now().strftime("%Y%m")):
            access.add_dkim_key(
                domain, key.selector, key.algorithm, key.private_pem, key.public_b64
            )
    except Conflict:  # another edge made them at the same moment: theirs stand
        return access.dkim_keys(domain), False
    return access.dkim_keys(domain), True
