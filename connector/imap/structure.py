"""ENVELOPE and BODY/BODYSTRUCTURE values (RFC 3501 7.4.2) of a message's part tree.

The results are nested lists for `twisted.mail.imap4.collapseNestedLists`. Header values
are sent as the message holds them: encoded words are not decoded, and a value with 8-bit
bytes or control characters is sent as a literal (RFC 3501 allows no such byte in a
quoted string). Sizes and line counts are of the served bytes the tree was parsed from.
A part the bounded parser did not look into (`Part.opaque`), or an attached message that
is itself encoded, is described as application/octet-stream. This module must never
raise on a malformed message: odd input degrades to defaults.
"""

from __future__ import annotations

import email.utils
from email.message import Message
from typing import Any
from urllib.parse import quote

from maildir.mimetree import Part, to_bytes

_QUOTABLE_MAX = 1000


class Literal:
    """A value that collapseNestedLists must send as a literal (8-bit data)."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def read(self) -> bytes:
        return self.data


def nstring(value: str | bytes | None) -> Any:
    """IMAP nstring: None -> NIL; unfolded bytes, as a literal when not plain ASCII text."""
    if value is None:
        return None
    raw = to_bytes(value) if isinstance(value, str) else value
    raw = raw.replace(b"\r", b"").replace(b"\n", b"").replace(b"\0", b"")
    if len(raw) > _QUOTABLE_MAX or any(b > 0x7E or (b < 0x20 and b != 0x09) for b in raw):
        return Literal(raw)
    return raw


def _header(m: Message, name: str) -> str | None:
    try:
        v = m.get(name)
    except Exception:
        return None
    return None if v is None else str(v)


def _addresses(value: str | None) -> Any:
    if value is None:
        return None
    out = []
    try:
        pairs = email.utils.getaddresses([value.replace("\r", "").replace("\n", "")])
    except Exception:
        return None
    for name, addr in pairs:
        if not addr and not name:
            continue
        mailbox, _, host = addr.rpartition("@") if "@" in addr else (addr, "", "")
        out.append([nstring(name or None), None, nstring(mailbox or None), nstring(host or None)])
    return out or None


def envelope(m: Message) -> list[Any]:
    from_ = _header(m, "from")
    sender = _header(m, "sender") or from_
    reply_to = _header(m, "reply-to") or from_
    return [
        nstring(_header(m, "date")),
        nstring(_header(m, "subject")),
        _addresses(from_),
        _addresses(sender),
        _addresses(reply_to),
        _addresses(_header(m, "to")),
        _addresses(_header(m, "cc")),
        _addresses(_header(m, "bcc")),
        nstring(_header(m, "in-reply-to")),
        nstring(_header(m, "message-id")),
    ]


def _params(m: Message, header: str) -> Any:
    """The parameters of a Content-Type or Content-Disposition field, as sent; RFC 2231
    continuations are joined into one `name*` parameter, its value left encoded."""
    try:
        params = m.get_params(header=header) or []
    except Exception:
        return None
    out: list[Any] = []
    for k, v in params[1:]:
        if isinstance(v, tuple):
            charset, language, text = v
            encoded = quote(text.encode("latin-1", "replace"), safe="!#$&+-.^_`|~")
            out.extend([nstring(k + "*"), nstring(f"{charset or ''}'{language or ''}'{encoded}")])
        else:
            out.extend([nstring(k), nstring(str(v))])
    return out or None


def _disposition(m: Message) -> Any:
    value = _header(m, "content-disposition")
    if value is None:
        return None
    kind = value.split(";", 1)[0].strip() or "attachment"
    return [nstring(kind), _params(m, "content-disposition")]


def _extension(m: Message) -> list[Any]:
    return [
        _disposition(m),
        nstring(_header(m, "content-language")),
        nstring(_header(m, "content-location")),
    ]


def _lines(data: bytes, start: int, end: int) -> int:
    n = data.count(b"\n", start, end)
    if end > start and data[end - 1] != 0x0A:
        n += 1
    return n


def body_structure(part: Part, data: bytes, extended: bool) -> list[Any]:
    """BODYSTRUCTURE (extended) or BODY of `part`, a part of the tree of `data`."""
    m = part.headers
    if part.is_multipart:
        result: list[Any] = [body_structure(p, data, extended) for p in part.children]
        result.append(nstring(part.subtype))
        if extended:
            result.append(_params(m, "content-type"))
            result.extend(_extension(m))
        return result
    maintype, subtype = part.maintype, part.subtype
    message = maintype == "message" and subtype in ("rfc822", "global")
    if part.opaque or (message and not part.children):
        maintype, subtype = "application", "octet-stream"
        params = None
    elif maintype == "multipart":  # no usable parts: its text is all there is
        maintype, subtype = "text", "plain"
        params = _params(m, "content-type")
    elif not part.content_type_given:
        params = [b"charset", b"us-ascii"] if maintype == "text" else None
    else:
        params = _params(m, "content-type")
    cte = _header(m, "content-transfer-encoding")
    result = [
        nstring(maintype),
        nstring(subtype),
        params,
        nstring(_header(m, "content-id")),
        nstring(_header(m, "content-description")),
        nstring(cte.strip() if cte and cte.strip() else "7bit"),
        part.end - part.body,
    ]
    if maintype == "message" and part.children:
        inner = part.children[0]
        result.append(envelope(inner.headers))
        result.append(body_structure(inner, data, extended))
        result.append(_lines(data, part.body, part.end))
    elif maintype == "text":
        result.append(_lines(data, part.body, part.end))
    if extended:
        result.append(nstring(_header(m, "content-md5")))
        result.extend(_extension(m))
    return result
