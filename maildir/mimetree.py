"""The MIME structure of a stored message, found over its raw bytes within fixed limits.

The IMAP server (BODYSTRUCTURE, BODY[n]) and the local API's parsing (`maildir.message`)
both take a message's parts from here. `email`'s own parser has no limits: a message of
50,000 parts takes it seconds, and 1,000 nested multiparts overflow the stack. Here the
boundaries are found by regular-expression scans over the bytes (C speed, no per-line
Python work), and `email` only ever sees bounded pieces: one part's header section at a
time. Past `MIMELimits.max_depth` levels of nesting, `max_parts` parts or `max_header_lines`
header lines, whatever is left of a part is one opaque part, not looked into (its own
header is still read). So the Python work per message is bounded by the limits, and the
rest is a few linear scans of the bytes.

Every part is a range of the bytes given: `start` (its header section), `body` (after the
blank line) and `end` (before the line break that opens the next delimiter line), so a
caller can slice out exactly what the message holds (8-bit bytes included) and measure
sizes and line counts of exactly what it sends.

This module must never touch the filesystem, and must never raise on any input.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from email.message import Message
from email.parser import BytesHeaderParser
from email.policy import Compat32

__all__ = [
    "DEFAULT_LIMITS",
    "MIMELimits",
    "Part",
    "RawHeaders",
    "header_end",
    "header_section",
    "parse",
    "parse_headers",
    "to_bytes",
]


@dataclass(frozen=True)
class MIMELimits:
    """How much of a message's structure is looked into."""

    max_depth: int = 30
    """Levels of nesting (multipart in multipart, attached messages) below the message."""
    max_parts: int = 1000
    """Parts in all, the message itself included."""
    max_header_lines: int = 20_000
    """Header lines read in all parts together."""
    max_header_bytes: int = 1 << 20
    """How far into a part its blank line (the end of its header section) is looked for."""
    max_false_delimiters: int = 10_000
    """Lines that begin like a delimiter line but are not one, skipped in all; past that,
    no more delimiters are looked for (the part being read runs to its parent's end)."""


DEFAULT_LIMITS = MIMELimits()


class RawHeaders(Compat32):
    """`email`'s compat32 policy, except that header values come back as they were parsed.

    Compat32 turns a value holding 8-bit bytes into a `Header` whose `str()` decodes them
    (as "unknown-8bit"), so the bytes the message holds are lost and encoding the value
    back to bytes fails. With this policy a value is the str the parser made of the raw
    bytes (ASCII, with surrogate escapes for 8-bit bytes), and `to_bytes` gives back
    exactly the bytes of the message. This is the one place `email` is worked around.
    """

    def header_fetch_parse(self, name: str, value: str) -> str:
        return value


RAW = RawHeaders()


def to_bytes(value: str) -> bytes:
    """The bytes a header value parsed under `RawHeaders` stands for."""
    return value.encode("utf-8", "surrogateescape")


def parse_headers(section: bytes) -> Message:
    """A header section as a Message with raw values (no body)."""
    try:
        return BytesHeaderParser(policy=RAW).parsebytes(section)
    except Exception:  # the parser is lenient; this is a last resort
        return Message(policy=RAW)


@dataclass(eq=False)
class Part:
    """One MIME part: ranges of the message's bytes and its parsed header fields."""

    start: int
    """Where the part's header section begins."""
    body: int
    """Where its body begins (after the blank line that ends the header section)."""
    end: int
    """Where its body ends."""
    headers: Message
    """Its header fields (raw values, see `RawHeaders`); no payload."""
    maintype: str
    subtype: str
    depth: int
    children: list[Part] = field(default_factory=list)
    """Parts of a multipart, or the one message of a message/rfc822 part."""
    opaque: bool = False
    """A limit stopped the parse here: the part's content was not looked into."""
    content_type_given: bool = True
    """Whether the part has a valid Content-Type field (else the default applies)."""

    @property
    def content_type(self) -> str:
        return f"{self.maintype}/{self.subtype}"

    @property
    def is_multipart(self) -> bool:
        return self.maintype == "multipart" and bool(self.children)

    @property
    def is_message(self) -> bool:
        return self.maintype == "message" and bool(self.children) and not self.is_multipart


class _Budget:
    def __init__(self, limits: MIMELimits) -> None:
        self.limits = limits
        self.parts = limits.max_parts
        self.lines = limits.max_header_lines
        self.steps = limits.max_false_delimiters

    @property
    def spent(self) -> bool:
        return self.parts <= 0 or self.lines <= 0


_IDENTITY_ENCODINGS = frozenset({"", "7bit", "8bit", "binary"})
_FIELD = re.compile(rb"[!-9;-~]+[ \t]*:")
_CTYPE = re.compile(r"\s*([!#-'*+.0-9A-Z^-~-]+)/([!#-'*+.0-9A-Z^-~-]+)\s*(?:;|$)", re.I | re.S)


def parse(data: bytes, limits: MIMELimits = DEFAULT_LIMITS) -> Part:
    """The part tree of a whole message."""
    budget = _Budget(limits)
    return _part(data, 0, len(data), 0, budget, "text/plain")


def header_section(data: bytes, limits: MIMELimits = DEFAULT_LIMITS) -> bytes:
    """The message's header section, within the limits on its size and lines."""
    section = data[: header_end(data, 0, len(data), limits.max_header_bytes)]
    if section.count(b"\n") > limits.max_header_lines:
        section = b"\n".join(section.split(b"\n", limits.max_header_lines)[:-1]) + b"\n"
    return section


