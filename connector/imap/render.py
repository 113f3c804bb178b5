"""What one message's FETCH response says, rendered away from the reactor.

`render` turns a message and the FETCH items asked for into the pieces of its
`* n FETCH (...)` response: bytes, and `Stream`s (an open file and a range) for large
BODY[] / BODY[TEXT] / RFC822 data of files already in CRLF form, which the server sends
from the file as the connection takes it. Everything else is read, parsed and formatted
here, so a message that cannot be rendered fails before any of its response is written.
8-bit values go out as literals, never as quoted strings (RFC 3501 4.3, RFC 9051 4.3).

Rendering blocks (file I/O, MIME parsing): the server runs it in a worker thread. This
module must never touch a connection or the reactor, and never write to a message file.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import IO, Any

from twisted.mail.imap4 import collapseNestedLists

from .fetch import format_internaldate
from .message import MaildirMessage, filter_headers
from .structure import body_structure, envelope

STREAM_MIN = 256 * 1024
"""Literals at least this long, of files in CRLF form, are streamed from the file."""

LISTING_ITEMS = frozenset({"flags", "uid", "internaldate", "rfc822size"})
"""Items answered from the folder listing (RFC822.SIZE once the served size is known)."""


@dataclass
class Stream:
    """`length` bytes of an open file from `start`, sent as one literal."""

    f: IO[bytes]
    start: int
    length: int


Piece = bytes | Stream


def literal(data: bytes) -> bytes:
    return b"{%d}\r\n%b" % (len(data), data)


def listing_item(item: Any, msg: MaildirMessage) -> bytes:
    """One of `LISTING_ITEMS` (RFC822.SIZE reads the file if its served size is unknown)."""
    kind = item.type
    if kind == "flags":
        return b"FLAGS (" + " ".join(msg.getFlags()).encode("ascii", "replace") + b")"
    if kind == "uid":
        return b"UID %d" % msg.info.uid
    if kind == "internaldate":
        return b"INTERNALDATE " + format_internaldate(msg.info.internaldate)
    if kind == "rfc822size":
        return b"RFC822.SIZE %d" % msg.size()
    raise ValueError(kind)


def render(seq: int, msg: MaildirMessage, query: list[Any], uid: bool) -> list[Piece]:
    """The whole `* seq FETCH (...)` response of one message."""
    items = list(query)
    if uid and not any(item.type == "uid" for item in items):
        items.append(_UID)
    out: list[Piece] = [b"* %d FETCH (" % seq]
    try:
        for i, item in enumerate(items):
            if i:
                out.append(b" ")
            out.extend(_item(item, msg))
    except BaseException:
        close(out)
        raise
    out.append(b")\r\n")
    return _joined(out)


def close(pieces: list[Piece]) -> None:
    """Close the files of the streams among `pieces` (a response not sent)."""
    for piece in pieces:
        if isinstance(piece, Stream):
            piece.f.close()


class _UIDItem:
    type = "uid"


_UID = _UIDItem()


def _joined(pieces: list[Piece]) -> list[Piece]:
    out: list[Piece] = []
    run: list[bytes] = []
    for piece in pieces:
        if isinstance(piece, bytes):
            run.append(piece)
            continue
        if run:
            out.append(b"".join(run))
            run = []
        out.append(piece)
    if run:
        out.append(b"".join(run))
    return out


def _item(item: Any, msg: MaildirMessage) -> list[Piece]:
    kind = item.type
    if kind in LISTING_ITEMS:
        return [listing_item(item, msg)]
    if kind == "envelope":
        return [b"ENVELOPE " + collapseNestedLists([envelope(msg.header_message())])]
    if kind == "bodystructure":
        tree = msg.tree()
        return [b"BODYSTRUCTURE " + collapseNestedLists([body_structure(tree, msg.raw(), True)])]
    if kind == "rfc822header":
        return [b"RFC822.HEADER " + literal(msg.header_section())]
    if kind == "rfc822text":
        return [b"RFC822.TEXT ", *_whole(msg, msg.body_offset, None)]
    if kind == "rfc822":
        return [b"RFC822 ", *_whole(msg, 0, None)]
    if kind == "body":
        return _body(item, msg)
    raise ValueError(f"unknown FETCH item {kind!r}")


def _whole(msg: MaildirMessage, start: int, length: int | None) -> list[Piece]:
    """A literal of the served message from `start` (`length` bytes, or to the end)."""
    ends = msg.line_ends()
    begin = min(max(start, 0), ends.size)
    n = ends.size - begin if length is None else max(0, min(length, ends.size - begin))
    if ends.clean and n >= STREAM_MIN:
        return [Stream(msg.open(), begin, n)]
    return [literal(msg.raw()[begin : begin + n])]


def _body(item: Any, msg: MaildirMessage) -> list[Piece]:
    if not (item.empty or item.header or item.text or item.mime):
        tree = msg.tree()
        return [b"BODY " + collapseNestedLists([body_structure(tree, msg.raw(), False)])]
    begin, length = item.partialBegin, item.partialLength
    whole = copy.copy(item)
    whole.partialBegin = None
    label = whole.getBytes()
    if begin is not None:
        label += b"<%d>" % begin
    path = tuple(item.part or ())
    if not path and (item.empty or item.text):
        start = 0 if item.empty else msg.body_offset
        if begin is not None:
            return [label + b" ", *_whole(msg, start + begin, length)]
        return [label + b" ", *_whole(msg, start, None)]
    data = _section(msg, path, item)
    if begin is not None:
        data = data[begin : begin + length]
    return [label + b" " + literal(data)]


def _section(msg: MaildirMessage, path: tuple[int, ...], item: Any) -> bytes:
    """BODY[path.HEADER...], BODY[path.MIME], BODY[path.TEXT] or BODY[path] (served form)."""
    if not path:
        raw = msg.header_section()
        if item.header and item.header.fields:
            return filter_headers(raw, list(item.header.fields), item.header.negate)
        return raw
    try:
        node = msg.resolve(path)
    except IndexError:
        return b""
    data = msg.raw()
    if item.mime:
        return data[node.start : node.body]
    if item.header or item.text:
        if not node.is_message:
            return b""
        inner = node.children[0]
        if item.text:
            return data[inner.body : inner.end]
        head = data[inner.start : inner.body]
        if item.header.fields:
            return filter_headers(head, list(item.header.fields), item.header.negate)
        return head
    return data[node.body : node.end]
