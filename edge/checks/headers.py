"""Header-section work for the checks: the streaming filter and the From header's facts.

`HeaderFilter` sits between the SMTP data stream and the spool: it removes, while the
header section streams by, every incoming `Authentication-Results` header that claims the
edge's own authserv-id (RFC 8601 §5) and every `X-Tailpost-*` header, since only the edge
may write those. It holds at most one header field (with its folded lines) in memory, which
the SMTP server's header-size limit bounds. Nothing here does I/O.
"""

from __future__ import annotations

import functools
import re
from email.parser import BytesHeaderParser
from email.policy import compat32
from email.utils import getaddresses

TAILPOST_PREFIX = b"x-tailpost-"
_TRUST = re.compile(rb"^[ \t]*(?:authentication-results|x-tailpost-)", re.IGNORECASE | re.MULTILINE)
"""A line that may start a field only the edge may write (then the section is read field by
field)."""


def authserv_id_of(value: str) -> str:
    """The authserv-id of an Authentication-Results value (RFC 8601 §2.2), lower-cased:
    the first token or quoted string (its quoted pairs undone) after any CFWS. Comments
    nest to any depth and may hold quoted pairs (RFC 5322 §3.2.2), as a reader such as
    `authres` takes them; one pass over the value, however deep the nesting. A comment
    left open leaves no authserv-id ("")."""
    i, n, depth = 0, len(value), 0
    while i < n:
        c = value[i]
        if c == "\\" and depth:
            i += 2
            continue
        if c == "(":
            depth += 1
        elif c == ")" and depth:
            depth -= 1
        elif not depth and not c.isspace():
            break
        i += 1
    if i >= n:
        return ""
    if value[i] == '"':
        out: list[str] = []
        i += 1
        while i < n and value[i] != '"':
            if value[i] == "\\":
                i += 1
            out.append(value[i : i + 1])
            i += 1
        return "".join(out).lower()
    end = i
    while end < n and not value[end].isspace() and value[end] not in ';("':
        end += 1
    return value[i:end].lower()


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

    def feed(self, chunk: bytes) -> list[bytes]:
        """Complete lines (one or several, each ending in LF) in; what to keep out, in order."""
        if not self.in_headers:
            return [chunk]
        last = len(chunk) - 1
        if chunk.find(b"\n") == last:
            return self._line(chunk)
        if not self._field and chunk.endswith(b"\r\n\r\n") and not _TRUST.search(chunk):
            # The whole rest of the header section, and no field in it that only the edge
            # may write: it goes through as it is.
            self.in_headers = False
            return [chunk]
        out: list[bytes] = []
        start = 0
        while start <= last:
            end = chunk.find(b"\n", start) + 1 or len(chunk)
            line = chunk[start:end]
            out.extend(self._line(line) if self.in_headers else (line,))
            start = end
        return out

    def _line(self, line: bytes) -> list[bytes]:
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


# A header section of well-formed fields only: each a field name (printable, no ":"), ":"
# and a value on lines that end in CRLF, folded onto lines that start with SP or HTAB.
_PLAIN_FIELDS = re.compile(rb"(?:[\x21-\x39\x3b-\x7e]+:[^\r\n]*\r\n(?:[ \t][^\r\n]*\r\n)*)*")
_FROM_FIELD = re.compile(
    rb"^from:([^\r\n]*(?:\r\n[ \t][^\r\n]*)*)\r\n", re.IGNORECASE | re.MULTILINE
)
_OBS_FROM = re.compile(rb"^(from)[ \t]+:", re.IGNORECASE | re.MULTILINE)
"""A From field in the obsolete syntax, white space before its colon (RFC 5322 §4.5.3)."""


def plain_fields(head: bytes) -> bool:
    """Whether a header section is made only of well-formed fields ending in CRLF."""
    return _PLAIN_FIELDS.fullmatch(head) is not None


def from_values(head: bytes) -> list[str]:
    """The values of the From fields of a header section, as `email`'s parser reads them.

    The parser (`BytesHeaderParser`, compat32) reads every field of the section into a
    Message: some 20 us for a small header section, for the one field the checks need, which
    made it the costliest step of the checks per message. A section made only of well-formed fields is scanned here instead, to the same values
    (the value after the colon without its leading WSP, folding kept, a non-ASCII octet
    read as U+FFFD); anything else (bare CR or LF, a line that is not a field, a Unix
    "From " line, a folded first line) goes to the parser, which decides what it means.

    A From field in the obsolete syntax (`From :`, white space before the colon) counts as
    a From field: mail readers show it as the sender, so DMARC must see it, where the
    parser alone would read it as no field (or as the end of the section).
    """
    head = _OBS_FROM.sub(rb"\1:", head)
    if plain_fields(head):
        return [
            m.group(1).decode("ascii", "replace").lstrip(" \t") for m in _FROM_FIELD.finditer(head)
        ]
    parsed = BytesHeaderParser(policy=compat32).parsebytes(head)
    return [str(v) for v in parsed.get_all("From") or []]


def from_addresses(message: bytes) -> tuple[int, list[str]]:
    """How many From header fields there are, and the addresses in them (lower-cased)."""
    values = tuple(from_values(header_section(message)))
    if sum(map(len, values)) <= KEEP_ADDRESSES_UP_TO:
        return len(values), list(_addresses(values))
    return len(values), list(_addresses.__wrapped__(values))


KEEP_ADDRESSES_UP_TO = 998
"""From values up to this many characters in all have their addresses kept (the same
values, as a sender's messages have them, are parsed once; at most 1024 sets are kept)."""


@functools.lru_cache(maxsize=1024)
def _addresses(values: tuple[str, ...]) -> tuple[str, ...]:
    pairs = getaddresses(list(values))
    return tuple(addr.strip().lower() for _name, addr in pairs if "@" in addr)


def domain_of(address: str) -> str:
    return address.rpartition("@")[2].strip().strip(".").lower()
