"""Delivery status notifications (RFC 3464): "failed" and "delayed" reports to the sender.

`build_dsn` makes the whole `multipart/report` message (a human part, the
`message/delivery-status` part, and the original header section) as bytes with CRLF line
ends. Whether a DSN may be sent at all (never to the null sender, never for mail judged
spam) is decided by `dsn_allowed`. Nothing here does I/O.

Mail with a UTF-8 address or UTF-8 header fields gets the international form (RFC 6533):
`message/global-delivery-status` with `utf-8;` address types for UTF-8 addresses, the
original header section as `message/global-headers`, octet for octet, and the report's own
header fields in UTF-8 (it goes out with SMTPUTF8, as any mail with such a path does).
"""

from __future__ import annotations

import email.utils
import re
import secrets
from dataclasses import dataclass
from email import policy
from email.message import EmailMessage, Message
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText

from edge.spool.spool import Envelope

_ENHANCED = re.compile(r"\b([245]\.\d{1,3}\.\d{1,3})\b")
_BREAKS = re.compile(r"[\x00-\x1f\x7f\x85\u2028\u2029]+")


@dataclass(frozen=True)
class RecipientStatus:
    recipient: str
    reply: str  # e.g. "550 5.1.1 No such user" or "451 4.4.1 connection refused"
    remote: str = ""  # host:port that answered, if any
    shown: str = ""
    """What a report to the sender says instead of `reply`, when that must not be shown
    (it names a device's private address, say); "" for `reply` itself."""

    @property
    def public(self) -> str:
        return self.shown or self.reply


MAX_DIAGNOSTIC = 900
"""Octets of a host's reply kept in a report's field: the field stays within a line's 998."""


def one_line(text: str) -> str:
    """`text` as one line of at most MAX_DIAGNOSTIC octets: a multi-line SMTP reply (its
    lines joined with LF, as the client reads them) and any other control character become
    single spaces. A report's field is one line: a line break in a host's reply would
    otherwise end the field and start another (a host could write its own `Action:` into
    the report)."""
    line = _BREAKS.sub(" ", text).strip()
    octets = line.encode("utf-8", "replace")
    if len(octets) <= MAX_DIAGNOSTIC:
        return line
    return octets[:MAX_DIAGNOSTIC].decode("utf-8", "ignore")


def dsn_allowed(envelope: Envelope) -> bool:
    """Never to the null sender (no loops), never for what the checks judged spam."""
    judged_spam = envelope.extra.get("spam") or envelope.extra.get("verdict") == "junk"
    return bool(envelope.sender) and not judged_spam


def status_code(reply: str, action: str) -> str:
    match = _ENHANCED.search(reply)
    if match and match.group(1)[0] == ("5" if action == "failed" else "4"):
        return match.group(1)
    if match and action == "failed" and match.group(1)[0] == "4":
        return "5" + match.group(1)[1:]  # a temporary failure that ran out of time
    return "5.0.0" if action == "failed" else "4.0.0"


def _header_bytes(original: bytes) -> bytes:
    end = original.find(b"\r\n\r\n")
    return original if end < 0 else original[: end + 2]


def _address_type(address: str) -> str:
    return f"rfc822; {address}" if address.isascii() else f"utf-8; {address}"


class _Octets:
    """Parts whose octets go into the report as they are. The `email` generator writes a
    `message/*` part's text payload only when it is ASCII (and of a `message/*` part it
    does not know, only the first sub-part): each such part gets a unique ASCII stand-in,
    replaced by its octets once the report is written."""

    def __init__(self) -> None:
        self.parts: dict[bytes, bytes] = {}

    def stand_in(self, octets: bytes) -> str:
        token = f"tailpost-octets-{secrets.token_hex(16)}"
        self.parts[token.encode()] = octets
        return token

    def fill(self, written: bytes) -> bytes:
        for token, octets in self.parts.items():
            written = written.replace(token, octets, 1)
        return written


def build_dsn(
    envelope: Envelope,
    statuses: list[RecipientStatus],
    original: bytes,
    *,
    action: str,
    reporting_mta: str,
    now: float,
    retry_until: float | None = None,
) -> bytes:
    """The report for `statuses` of `envelope`'s message; `action` is "failed" or "delayed"."""
    if action not in ("failed", "delayed"):
        raise ValueError(f"unknown DSN action {action!r}")
    head = _header_bytes(original)
    utf8_head = not head.isascii()
    international = utf8_head or not (
        envelope.sender.isascii() and all(st.recipient.isascii() for st in statuses)
    )
    report = MIMEMultipart("report", report_type="delivery-status")
    report["From"] = f"Mail Delivery System <MAILER-DAEMON@{reporting_mta}>"
    report["To"] = f"<{envelope.sender}>"
    if action == "failed":
        report["Subject"] = "Undelivered Mail Returned to Sender"
    else:
        report["Subject"] = "Delayed Mail (still being retried)"
    report["Date"] = email.utils.formatdate(now, localtime=True)
    report["Message-ID"] = email.utils.make_msgid("dsn", domain=reporting_mta)
    report["Auto-Submitted"] = "auto-replied"

    lines = [f"This is the mail system at {reporting_mta}.", ""]
    if action == "failed":
        lines.append("Your message could not be delivered to the following recipients:")
    else:
        lines.append("Your message has not been delivered yet. It is still being retried for:")
    lines.append("")
    for st in statuses:
        lines.append(f"  <{st.recipient}>: {one_line(st.public)}")
    if action == "delayed" and retry_until is not None:
        lines += ["", f"It will be retried until {email.utils.formatdate(retry_until, True)}."]
    report.attach(MIMEText("\n".join(lines) + "\n", "plain", "utf-8"))

    status = Message()
    status.set_type(
        "message/global-delivery-status" if international else "message/delivery-status"
    )
    per_message = Message()
    per_message["Reporting-MTA"] = f"dns; {reporting_mta}"
    per_message["X-Tailpost-Queue-ID"] = envelope.qid
    per_message["Arrival-Date"] = email.utils.formatdate(envelope.received_at, localtime=True)
    blocks: list[Message | str] = [per_message]
    for st in statuses:
        block = Message()
        block["Final-Recipient"] = _address_type(st.recipient)
        block["Action"] = action
        block["Status"] = status_code(st.public, action)
        if st.remote:
            remote = one_line(st.remote)
            block["Remote-MTA"] = f"dns; {remote.rpartition(':')[0] or remote}"
        block["Diagnostic-Code"] = f"smtp; {one_line(st.public)}"
        block["Last-Attempt-Date"] = email.utils.formatdate(now, localtime=True)
        if action == "delayed" and retry_until is not None:
            block["Will-Retry-Until"] = email.utils.formatdate(retry_until, localtime=True)
        blocks.append(block)
    octets = _Octets()
    if international:
        fields = b"\r\n".join(
            b"".join(f"{name}: {value}\r\n".encode() for name, value in block.items())
            for block in blocks
            if isinstance(block, Message)
        )
        status.set_payload(octets.stand_in(fields))
        status["Content-Transfer-Encoding"] = "8bit"
    else:
        status.set_payload(blocks)
    report.attach(status)

    headers = EmailMessage()
    if utf8_head:
        headers.set_type("message/global-headers")
        headers.set_payload(octets.stand_in(head))
        headers["Content-Transfer-Encoding"] = "8bit"
    else:
        headers.set_type("text/rfc822-headers")
        headers.set_payload(head.decode("ascii"))
    report.attach(headers)
    written = report.as_bytes(policy=policy.SMTPUTF8 if international else policy.SMTP)
    return octets.fill(written)