def header_end(data: bytes, start: int, end: int, limit: int) -> int:
    """Where the body of the part in data[start:end] begins: after its first blank line.

    A part that begins with a blank line, or with a line that is not a header field,
    has no header fields. With no blank line within
    `limit` bytes, a part shorter than that is all header; a longer one's header section
    is cut after the last whole line within the limit.
    """
    if data.startswith(b"\r\n", start, end):
        return start + 2
    if data.startswith(b"\n", start, end):
        return start + 1
    if start < end and _FIELD.match(data, start, end) is None:
        return start  # the part begins with a line that is no header field: all body
    stop = min(end, start + limit)
    best = None
    for sep in (b"\n\r\n", b"\n\n"):
        i = data.find(sep, start, stop)
        if i >= 0 and (best is None or i + len(sep) < best):
            best = i + len(sep)
    if best is not None:
        return best
    if stop >= end:
        return end
    cut = data.rfind(b"\n", start, stop)
    return cut + 1 if cut >= 0 else stop


def _header_section(data: bytes, start: int, body: int, budget: _Budget) -> bytes:
    section = data[start:body]
    lines = section.count(b"\n")
    if lines > budget.lines:
        section = b"\n".join(section.split(b"\n", budget.lines)[: budget.lines]) + b"\n"
        lines = budget.lines
    budget.lines -= lines
    return section


def _content_type(headers: Message, default: str) -> tuple[str, str, bool]:
    value = headers.get("content-type")
    if value is not None:
        m = _CTYPE.match(str(value))
        if m is not None:
            return m.group(1).lower(), m.group(2).lower(), True
    main, _, sub = default.partition("/")
    return main, sub, False


def _part(data: bytes, start: int, end: int, depth: int, budget: _Budget, default: str) -> Part:
    limits = budget.limits
    budget.parts -= 1
    body = header_end(data, start, end, limits.max_header_bytes)
    headers = parse_headers(_header_section(data, start, body, budget))
    maintype, subtype, given = _content_type(headers, default)
    part = Part(start, body, end, headers, maintype, subtype, depth, content_type_given=given)
    boundary = None
    if maintype == "multipart":
        boundary = _param(headers, "boundary")
        if not boundary:  # not a usable multipart: a leaf
            return part
    elif maintype != "message" or subtype not in ("rfc822", "global"):
        return part
    else:
        cte = str(headers.get("content-transfer-encoding", "")).strip().lower()
        if cte not in _IDENTITY_ENCODINGS:  # an encoded message is a leaf
            return part
    if depth >= limits.max_depth or budget.spent:
        part.opaque = True
        return part
    if boundary is not None:
        child_default = "message/rfc822" if subtype == "digest" else "text/plain"
        _split(data, part, boundary, budget, child_default)
    else:
        part.children.append(_part(data, body, end, depth + 1, budget, "text/plain"))
    return part


def _param(headers: Message, name: str) -> bytes | None:
    try:
        value = headers.get_param(name, header="content-type")
    except Exception:
        return None
    if isinstance(value, tuple):  # RFC 2231: the percent-decoded octets, as latin-1 text
        return value[2].encode("latin-1", "replace")
    if not isinstance(value, str):
        return None
    return to_bytes(value)


_TAIL = re.compile(rb"(--)?[ \t]*(?:\r?\n|\Z)")
_CLOSE_TAIL = re.compile(rb"()[ \t]*(?:\r?\n|\Z)")


def _delimiter(
    data: bytes, needle: bytes, tail: re.Pattern[bytes], pos: int, end: int, budget: _Budget
) -> tuple[int, int, bool] | None:
    """The next delimiter line from `pos`: (where `needle` starts, where the next line
    starts, whether it closes the multipart). Text that looks like a delimiter but is not
    one costs a step of the budget; with none left, no more delimiters are looked for."""
    while budget.steps > 0:
        i = data.find(needle, pos, end)
        if i < 0:
            return None
        m = tail.match(data, i + len(needle), end)
        if m is not None:
            return i, m.end(), m.group(1) is not None
        budget.steps -= 1
        pos = i + 1
    return None


def _split(data: bytes, part: Part, boundary: bytes, budget: _Budget, default: str) -> None:
    """Find the parts of a multipart between its delimiter lines (RFC 2046 5.1.1)."""
    body, end = part.body, part.end
    dash = b"--" + boundary
    line = b"\n" + dash
    if data.startswith(dash, body, end):
        found = _delimiter(data, dash, _TAIL, body, end, budget)
    else:
        found = _delimiter(data, line, _TAIL, body, end, budget)
    if found is None:
        return
    _at, pos, closing = found
    while not closing:
        if budget.spent:  # the rest of this multipart is one opaque part
            c = _delimiter(data, line + b"--", _CLOSE_TAIL, pos, end, budget)
            stop = _line_start(data, c[0]) if c is not None else end
            if stop > pos:
                rest = _part(data, pos, stop, part.depth + 1, budget, default)
                rest.children.clear()  # (none: the budget is spent)
                rest.opaque = True
                part.children.append(rest)
            return
        found = _delimiter(data, line, _TAIL, pos, end, budget)
        stop = end if found is None else _line_start(data, found[0])
        part.children.append(_part(data, pos, max(pos, stop), part.depth + 1, budget, default))
        if found is None:
            return
        _at, pos, closing = found


def _line_start(data: bytes, newline: int) -> int:
    """The end of a part's body: before the CRLF (or LF) at `newline` that opens a
    delimiter line."""
    return newline - 1 if newline > 0 and data[newline - 1] == 0x0D else newline
