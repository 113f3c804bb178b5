"""ENVELOPE and BODY/BODYSTRUCTURE values (RFC 3501 7.4.2) built from `email` messages.

The results are nested lists for `twisted.mail.imap4.collapseNestedLists`. Header values
are passed through as sent (encoded words are not decoded); 8-bit values become literals.
This module must never raise on a malformed message: odd input degrades to defaults.
"""

from __future__ import annotations

import email.utils
from email.message import Message
from typing import Any

from .message import body_bytes, subparts


class Literal:
    """A value that collapseNestedLists must send as a literal (8-bit data)."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def read(self) -> bytes:
        return self.data


def nstring(value: str | None) -> Any:
    """IMAP nstring: None -> NIL; unfolded bytes, as a literal when not plain ASCII."""
    if value is None:
        return None
    raw = value.encode("ascii", "surrogateescape")
    raw = raw.replace(b"\r\n", b"").replace(b"\n", b"").replace(b"\r", b"")
    if any(b > 0x7E or b < 0x20 and b != 0x09 for b in raw):
        return Literal(raw)
    return raw


def _header(m: Message, name: str) -> str | None:
    v = m.get(name)
    return None if v is None else str(v)


def _addresses(value: str | None) -> Any:
    if value is None:
        return None
    out = []
    for name, addr in email.utils.getaddresses([value.replace("\r", "").replace("\n", "")]):
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


def _params(m: Message, header: str, skip_first: bool = True) -> Any:
    try:
        params = m.get_params(header=header) or []
    except Exception:
        return None
    out: list[Any] = []
    for i, (k, v) in enumerate(params):
        if i == 0 and skip_first:
            continue
        if isinstance(v, tuple):
            v = email.utils.collapse_rfc2231_value(v)
        out.extend([nstring(k), nstring(str(v))])
    return out or None


def _disposition(m: Message) -> Any:
    value = m.get("content-disposition")
    if value is None:
        return None
    kind = str(value).split(";", 1)[0].strip() or "attachment"
    return [nstring(kind), _params(m, "content-disposition")]


def _extension(m: Message) -> list[Any]:
    return [
        _disposition(m),
        nstring(_header(m, "content-language")),
        nstring(_header(m, "content-location")),
    ]


def _lines(data: bytes) -> int:
    n = data.count(b"\n")
    if data and not data.endswith(b"\n"):
        n += 1
    return n


def body_structure(
    m: Message, linesep: str, extended: bool, body: bytes | None = None
) -> list[Any]:
    """BODYSTRUCTURE (extended) or BODY of a message or part.

    `body` may be given for the top-level message so its size matches the file exactly.
    """
    maintype = m.get_content_maintype()
    subtype = m.get_content_subtype()
    children = subparts(m)
    if maintype == "multipart" and children:
        result: list[Any] = [body_structure(p, linesep, extended) for p in children]
        result.append(nstring(subtype))
        if extended:
            result.append(_params(m, "content-type"))
            result.extend(_extension(m))
        return result
    if body is None:
        body = body_bytes(m, linesep)
    if maintype == "multipart":
        maintype, subtype = "text", "plain"
    cte = _header(m, "content-transfer-encoding")
    result = [
        nstring(maintype),
        nstring(subtype),
        _params(m, "content-type") if m.get("content-type") else [b"charset", b"us-ascii"],
        nstring(_header(m, "content-id")),
        nstring(_header(m, "content-description")),
        nstring(cte.strip() if cte else "7bit"),
        len(body),
    ]
    if maintype == "message" and subtype == "rfc822" and children:
        inner = children[0]
        result.append(envelope(inner))
        result.append(body_structure(inner, linesep, extended))
        result.append(_lines(body))
    elif maintype == "text":
        result.append(_lines(body))
    if extended:
        result.append(nstring(_header(m, "content-md5")))
        result.extend(_extension(m))
    return result
