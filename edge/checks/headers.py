"""Header-section work for the checks: the streaming filter and the From header's facts.

`HeaderFilter` sits between the SMTP data stream and the spool: it removes, while the
header section streams by, every incoming `Authentication-Results` header that claims the
edge's own authserv-id (RFC 8601 §5) and every `X-Tailpost-*` header, since only the edge
may write those. It holds at most one header field (with its folded lines) in memory, which
the SMTP server's header-size limit bounds. Nothing here does I/O.
"""

from __future__ import annotations

import re
from email.parser import BytesHeaderParser
from email.policy import compat32
from email.utils import getaddresses

TAILPOST_PREFIX = b"x-tailpost-"
_COMMENT = re.compile(r"\((?:[^()\\]|\\.)*\)")


def authserv_id_of(value: str) -> str:
    """The authserv-id of an Authentication-Results value (comments and CFWS skipped)."""
    for _ in range(4):  # nested comments, a few levels deep
        value = _COMMENT.sub(" ", value)
    token = value.strip().split(";", 1)[0].strip()
    token = token.split()[0] if token.split() else ""
    return token.strip('"').lower()


def _forged(field: bytes, authserv_id: str) -> bool:
    name, sep, value = field.partition(b":")
    if not sep:
        return False
    name = name.strip().lower()
    if name.startswith(TAILPOST_PREFIX):
        return True
    if name == b"authentication-results":
        text = value.decode("utf-8", "replace").replace("\r\n", " ")
        return authserv_id_of(text) == authserv_id.lower()
    return False


class HeaderFilter:
    """Streams message lines through, dropping forged trust headers from the header section."""

    def __init__(self, authserv_id: str) -> None:
        self.authserv_id = authserv_id
        self.in_headers = True
        self.removed: list[bytes] = []
        self._field: list[bytes] = []

    def feed(self, line: bytes) -> list[bytes]:
        """Lines (each ending in CRLF) in; the lines to keep out, in order."""
        if not self.in_headers:
            return [line]
        if line[:1] in (b" ", b"\t") and self._field:
            self._field.append(line)
            return []
        out = self._flush()
        if line in (b"\r\n", b"\n"):
            self.in_headers = False
            out.append(line)
        else:
            self._field = [line]
        return out

    def finish(self) -> list[bytes]:
        """At the end of data: a header field still held (a message without a body)."""
        return self._flush()

    def _flush(self) -> list[bytes]:
        field, self._field = self._field, []
        if not field:
            return []
        if _forged(b"".join(field), self.authserv_id):
            self.removed.append(field[0].split(b":", 1)[0])
            return []
        return field


def header_section(message: bytes) -> bytes:
    end = message.find(b"\r\n\r\n")
    return message if end < 0 else message[: end + 2]


def from_addresses(message: bytes) -> tuple[int, list[str]]:
    """How many From header fields there are, and the addresses in them (lower-cased)."""
    parsed = BytesHeaderParser(policy=compat32).parsebytes(header_section(message))
    values = [str(v) for v in parsed.get_all("From") or []]
    addresses = [addr.strip().lower() for _name, addr in getaddresses(values) if "@" in addr]
    return len(values), addresses


def domain_of(address: str) -> str:
    return address.rpartition("@")[2].strip().strip(".").lower()
