"""What the outbound queue makes of a submitted message: its id and its completed form.

`ItemIds` makes the queue's ids, which increase with each submission whatever the clock
does; `complete` gives a message what an MSA adds (RFC 6409 §8); `check_path` refuses an
envelope address no SMTP command could carry. Nothing here does I/O.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable

from maildir.lineends import to_crlf
from maildir.message import header_summary

__all__ = ["ItemIds", "check_path", "complete"]

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_BAD_PATH = re.compile(r"[\x00-\x20<>\x7f]")
_MESSAGE_ID = re.compile(rb"^message-id[ \t]*:", re.IGNORECASE | re.MULTILINE)
_DATE = re.compile(rb"^date[ \t]*:", re.IGNORECASE | re.MULTILINE)


def _b32(value: int, width: int) -> str:
    digits = []
    for _ in range(width):
        digits.append(_CROCKFORD[value & 31])
        value >>= 5
    return "".join(reversed(digits))


class ItemIds:
    """Ids `out_` + 26 Crockford base-32 digits (48 bits of milliseconds, 80 bits that
    start random): each greater than the one before, and than `last`, whatever the clock."""

    def __init__(self, clock: Callable[[], float], last: str = "") -> None:
        self._clock = clock
        self._ms = 0
        self._rand = 0
        if last.startswith("out_") and len(last) == 30:
            value = 0
            for c in last[4:]:
                value = value * 32 + _CROCKFORD.index(c)
            self._ms, self._rand = value >> 80, value & ((1 << 80) - 1)

    def new(self) -> str:
        ms = int(self._clock() * 1000)
        if ms <= self._ms:
            ms, rand = self._ms, self._rand + 1
        else:
            rand = secrets.randbits(70)
        self._ms, self._rand = ms, rand
        return "out_" + _b32((ms << 80) | rand, 26)


def check_path(address: str, what: str) -> str:
    if not isinstance(address, str) or not address or _BAD_PATH.search(address):
        raise ValueError(f"{what} {address!r} is not an address")
    return address


def complete(data: bytes, message_id: str, date: str) -> tuple[bytes, str]:
    """`data` with CRLF line ends, ending in CRLF, with a Date and a Message-ID field where
    it has none (RFC 6409 §8.1, §8.3); and the Message-ID it carries."""
    data = to_crlf(data)
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    end = -2 if data.startswith(b"\r\n") else data.find(b"\r\n\r\n")
    head = data if end == -1 else data[: end + 2]
    added = b""
    if _DATE.search(head) is None:
        added += f"Date: {date}\r\n".encode()
    if _MESSAGE_ID.search(head) is None:
        added += f"Message-ID: {message_id}\r\n".encode()
        return added + data, message_id
    return added + data, header_summary(data).message_id
