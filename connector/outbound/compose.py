"""Building the device's outgoing messages: new mail and replies, as RFC 5322 bytes.

A `Draft` (sender, recipients, subject, bodies, attachments, thread headers) becomes the
bytes the outbound queue takes and the envelope that goes with them (`compose`): built with
the standard library's `email` package, multipart/alternative for a text and an HTML body,
multipart/mixed with attachments, encoded words (RFC 2047) and RFC 2231 file names for
non-ASCII text, raw UTF-8 headers only when an address needs them (RFC 6532), a Message-ID
on the sender's domain and a Date. `reply_plan` reads a stored message and says whom a
reply goes to and with which Subject, In-Reply-To and References, as mail clients do.
Addresses are checked with the same rules the edge applies at MAIL and RCPT
(`edge.smtp.address`). This module must never do I/O, never put a Bcc recipient into a
header, and never emit a bare CR or LF.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email import policy
from email.errors import NonASCIILocalPartDefect
from email.headerregistry import Address, AddressHeader, HeaderRegistry
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid

from edge.smtp.address import validate_address
from edge.smtp.replies import SMTPReplyError
from maildir.message import header_summary, read_header

__all__ = [
    "MAX_ATTACHMENT_BYTES",
    "MAX_RECIPIENTS",
    "Attachment",
    "ComposeError",
    "Composed",
    "Draft",
    "ReplyPlan",
    "compose",
    "parse_addresses",
    "reply_plan",
    "reply_subject",
]

MAX_ATTACHMENT_BYTES = 25 * 1024 * 1024
"""The decoded size of all of a message's attachments together."""
MAX_RECIPIENTS = 100
"""Envelope recipients of one message (To, Cc and Bcc together): the edge's limit."""
MAX_REFERENCES = 20

_REGISTRY = HeaderRegistry()
_SEVEN_BIT = policy.SMTP.clone(cte_type="7bit")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_MSGID = re.compile(r"<[!-;=?-~]{1,250}@[!-;=?-~]{1,250}>")
_CONTENT_TYPE = re.compile(
    r"(?P<main>[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126})/(?P<sub>[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126})"
)
_RE_PREFIX = re.compile(r"^(?:\s*re\s*(?:\[[0-9]{1,4}\])?\s*:)+\s*", re.IGNORECASE)
_BARE_NEWLINE = re.compile(rb"\r(?!\n)|(?<!\r)\n")


