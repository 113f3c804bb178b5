"""IMAP SEARCH evaluation (RFC 3501 6.4.4) over MaildirMessage objects.

Parses the key list that Twisted's argument parser produces (bytes and nested lists)
into a predicate and applies it. It only reads messages; it must never change flags.
Unknown keys raise SearchError so the server can answer BAD instead of guessing.
"""

from __future__ import annotations

import calendar
import email.utils
from collections.abc import Callable
from typing import Any

from twisted.mail.imap4 import IllegalClientResponse

from maildir.mimetree import header_end

from .fieldcache import FIELDS, FieldCache
from .message import HEADER_LIMIT, MaildirMessage
from .parse import Spans, parse_seqset

_MONTHS = ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"]

Pred = Callable[[int, MaildirMessage], bool]

MAX_NESTING = 100
"""How deep NOT, OR and parentheses may nest in a search program (each level is a call
when the program is compiled and when it runs)."""


class SearchError(Exception):
    """The search program is malformed or uses an unsupported key."""


def _date(value: bytes) -> int:
    """An IMAP date ("1-Feb-1994") as the epoch seconds of its UTC midnight."""
    try:
        d, m, y = value.decode("ascii").strip('"').split("-")
        return calendar.timegm((int(y), _MONTHS.index(m.lower()[:3]) + 1, int(d), 0, 0, 0))
    except (ValueError, UnicodeDecodeError):
        raise SearchError(f"bad date {value!r}") from None


