"""Parsing stored messages for the HTTP API: summaries, bodies, headers and attachments.

Everything here is a pure function of the message bytes. The parts come from the bounded
parser in `maildir.mimetree` (`email`'s own parser takes seconds on a message of 50,000
parts and overflows the stack on 1,000 nested ones); `email` objects are then built from
that tree, so the work per message is bounded by its limits, and a part past them is one
opaque application/octet-stream attachment. An HTML body is served sanitized
(`maildir.htmlsafe`: nothing active, no hidden text, remote images blocked), and so is the
text made from it for a message without a text part and for previews; the body as received
is kept beside it. This module must never touch the filesystem
or the network, and must never raise on malformed mail: broken MIME, unknown charsets, bad
encodings and undecodable headers fall back to replacement decoding. The only exception it
raises on purpose is `AttachmentNotFound`.
"""

from __future__ import annotations

import mimetypes
import re
import unicodedata
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from email import policy
from email.header import decode_header, make_header
from email.message import EmailMessage, Message
from email.parser import BytesHeaderParser
from email.utils import getaddresses

from . import htmlsafe, mimetree
from .htmlsafe import HTMLFinding

__all__ = [
    "AttachmentInfo",
    "AttachmentNotFound",
    "MessageDetail",
    "MessageSummary",
    "from_address",
    "get_attachment",
    "header_summary",
    "parse_detail",
    "read_header",
    "sanitize_filename",
    "summarize",
]

PREVIEW_CHARS = 200
MAX_FILENAME_CHARS = 150
_MAX_EXTENSION_CHARS = 20
_MAX_HEADER_SECTION = 1 << 20
_QUEUE_ID_HEADER = "X-Tailpost-Queue-ID"

_RESERVED = re.compile(r'[<>:"/\\|?*]')
_SPACES = re.compile(r"\s+")
_MSGID = re.compile(r"<[^<>\s]+>")
_WINDOWS_DEVICES = frozenset(
    ["CON", "PRN", "AUX", "NUL"]
    + [f"COM{i}" for i in range(1, 10)]
    + [f"LPT{i}" for i in range(1, 10)]
)
# Built-in table only, so guesses do not depend on the host's /etc/mime.types.
_MIME = mimetypes.MimeTypes(filenames=())


class AttachmentNotFound(LookupError):
    """The message has no attachment with the requested index."""


@dataclass(frozen=True)
class MessageSummary:
    subject: str
    from_: str
    to: list[str]
    cc: list[str]
    date: str
    message_id: str
    preview: str
    queue_id: str = ""  # value of X-Tailpost-Queue-ID, "" when absent


@dataclass(frozen=True)
class AttachmentInfo:
    index: int
    filename: str  # already sanitised
    content_type: str
    size_bytes: int
    content_id: str = ""  # without angle brackets; "" when the part has none


@dataclass(frozen=True)
class MessageDetail:
    summary: MessageSummary
    headers: str
    body_text: str  # the text part; without one, the visible text of the HTML part
    body_html: str  # sanitized (`maildir.htmlsafe`)
    in_reply_to: str
    references: list[str]
    attachments: list[AttachmentInfo]
    authentication_results: list[str]  # Authentication-Results values, topmost first
    body_html_raw: str = ""  # the HTML part as received
    html_findings: tuple[HTMLFinding, ...] = ()  # what sanitizing found and removed


# -- text helpers ----------------------------------------------------------------------------