class ComposeError(ValueError):
    """A draft that cannot become a message: `code` says what (machine-readable), the text
    says why in words a user can act on."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Attachment:
    filename: str
    content_type: str
    data: bytes


@dataclass(frozen=True)
class Draft:
    """A message to build; addresses already parsed by `parse_addresses`."""

    sender: Address
    to: list[Address]
    cc: list[Address] = field(default_factory=list)
    bcc: list[Address] = field(default_factory=list)
    subject: str = ""
    text: str | None = None
    html: str | None = None
    attachments: list[Attachment] = field(default_factory=list)
    in_reply_to: str = ""
    references: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Composed:
    """The bytes to queue and their envelope (Bcc recipients only here)."""

    data: bytes
    sender: str
    recipients: list[str]
    message_id: str
    subject: str


@dataclass(frozen=True)
class ReplyPlan:
    """Whom a reply goes to, from which of our addresses, and its thread headers."""

    to: list[Address]
    cc: list[Address]
    own_address: str  # the first of our addresses the original was sent to, or ""
    subject: str
    in_reply_to: str
    references: list[str]


def _address_header(name: str, value: str) -> AddressHeader:
    header = _REGISTRY(name, value)
    assert isinstance(header, AddressHeader)
    return header


def parse_addresses(name: str, value: str | list[str]) -> list[Address]:
    """The mailboxes in `value` (one string of comma-separated mailboxes, or a list of
    them), each `addr@domain` or `Name <addr@domain>`; UTF-8 addresses (RFC 6531) are
    allowed. ComposeError names the field and the entry that is not a mailbox."""
    items = [value] if isinstance(value, str) else value
    found: list[Address] = []
    for item in items:
        if _CONTROL.search(item):
            raise ComposeError("invalid_address", f"{name}: control characters in {item!r}")
        try:
            header = _address_header("To", item)
        except Exception:  # the standard parser fails on some inputs ("a@") with IndexError
            raise ComposeError("invalid_address", f"{name}: not an address: {item!r}") from None
        defects = [
            d
            for d in getattr(header, "defects", ())
            if not isinstance(d, NonASCIILocalPartDefect)  # RFC 6531 allows it
        ]
        if defects or any(g.display_name is not None for g in header.groups):
            raise ComposeError("invalid_address", f"{name}: not a list of addresses: {item!r}")
        for address in header.addresses:
            _check_address(name, address.addr_spec)
            found.append(address)
        if len(found) > MAX_RECIPIENTS:
            raise ComposeError(
                "too_many_recipients", f"{name}: more than {MAX_RECIPIENTS} addresses"
            )
    return found


def _check_address(name: str, addr_spec: str) -> None:
    try:
        validate_address(addr_spec, smtputf8=True)
    except SMTPReplyError:
        raise ComposeError("invalid_address", f"{name}: not an address: {addr_spec!r}") from None


def check_content_type(value: str) -> tuple[str, str]:
    """`type/subtype` of an attachment, lower-cased; multipart and message types are
    refused (an attachment is a leaf of bytes)."""
    match = _CONTENT_TYPE.fullmatch(value)
    if match is None:
        raise ComposeError("invalid_content_type", f"not a type/subtype: {value[:100]!r}")
    main, sub = match["main"].lower(), match["sub"].lower()
    if main in ("multipart", "message"):
        raise ComposeError(
            "invalid_content_type",
            f"{main}/* cannot be an attachment's type; send it as application/octet-stream",
        )
    return main, sub


def check_message_id(name: str, value: str) -> str:
    value = value.strip()
    if not _MSGID.fullmatch(value):
        raise ComposeError("invalid_message_id", f"{name}: not a <id@domain> Message-ID")
    return value


def _header_text(name: str, value: str) -> str:
    if _CONTROL.search(value.replace("\t", " ")):
        raise ComposeError("invalid_header", f"{name}: control characters are not allowed")
    return value


def _ascii_domain(addr_spec: str) -> str:
    domain = addr_spec.rpartition("@")[2].strip("[]")
    try:
        return domain.encode("idna").decode("ascii") if not domain.isascii() else domain
    except UnicodeError:
        return "localhost"


def _unique(addresses: list[Address]) -> list[str]:
    seen: set[str] = set()
    out: list[str] = []
    for address in addresses:
        key = address.addr_spec.lower()
        if key not in seen:
            seen.add(key)
            out.append(address.addr_spec)
    return out


def new_message_id(sender: str) -> str:
    """A fresh Message-ID on the sender's domain (its A-labels when internationalized)."""
    return make_msgid(domain=_ascii_domain(sender))


def compose(draft: Draft, *, now: float, message_id: str = "") -> Composed:
    """The message `draft` describes, dated `now` (seconds since the epoch)."""
    if draft.text is None and draft.html is None:
        raise ComposeError("body_required", "give body_text, body_html or both")
    recipients = _unique([*draft.to, *draft.cc, *draft.bcc])
    if not draft.to and not draft.cc and not draft.bcc:
        raise ComposeError("recipients_required", "give at least one recipient")
    if len(recipients) > MAX_RECIPIENTS:
        raise ComposeError("too_many_recipients", f"at most {MAX_RECIPIENTS} recipients in all")
    if sum(len(a.data) for a in draft.attachments) > MAX_ATTACHMENT_BYTES:
        raise ComposeError("attachments_too_large", "the attachments exceed 25 MiB together")
    visible = [draft.sender, *draft.to, *draft.cc]
    utf8 = not all(a.addr_spec.isascii() for a in visible)
    # Without UTF-8 addresses the message is 7-bit throughout (quoted-printable or base64
    # bodies), so no hop needs 8BITMIME; with them, SMTPUTF8 implies it (RFC 6531).
    chosen = policy.SMTPUTF8 if utf8 else _SEVEN_BIT
    msg = EmailMessage(policy=chosen)
    msg_id = message_id or new_message_id(draft.sender.addr_spec)
    subject = _header_text("subject", draft.subject)
    try:
        msg["From"] = draft.sender
        if draft.to:
            msg["To"] = draft.to
        if draft.cc:
            msg["Cc"] = draft.cc
        if subject:
            msg["Subject"] = subject
        msg["Date"] = format_datetime(datetime.fromtimestamp(now, UTC))
        msg["Message-ID"] = msg_id
        if draft.in_reply_to:
            msg["In-Reply-To"] = draft.in_reply_to
        if draft.references:
            msg["References"] = " ".join(draft.references)
        _set_bodies(msg, draft)
        for attachment in draft.attachments:
            main, sub = check_content_type(attachment.content_type)
            name = _header_text("filename", attachment.filename)
            msg.add_attachment(attachment.data, maintype=main, subtype=sub, filename=name)
        data = msg.as_bytes(policy=chosen)
    except (ValueError, TypeError) as exc:
        if isinstance(exc, ComposeError):
            raise
        raise ComposeError("invalid_message", f"the message cannot be built: {exc}") from None
    if _BARE_NEWLINE.search(data):  # the edge refuses them; never queue what it would refuse
        raise ComposeError("invalid_message", "the message would carry a bare CR or LF")
    return Composed(data, draft.sender.addr_spec, recipients, msg_id, subject)