def _day(ts: float) -> int:
    return int(ts // 86400 * 86400)


def _sent_day(msg: MaildirMessage) -> int | None:
    value = msg.header_message().get("date")
    if value is None:
        return None
    try:
        return _day(email.utils.parsedate_to_datetime(str(value)).timestamp())
    except (TypeError, ValueError):
        return None


def _contains(haystack: str | bytes, needle: bytes) -> bool:
    if isinstance(haystack, str):
        haystack = haystack.encode("utf-8", "surrogateescape")
    return needle.lower() in haystack.lower()


def _cached_field_has(cache: FieldCache, index: int, needle: bytes) -> Pred:
    """`_header_has` for one of the cached fields (`FIELDS[index]`)."""
    lowered = needle.lower()

    def pred(seq: int, msg: MaildirMessage) -> bool:
        value = cache.entry(msg)[index]
        if value is None:
            return False
        return not needle or lowered in value

    return pred


def _header_has(name: str, needle: bytes) -> Pred:
    def pred(seq: int, msg: MaildirMessage) -> bool:
        values = msg.header_message().get_all(name) or []
        if not needle:
            return bool(values)
        return any(_contains(str(v), needle) for v in values)

    return pred


def _flag(flag: str, present: bool = True) -> Pred:
    return lambda seq, msg: (flag in msg.info.flags) == present


CACHED_KEYS = frozenset(name.upper().encode() for name in FIELDS)
"""Search keys a warm `FieldCache` answers without reading files: FROM, TO, CC, BCC, SUBJECT."""

CONTENT_KEYS = CACHED_KEYS | {b"HEADER", b"BODY", b"TEXT", b"SENTBEFORE", b"SENTON", b"SENTSINCE"}
CONTENT_KEYS |= {b"LARGER", b"SMALLER"}  # the served size, until known, is read from the file
"""Search keys that read the message files; the others are answered from the listing."""


def reads_files(query: list[Any], fields_cached: bool) -> bool:
    """Whether the search program will read message files, when the fields cache holds
    (`fields_cached`) or not every message's fields. A word equal to such a key as an
    argument counts too, which errs on the side of yes."""
    keys = CONTENT_KEYS - CACHED_KEYS if fields_cached else CONTENT_KEYS

    def uses(items: list[Any]) -> bool:
        for item in items:
            if isinstance(item, list):
                if uses(item):
                    return True
            elif (item if isinstance(item, bytes) else str(item).encode()).upper() in keys:
                return True
        return False

    return uses(query)


class Compiler:
    """Turns the parsed SEARCH arguments into one predicate."""

    def __init__(self, last_seq: int, last_uid: int, cache: FieldCache | None = None) -> None:
        self.last_seq = last_seq
        self.last_uid = last_uid
        self.cache = cache
        self.depth = 0

    def compile(self, query: list[Any]) -> Pred:
        items = list(query)
        preds = []
        while items:
            preds.append(self._one(items))
        return lambda seq, msg: all(p(seq, msg) for p in preds)

    def _nested(self, compile_inner: Callable[[], Pred]) -> Pred:
        self.depth += 1
        if self.depth > MAX_NESTING:
            raise SearchError("search program nested too deeply")
        try:
            return compile_inner()
        finally:
            self.depth -= 1

    def _arg(self, items: list[Any]) -> bytes:
        if not items or isinstance(items[0], list):
            raise SearchError("missing search argument")
        value = items.pop(0)
        return value if isinstance(value, bytes) else str(value).encode()

    def _one(self, items: list[Any]) -> Pred:
        item = items.pop(0)
        if isinstance(item, list):
            return self._nested(lambda: self.compile(item))
        key = item.upper() if isinstance(item, bytes) else str(item).upper().encode()
        simple: dict[bytes, Pred] = {
            b"ALL": lambda seq, msg: True,
            b"ANSWERED": _flag("\\Answered"),
            b"DELETED": _flag("\\Deleted"),
            b"DRAFT": _flag("\\Draft"),
            b"FLAGGED": _flag("\\Flagged"),
            b"SEEN": _flag("\\Seen"),
            b"UNANSWERED": _flag("\\Answered", False),
            b"UNDELETED": _flag("\\Deleted", False),
            b"UNDRAFT": _flag("\\Draft", False),
            b"UNFLAGGED": _flag("\\Flagged", False),
            b"UNSEEN": _flag("\\Seen", False),
            b"RECENT": lambda seq, msg: msg.info.recent,
            b"OLD": lambda seq, msg: not msg.info.recent,
            b"NEW": lambda seq, msg: msg.info.recent and "\\Seen" not in msg.info.flags,
        }
        if key in simple:
            return simple[key]
        if key in CACHED_KEYS:
            return self._field(key.decode().lower(), self._arg(items))
        if key == b"HEADER":
            name = self._arg(items).decode("ascii", "replace")
            return self._field(name.lower(), self._arg(items))
        if key == b"BODY":
            needle = self._arg(items)

            def body(seq: int, msg: MaildirMessage) -> bool:
                with msg.open() as f:
                    data = f.read()
                return _contains(data[header_end(data, 0, len(data), HEADER_LIMIT) :], needle)

            return body
        if key == b"TEXT":
            needle = self._arg(items)

            def text(seq: int, msg: MaildirMessage) -> bool:
                with msg.open() as f:
                    return _contains(f.read(), needle)

            return text
        if key in (b"LARGER", b"SMALLER"):
            try:
                n = int(self._arg(items))
            except ValueError:
                raise SearchError("bad size") from None
            if key == b"LARGER":
                return lambda seq, msg: msg.size() > n
            return lambda seq, msg: msg.size() < n
        if key in (b"BEFORE", b"ON", b"SINCE"):
            day = _date(self._arg(items))
            if key == b"BEFORE":
                return lambda seq, msg: _day(msg.info.internaldate) < day
            if key == b"ON":
                return lambda seq, msg: _day(msg.info.internaldate) == day
            return lambda seq, msg: _day(msg.info.internaldate) >= day
        if key in (b"SENTBEFORE", b"SENTON", b"SENTSINCE"):
            day = _date(self._arg(items))
            ops: dict[bytes, Callable[[int], bool]] = {
                b"SENTBEFORE": lambda d: d < day,
                b"SENTON": lambda d: d == day,
                b"SENTSINCE": lambda d: d >= day,
            }
            op = ops[key]

            def sent(seq: int, msg: MaildirMessage) -> bool:
                d = _sent_day(msg)
                return d is not None and op(d)

            return sent
        if key == b"KEYWORD":
            self._arg(items)
            return lambda seq, msg: False
        if key == b"UNKEYWORD":
            self._arg(items)
            return lambda seq, msg: True
        if key == b"NOT":
            if not items:
                raise SearchError("NOT needs an argument")
            inner = self._nested(lambda: self._one(items))
            return lambda seq, msg: not inner(seq, msg)
        if key == b"OR":
            if len(items) < 2:
                raise SearchError("OR needs two arguments")
            a = self._nested(lambda: self._one(items))
            b = self._nested(lambda: self._one(items))
            return lambda seq, msg: a(seq, msg) or b(seq, msg)
        if key == b"UID":
            uids = Spans(self._set(self._arg(items), self.last_uid), self.last_uid or 1)
            return lambda seq, msg: msg.info.uid in uids
        if key[:1].isdigit() or key[:1] == b"*":
            seqs = Spans(self._set(key, self.last_seq), self.last_seq or 1)
            return lambda seq, msg: seq in seqs
        raise SearchError(f"unsupported search key {key.decode('ascii', 'replace')}")

    def _field(self, name: str, needle: bytes) -> Pred:
        if self.cache is not None and name in FIELDS:
            return _cached_field_has(self.cache, FIELDS.index(name), needle)
        return _header_has(name, needle)

    @staticmethod
    def _set(value: bytes, last: int) -> Any:
        try:
            return parse_seqset(value, last or 1)
        except IllegalClientResponse:
            raise SearchError("bad message set") from None


def run_search(
    query: list[Any],
    messages: list[tuple[int, MaildirMessage]],
    last_uid: int,
    cache: FieldCache | None = None,
) -> list[tuple[int, int]]:
    """(sequence number, UID) of the messages matching `query`; `cache` keeps the header
    fields read, for the next search."""
    last_seq = messages[-1][0] if messages else 0
    pred = Compiler(last_seq, last_uid, cache).compile(query)
    if not query:
        raise SearchError("empty search")
    out = []
    for seq, msg in messages:
        try:
            if pred(seq, msg):
                out.append((seq, msg.info.uid))
        except FileNotFoundError:
            continue
    if cache is not None:
        cache.prune(messages)
    return out
