"""Strict parsing of what an IMAP client sends: tags, command names, sequence sets and
parenthesized lists with literals (RFC 3501 section 9, RFC 9051 section 9).

Each function takes the client's bytes and returns the parsed value or raises
`IllegalClientResponse` with a short reason the server may send back. Nothing here
recurses on the client's input (nesting is bounded by `MAX_DEPTH` and walked with an
explicit stack), and nothing here touches a connection, the Maildir or the log.
"""

from __future__ import annotations

import bisect
import re

from twisted.mail.imap4 import IllegalClientResponse, MessageSet

MAX_DEPTH = 16
"""Parentheses nested deeper than this in a SEARCH or FETCH argument are refused."""
MAX_NUMBER = 4294967295
"""The largest message number or UID (RFC 3501 `nz-number`, 32 bits unsigned)."""
MAX_LITERAL_DIGITS = 10
"""A literal's size has at most this many digits (it is below 2**32 at any rate)."""

# tag = 1*<any ASTRING-CHAR except "+">; ASTRING-CHAR = ATOM-CHAR / "]"
_TAG_RE = re.compile(rb"[\x21\x23\x24\x26\x27\x2c-\x5b\x5d-\x7a\x7c\x7e]+")
_ATOM_RE = re.compile(rb"[\x21\x23\x24\x26\x27\x2b-\x5a\x5e-\x7a\x7c\x7e]+")
_NUMBER_RE = re.compile(rb"[1-9][0-9]{0,9}")
LITERAL_AT_END = re.compile(rb"\{(-?[0-9]+)(\+?)\}$")
"""A literal's announcement at the end of a line (sign allowed so it can be refused)."""


def check_tag(tag: bytes) -> None:
    if not tag:
        raise IllegalClientResponse("Empty tag")
    if _TAG_RE.fullmatch(tag) is None:
        raise IllegalClientResponse("Invalid characters in tag")


def check_command_name(name: bytes) -> None:
    if _ATOM_RE.fullmatch(name) is None:
        raise IllegalClientResponse("Invalid command name")


def literal_size(digits: bytes) -> int:
    """The size of a literal announced as `{digits}`: a non-negative number that fits."""
    if not digits.isdigit() or len(digits) > MAX_LITERAL_DIGITS:
        raise IllegalClientResponse("Bad literal size")
    size = int(digits)
    if size > MAX_NUMBER:
        raise IllegalClientResponse("Bad literal size")
    return size


def _number(text: bytes) -> int:
    if _NUMBER_RE.fullmatch(text) is None or int(text) > MAX_NUMBER:
        raise IllegalClientResponse("Bad message number")
    return int(text)


def parse_seqset(text: bytes, last: int | None = None) -> MessageSet:
    """A `sequence-set`: numbers 1..4294967295 or `*`, single or as `a:b`, comma-separated.
    `*` stands for `last` when one is given (else it is left open, as Twisted's parser does).
    `*:*` is read as `*`. The ranges are sorted and merged once (Twisted's `MessageSet.add`
    does it at every range, quadratic in a long set)."""
    if not text:
        raise IllegalClientResponse("Missing message set")
    ranges: list[tuple[int | None, int | None]] = []
    for part in text.split(b","):
        if part == b"*:*":
            part = b"*"
        ends = part.split(b":")
        if len(ends) > 2 or not all(ends):
            raise IllegalClientResponse("Bad message set")
        values = [last if e == b"*" else _number(e) for e in ends]
        low, high = values[0], values[-1]
        if low is None or (high is not None and low > high):
            low, high = high, low
        if low is None:
            low, high = high, None
        ranges.append((low, high))
    return MessageSet(ranges)


class Spans:
    """The numbers of a `MessageSet` once `*` is known (`last`): sorted, disjoint ranges,
    with membership by binary search."""

    def __init__(self, messages: MessageSet, last: int) -> None:
        resolved = MessageSet()
        resolved.ranges = list(messages.ranges)
        resolved.last = last
        self.ranges: list[tuple[int, int]] = [(int(lo), int(hi)) for lo, hi in resolved.ranges]
        self.starts = [lo for lo, _hi in self.ranges]

    def __contains__(self, value: int) -> bool:
        i = bisect.bisect_right(self.starts, value) - 1
        return i >= 0 and value <= self.ranges[i][1]

    def select(self, values: list[int]) -> list[int]:
        """Indexes into the ascending `values` of those in the set, in order."""
        out: list[int] = []
        for lo, hi in self.ranges:
            out.extend(range(bisect.bisect_left(values, lo), bisect.bisect_right(values, hi)))
        return out


def nesting_depth(text: bytes) -> int:
    """How deep parentheses and brackets nest in `text`, outside quoted strings."""
    depth = deepest = 0
    quoted = escaped = False
    for c in text:
        if quoted:
            if escaped:
                escaped = False
            elif c == 0x5C:
                escaped = True
            elif c == 0x22:
                quoted = False
        elif c == 0x22:
            quoted = True
        elif c in (0x28, 0x5B):
            depth += 1
            deepest = max(deepest, depth)
        elif c in (0x29, 0x5D):
            depth -= 1
    return deepest


Item = bytes | list["Item"]


def parse_list(text: bytes, max_depth: int = MAX_DEPTH) -> list[Item]:
    """Space-separated atoms, quoted strings, literals (`{n}\\r\\n` then n octets, as the
    server assembles them) and parenthesized lists, into nested lists of bytes."""
    stack: list[list[Item]] = [[]]
    i, n = 0, len(text)
    while i < n:
        c = text[i : i + 1]
        if c == b" ":
            i += 1
        elif c == b"(":
            if len(stack) > max_depth:
                raise IllegalClientResponse("Too deeply nested")
            stack.append([])
            i += 1
        elif c == b")":
            if len(stack) == 1:
                raise IllegalClientResponse("Unbalanced parentheses")
            inner = stack.pop()
            stack[-1].append(inner)
            i += 1
        elif c == b'"':
            value, i = parse_quoted(text, i + 1)
            stack[-1].append(value)
        elif c == b"{":
            end = text.find(b"}", i)
            if end == -1:
                raise IllegalClientResponse("Malformed literal")
            size = literal_size(text[i + 1 : end].rstrip(b"+"))
            start = end + 3
            if text[end + 1 : start] != b"\r\n" or start + size > n:
                raise IllegalClientResponse("Literal in a place that takes none")
            stack[-1].append(text[start : start + size])
            i = start + size
        else:
            j = i
            while j < n and text[j : j + 1] not in (b" ", b"(", b")", b'"', b"{"):
                j += 1
            word = text[i:j]
            if any(b < 0x20 or b > 0x7E for b in word):
                raise IllegalClientResponse("Invalid characters")
            stack[-1].append(word)
            i = j
    if len(stack) != 1:
        raise IllegalClientResponse("Unbalanced parentheses")
    return stack[0]


def parse_quoted(text: bytes, i: int) -> tuple[bytes, int]:
    """The quoted string whose content starts at `text[i]` (after the opening quote), and
    the index after its closing quote."""
    out = bytearray()
    n = len(text)
    while i < n:
        c = text[i]
        if c == 0x22:
            return bytes(out), i + 1
        if c == 0x5C:
            if i + 1 >= n or text[i + 1] not in (0x22, 0x5C):
                raise IllegalClientResponse("Bad escape in quoted string")
            out.append(text[i + 1])
            i += 2
            continue
        if c in (0x0D, 0x0A):
            raise IllegalClientResponse("Line break in quoted string")
        out.append(c)
        i += 1
    raise IllegalClientResponse("Unterminated quoted string")