def _set_bodies(msg: EmailMessage, draft: Draft) -> None:
    for name, body in (("body_text", draft.text), ("body_html", draft.html)):
        if body is not None and "\x00" in body:
            raise ComposeError("invalid_body", f"{name}: NUL characters are not allowed")
    if draft.text is not None:
        msg.set_content(draft.text)
        if draft.html is not None:
            msg.add_alternative(draft.html, subtype="html")
    elif draft.html is not None:
        msg.set_content(draft.html, subtype="html")


def reply_subject(subject: str) -> str:
    """`Re: ` and the original subject, never `Re: Re: `."""
    rest = _RE_PREFIX.sub("", subject.strip(), count=1)
    return f"Re: {rest}" if rest else "Re:"


def _header_addresses(data: bytes, name: str) -> list[Address]:
    """Mailboxes of a header of a received message; what does not parse is left out."""
    found: list[Address] = []
    raw = read_header(data, name)
    if not raw:
        return found
    try:
        header = _address_header(name, raw)
    except Exception:  # a received header may be anything: such a header gives nothing
        return found
    for address in header.addresses:
        try:
            _check_address(name, address.addr_spec)
        except ComposeError:
            continue
        found.append(address)
    return found


def _without(addresses: list[Address], drop: set[str]) -> list[Address]:
    seen = set(drop)
    out = []
    for address in addresses:
        key = address.addr_spec.lower()
        if key not in seen:
            seen.add(key)
            out.append(address)
    return out


def _references(data: bytes, message_id: str) -> list[str]:
    ids = re.findall(r"<[^<>\s]{1,500}>", read_header(data, "References"))
    ids = [i for i in ids if _MSGID.fullmatch(i)]
    if message_id and message_id not in ids:
        ids.append(message_id)
    if len(ids) > MAX_REFERENCES:  # keep the thread's root and the newest, as clients do
        ids = [ids[0], *ids[-(MAX_REFERENCES - 1) :]]
    return ids


def reply_plan(original: bytes, own: list[str], *, reply_all: bool) -> ReplyPlan:
    """Recipients and headers of a reply to `original` from the owner of `own` addresses:
    To is the Reply-To (else the From) of the original, or, when that is one of ours (a
    reply to our own message), the original To; with `reply_all` the original To and Cc
    join in Cc. Our own addresses are recipients only of a reply to a message that went
    to none but us (a note to self)."""
    mine = {a.lower() for a in own}
    reply_to = _header_addresses(original, "Reply-To") or _header_addresses(original, "From")
    to_orig = _header_addresses(original, "To")
    cc_orig = _header_addresses(original, "Cc")
    own_address = next(
        (a.addr_spec for a in [*to_orig, *cc_orig] if a.addr_spec.lower() in mine), ""
    )
    to = _without(reply_to, mine)
    if not to:  # a reply to a message we sent goes to its recipients
        to = _without(to_orig, mine)
    if not to:  # a note to ourselves: the reply goes to ourselves, as mail clients do
        to = _without(to_orig or reply_to, set())
    cc = _without([*to_orig, *cc_orig], mine | {a.addr_spec.lower() for a in to})
    summary = header_summary(original)
    msgid = summary.message_id.strip()
    in_reply_to = msgid if _MSGID.fullmatch(msgid) else ""
    return ReplyPlan(
        to=to,
        cc=cc if reply_all else [],
        own_address=own_address,
        subject=reply_subject(summary.subject),
        in_reply_to=in_reply_to,
        references=_references(original, in_reply_to),
    )
