"""The IMAP server's command line and argument parsing: Twisted's IMAP4Server with strict
parsers (see `parse`) in its place.

What the client sends is checked here before any command runs: the tag, the command
name, NUL octets, literal sizes, mailbox name encoding, sequence sets (1 to 2**32-1),
the nesting of parenthesized lists, and literals in SEARCH (read like Twisted reads them
for astrings, up to the line limit in all). Whatever an argument parser raises on what
the client sent is a syntax error of the client's (`IllegalClientResponse`, answered
BAD with its reason), never an internal error. This module must never run a command
nor touch the Maildir.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.mail import imap4
from twisted.mail.imap4 import (
    IllegalClientResponse,
    IllegalMailboxEncoding,
    IllegalOperation,
)
from twisted.python.failure import Failure

from .parse import (
    LITERAL_AT_END,
    MAX_DEPTH,
    check_command_name,
    check_tag,
    literal_size,
    nesting_depth,
    parse_list,
    parse_quoted,
    parse_seqset,
)

log = Logger()

_Base = imap4.IMAP4Server
MAX_COMMAND = 65536
"""The most a command may hold with its literals (other than APPEND's message)."""


@functools.cache
def _guarded(parser: Callable[..., Any]) -> Callable[..., Any]:
    """`parser`, with anything it raises on the client's bytes turned into a BAD."""
    if getattr(parser, "_guarded", False):
        return parser

    def parse(self: Any, line: bytes) -> Any:
        try:
            result = parser(self, line if line is not None else b"")
        except (IllegalClientResponse, IllegalOperation, IllegalMailboxEncoding):
            raise
        except Exception as e:
            raise _refused(e) from None
        if isinstance(result, Deferred):
            result.addErrback(_refuse_failure)
        return result

    parse._guarded = True  # type: ignore[attr-defined]
    parse.__name__ = parser.__name__
    return parse


def _refused(e: Exception) -> IllegalClientResponse:
    log.info("IMAP arguments refused ({kind})", kind=type(e).__name__)
    return IllegalClientResponse("Malformed arguments")


def _refuse_failure(failure: Failure) -> Failure:
    if failure.check(IllegalClientResponse, IllegalOperation, IllegalMailboxEncoding):
        return failure
    exc = failure.value
    return Failure(_refused(exc if isinstance(exc, Exception) else Exception(repr(exc))))


def decode_mailbox(raw: bytes) -> str:
    """A mailbox name as sent (modified UTF-7, RFC 3501 5.1.3), decoded. Twisted's codec
    takes malformed forms (`&Jjo` for `&Jjo-`, `&AGE-` for `a`) and lone surrogates:
    an ASCII name must be the canonical form of what it decodes to. (8-bit names are
    taken as UTF-8, as the codec does, for clients that send them so.)"""
    try:
        name: str = raw.decode("imap4-utf-7")
        name.encode("utf-8")
        canonical = not raw.isascii() or name.encode("imap4-utf-7") == raw
    except Exception:
        canonical = False
    if not canonical:
        raise IllegalClientResponse("Invalid mailbox name encoding")
    if "\x00" in name:
        raise IllegalClientResponse("Invalid mailbox name")
    return name


class StrictParsing(_Base):  # type: ignore[misc]
    """IMAP4Server with strict command line and argument parsing (see the module)."""

    MAX_LENGTH = MAX_COMMAND

    def parse_command(self, line: bytes) -> None:
        tag, _, rest = line.partition(b" ")
        try:
            check_tag(tag)
        except IllegalClientResponse as e:
            self.sendBadResponse(None, str(e).encode())
            return
        cmd, _, args = rest.partition(b" ")
        try:
            if b"\x00" in line:
                raise IllegalClientResponse("NUL octet in command")
            if not cmd:
                raise IllegalClientResponse("Missing command")
            check_command_name(cmd)
            self.dispatchCommand(tag, cmd.upper(), args)
        except Exception:
            self.answer_failure(Failure(), tag)

    def lookupCommand(self, cmd: bytes) -> Any:
        """Use this class's overrides for handlers and argument parsers in the tables, the
        parsers guarded (see `_guarded`)."""
        spec = super().lookupCommand(cmd)
        if spec is None:
            return None
        cls = type(self)
        out = []
        for i, x in enumerate(spec):
            if callable(x) and hasattr(x, "__name__"):
                x = getattr(cls, x.__name__, x)
                if i:
                    x = _guarded(x)
            out.append(x)
        return tuple(out)

    def answer_failure(self, failure: Failure, tag: bytes | None) -> None:
        raise NotImplementedError

    # -- literals -----------------------------------------------------------------------

    def _literal_size(self, line: bytes) -> int:
        m = LITERAL_AT_END.fullmatch(line.strip())
        if m is None:
            raise IllegalClientResponse("Malformed literal")
        if m.group(2):
            raise IllegalClientResponse("Non-synchronizing literals are not supported")
        return literal_size(m.group(1))

    def arg_astring(self, line: bytes, final: bool = False) -> Any:
        stripped = line.strip()
        if stripped[:1] == b"{":
            size = self._literal_size(stripped)
            if final and not size:
                return (b"", b"")
            return self._stringLiteral(size)
        if stripped[:1] == b'"':
            value, end = parse_quoted(stripped, 1)
            rest = stripped[end:]
            if rest[:1] not in (b"", b" "):
                raise IllegalClientResponse("Missing space after quoted string")
            return value, rest[1:]
        if not stripped:
            raise IllegalClientResponse("Missing argument")
        return super().arg_astring(line, final)

    def arg_finalastring(self, line: bytes) -> Any:
        return self.arg_astring(line, final=True)

    def arg_mailbox(self, line: bytes, final: bool = False) -> Any:
        result = self.arg_astring(line, final)
        if isinstance(result, Deferred):
            return result.addCallback(lambda r: (decode_mailbox(r[0]), r[1]))
        return (decode_mailbox(result[0]), result[1])

    def arg_finalmailbox(self, line: bytes) -> Any:
        return self.arg_mailbox(line, final=True)

    # -- sequence sets, FETCH and SEARCH arguments ---------------------------------------

    def arg_seqset(self, line: bytes) -> Any:
        head, _, rest = line.partition(b" ")
        return parse_seqset(head), rest

    def arg_fetchatt(self, line: bytes) -> Any:
        if nesting_depth(line) > MAX_DEPTH:
            raise IllegalClientResponse("Too deeply nested")
        if LITERAL_AT_END.search(line.strip()):
            raise IllegalClientResponse("Literal in a place that takes none")
        try:
            return super().arg_fetchatt(line)
        except IllegalClientResponse:
            raise
        except Exception:
            raise IllegalClientResponse("Bad FETCH attributes") from None

    def arg_searchkeys(self, line: bytes) -> Any:
        """The search program, its literals read as they come (each one announced at the
        end of a line, as RFC 3501 7.5 has it)."""
        m = LITERAL_AT_END.search(line)
        if m is None:
            return (parse_list(line), b"")
        if len(line) > MAX_COMMAND:
            raise IllegalClientResponse("Command too long")
        size = self._literal_size(m.group(0))
        d: Deferred[Any] = self._stringLiteral(size)
        d.addCallback(lambda r: self.arg_searchkeys(line + b"\r\n" + r[0] + r[1]))
        return d

    # -- the command tables: mailbox names decoded by the parser ---------------------------

    auth_SELECT: Any = (_Base._selectWork, arg_mailbox, 1, b"SELECT")
    select_SELECT: Any = auth_SELECT
    auth_EXAMINE: Any = (_Base._selectWork, arg_mailbox, 0, b"EXAMINE")
    select_EXAMINE: Any = auth_EXAMINE
    auth_CREATE: Any = (_Base.do_CREATE, arg_finalmailbox)
    select_CREATE: Any = auth_CREATE
    auth_DELETE: Any = (_Base.do_DELETE, arg_finalmailbox)
    select_DELETE: Any = auth_DELETE
    auth_RENAME: Any = (_Base.do_RENAME, arg_mailbox, arg_finalmailbox)
    select_RENAME: Any = auth_RENAME
    auth_SUBSCRIBE: Any = (_Base.do_SUBSCRIBE, arg_finalmailbox)
    select_SUBSCRIBE: Any = auth_SUBSCRIBE
    auth_UNSUBSCRIBE: Any = (_Base.do_UNSUBSCRIBE, arg_finalmailbox)
    select_UNSUBSCRIBE: Any = auth_UNSUBSCRIBE
    auth_LIST: Any = (_Base._listWork, arg_mailbox, arg_mailbox, 0, b"LIST")
    select_LIST: Any = auth_LIST
    auth_LSUB: Any = (_Base._listWork, arg_mailbox, arg_mailbox, 1, b"LSUB")
    select_LSUB: Any = auth_LSUB
    auth_STATUS: Any = (_Base.do_STATUS, arg_mailbox, _Base.arg_plist)
    select_STATUS: Any = auth_STATUS
    auth_APPEND: Any = (
        _Base.do_APPEND,
        arg_mailbox,
        _Base.opt_plist,
        _Base.opt_datetime,
        _Base.arg_literal,
    )
    select_APPEND: Any = auth_APPEND
    select_COPY: Any = (_Base.do_COPY, arg_seqset, arg_finalmailbox)