def _clean(text: str) -> str:
    """Turn surrogate-escaped raw bytes into real text (UTF-8, with replacement)."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _decode(payload: bytes, charset: str | None) -> str:
    if charset:
        try:
            # bytes.decode refuses non-text codecs (zlib, base64...) with LookupError
            return payload.decode(charset, "replace")
        except Exception:  # unknown or broken charset: fall through to UTF-8
            pass
    return payload.decode("utf-8", "replace")


def _collapse(text: str) -> str:
    return _SPACES.sub(" ", text).strip()


def _preview(text: str, html: str) -> str:
    source = text if text.strip() else htmlsafe.sanitize(html).text
    return _collapse(source[: PREVIEW_CHARS * 20])[:PREVIEW_CHARS]


# -- parsing ---------------------------------------------------------------------------------


def _parse(data: bytes) -> EmailMessage:
    """The message as `email` objects, built from its bounded part tree."""
    return _as_email(data, mimetree.parse(data))


def _as_email(data: bytes, part: mimetree.Part) -> EmailMessage:
    """What `email`'s parser would have made of one part (header values and payloads as
    surrogate-escaped text), its children built likewise; a part the tree did not look
    into is an application/octet-stream leaf of its bytes."""
    msg = EmailMessage(policy=policy.default)
    for name, value in part.headers.raw_items():
        msg.set_raw(name, value)
    if part.opaque:
        del msg["content-type"]
        del msg["content-transfer-encoding"]
        msg.set_raw("Content-Type", "application/octet-stream")
    elif part.maintype == "message" and not part.content_type_given:
        msg.set_default_type("message/rfc822")  # a part of a multipart/digest
    if part.children and not part.opaque:
        msg.set_payload([_as_email(data, child) for child in part.children])
    else:
        msg.set_payload(data[part.body : part.end].decode("ascii", "surrogateescape"))
    return msg


def _decode_raw(raw: str) -> str:
    try:
        return _clean(_collapse(str(make_header(decode_header(raw)))))
    except Exception:
        return _clean(_collapse(raw))


def _all_headers(msg: Message, name: str) -> list[str]:
    """Decoded values of every `name` header, in order (never raises)."""
    try:
        return [_clean(_collapse(str(v))) for v in msg.get_all(name) or []]
    except Exception:  # a header the parser chokes on: decode the raw text instead
        lname = name.lower()
        return [_decode_raw(str(v)) for k, v in msg.raw_items() if k.lower() == lname]


def _header(msg: Message, name: str) -> str:
    values = _all_headers(msg, name)
    return values[0] if values else ""


def _addresses(msg: Message, name: str) -> list[str]:
    result: list[str] = []
    try:
        for value in msg.get_all(name) or []:
            addresses = getattr(value, "addresses", None)
            if addresses:
                result.extend(_clean(str(a)) for a in addresses)
            elif str(value).strip():
                result.extend(_fallback_addresses(str(value)))
        return result
    except Exception:
        raw = _header(msg, name)
        return _fallback_addresses(raw) if raw else []


def _fallback_addresses(value: str) -> list[str]:
    out: list[str] = []
    for display, addr in getaddresses([value]):
        if addr:
            out.append(_clean(f"{display} <{addr}>" if display else addr))
    return out or [_clean(_collapse(value))]


def _content_type(part: Message) -> str:
    try:
        return part.get_content_type()
    except Exception:
        return "application/octet-stream"


def _payload_bytes(part: Message) -> bytes:
    """The decoded content of a leaf part; an attached message is returned whole."""
    try:
        if part.is_multipart():
            inner = part.get_payload()
            if isinstance(inner, list) and len(inner) == 1 and isinstance(inner[0], Message):
                return inner[0].as_bytes(policy=policy.SMTP)
            return b""
        payload = part.get_payload(decode=True)
        return payload if isinstance(payload, bytes) else b""
    except Exception:
        raw = part.get_payload()
        if isinstance(raw, str):
            return raw.encode("utf-8", "surrogateescape")
        return b""


def _part_text(part: Message | None) -> str:
    if part is None:
        return ""
    try:
        charset = part.get_content_charset()
    except Exception:
        charset = None
    return _decode(_payload_bytes(part), charset)


def _bodies(msg: EmailMessage) -> tuple[Message | None, Message | None]:
    text_part: Message | None = None
    html_part: Message | None = None
    try:
        text_part = msg.get_body(preferencelist=("plain",))
    except Exception:
        text_part = None
    try:
        html_part = msg.get_body(preferencelist=("html",))
    except Exception:
        html_part = None
    return text_part, html_part


def _leaves(part: Message, depth: int = 0) -> Iterator[Message]:
    """Leaf parts in order; attached messages are leaves, not descended into."""
    maintype = _content_type(part).split("/")[0]
    if maintype == "multipart" and depth < 50:
        payload = part.get_payload()
        if isinstance(payload, list):
            for sub in payload:
                if isinstance(sub, Message):
                    yield from _leaves(sub, depth + 1)
        return
    yield part


def _filename(part: Message) -> str:
    try:
        name = part.get_filename()
    except Exception:
        name = None
    if not name:
        try:
            name = part.get_param("name", header="content-type")  # type: ignore[assignment]
            if isinstance(name, tuple):
                name = name[2]
        except Exception:
            name = None
    return _clean(str(name)) if name else ""


def _is_attachment(part: Message) -> bool:
    try:
        if part.get_content_disposition() == "attachment":
            return True
    except Exception:
        pass
    return bool(_filename(part))


def _attachment_parts(
    msg: EmailMessage, bodies: tuple[Message | None, Message | None]
) -> list[Message]:
    text_part, html_part = bodies
    parts: list[Message] = []
    try:
        for leaf in _leaves(msg):
            is_body = leaf is text_part or leaf is html_part
            if not is_body or _is_attachment(leaf):
                parts.append(leaf)
    except Exception:
        pass
    return parts


def _content_id(part: Message) -> str:
    try:
        value = str(part.get("Content-ID", "") or "")
    except Exception:
        return ""
    return _clean(value).strip().strip("<>").strip()


def _attachment_info(index: int, part: Message, content: bytes) -> AttachmentInfo:
    content_type = _content_type(part)
    name = _filename(part)
    if name:
        filename = sanitize_filename(name)
    else:
        ext = ".eml" if content_type == "message/rfc822" else _MIME.guess_extension(content_type)
        filename = f"attachment-{index + 1}{ext or '.bin'}"
    return AttachmentInfo(
        index=index,
        filename=filename,
        content_type=content_type,
        size_bytes=len(content),
        content_id=_content_id(part),
    )


_HEADER_LINE = re.compile(rb"[!-9;-~]+:")


def _raw_header_section(data: bytes) -> str:
    """The header lines as received (up to the first line that is not one), CRLF ended."""
    ends = [i for i in (data.find(b"\r\n\r\n"), data.find(b"\n\n")) if i >= 0]
    section = data[: min(ends) if ends else _MAX_HEADER_SECTION]
    lines: list[str] = []
    for raw in section.splitlines():
        if _HEADER_LINE.match(raw) or (lines and raw[:1] in (b" ", b"\t")):
            lines.append(raw.decode("utf-8", "replace") + "\r\n")
        else:
            break
    return "".join(lines)


def _summary(msg: Message, text: str, html: str) -> MessageSummary:
    return MessageSummary(
        subject=_header(msg, "Subject"),
        from_=", ".join(_addresses(msg, "From")),
        to=_addresses(msg, "To"),
        cc=_addresses(msg, "Cc"),
        date=_header(msg, "Date"),
        message_id=_header(msg, "Message-ID"),
        preview=_preview(text, html),
        queue_id=_header(msg, _QUEUE_ID_HEADER),
    )


# -- public API ------------------------------------------------------------------------------


def read_header(data: bytes, name: str) -> str:
    """The decoded value of the first `name` header, parsing the header section only."""
    msg = _parse_headers(data)
    return "" if msg is None else _header(msg, name)


def _parse_headers(data: bytes) -> Message | None:
    try:
        return BytesHeaderParser(policy=policy.default).parsebytes(mimetree.header_section(data))
    except Exception:
        return None


def header_summary(data: bytes) -> MessageSummary:
    """The summary fields that live in the header section (the preview is left empty)."""
    msg = _parse_headers(data)
    if msg is None:
        return MessageSummary("", "", [], [], "", "", "")
    return _summary(msg, "", "")


def from_address(data: bytes) -> str:
    """The bare, lower-cased address of the first From mailbox; "" when there is none."""
    msg = _parse_headers(data)
    if msg is None:
        return ""
    try:
        value = msg.get("From")
        addresses = getattr(value, "addresses", None)
        if addresses:
            return _clean(str(addresses[0].addr_spec)).strip().lower()
    except Exception:
        pass
    raw = _header(msg, "From")
    found = [addr for _display, addr in getaddresses([raw]) if "@" in addr]
    return found[0].strip().lower() if found else ""


def summarize(data: bytes) -> MessageSummary:
    msg = _parse(data)
    text_part, html_part = _bodies(msg)
    text = _clean(_part_text(text_part))
    html = "" if text.strip() else _clean(_part_text(html_part))
    return _summary(msg, text, html)


def parse_detail(
    data: bytes,
    *,
    remote_images: bool = False,
    attachment_url: Callable[[int], str] | None = None,
) -> MessageDetail:
    """The whole message; `body_html` sanitized, remote images kept only if `remote_images`,
    `cid:` references to attachments pointed at `attachment_url(index)` when given."""
    msg = _parse(data)
    bodies = _bodies(msg)
    body_text = _clean(_part_text(bodies[0]))
    raw_html = _clean(_part_text(bodies[1]))
    attachments = [
        _attachment_info(i, part, _payload_bytes(part))
        for i, part in enumerate(_attachment_parts(msg, bodies))
    ]
    cid_urls: dict[str, str] = {}
    if attachment_url is not None:
        cid_urls = {a.content_id: attachment_url(a.index) for a in attachments if a.content_id}
    safe = htmlsafe.sanitize(raw_html, remote_images=remote_images, cid_urls=cid_urls)
    if not body_text.strip() and safe.text:
        body_text = safe.text
    references = _MSGID.findall(_header(msg, "References"))
    return MessageDetail(
        summary=_summary(msg, body_text, ""),
        headers=_raw_header_section(data),
        body_text=body_text,
        body_html=safe.html,
        in_reply_to=_header(msg, "In-Reply-To"),
        references=references,
        attachments=attachments,
        authentication_results=_all_headers(msg, "Authentication-Results"),
        body_html_raw=raw_html,
        html_findings=safe.findings,
    )


def get_attachment(data: bytes, index: int) -> tuple[AttachmentInfo, bytes]:
    """The attachment at zero-based `index` and its decoded bytes."""
    if index < 0:
        raise AttachmentNotFound(index)
    msg = _parse(data)
    parts = _attachment_parts(msg, _bodies(msg))
    if index >= len(parts):
        raise AttachmentNotFound(index)
    part = parts[index]
    content = _payload_bytes(part)
    return _attachment_info(index, part, content), content


def sanitize_filename(name: str) -> str:
    """A file name safe to show and to save: no directories, controls or reserved characters.

    Never empty ("attachment" instead); at most 150 characters, keeping the extension.
    """
    name = unicodedata.normalize("NFC", _clean(name))
    name = name.replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(
        ch for ch in name if unicodedata.category(ch) not in ("Cc", "Cf", "Cs", "Co", "Zl", "Zp")
    )
    name = _RESERVED.sub("_", name)
    name = _collapse(name).lstrip(". ").rstrip(". ")
    if not name:
        return "attachment"
    if name.split(".", 1)[0].strip().upper() in _WINDOWS_DEVICES:
        name = "_" + name
    stem, dot, ext = name.rpartition(".")
    if len(name) > MAX_FILENAME_CHARS:
        if dot and stem and len(ext) <= _MAX_EXTENSION_CHARS:
            keep = MAX_FILENAME_CHARS - len(ext) - 1
            name = stem[:keep].rstrip(". ") + "." + ext
        else:
            name = name[:MAX_FILENAME_CHARS].rstrip(". ")
    return name or "attachment"
