"""Recognising a device's resend of a message the relay already took.

A device that crashes between the relay's 250 and its own durable record of it, or loses the
connection after the end of the data before reading the 250, relays the same message again
(`connector.outbound.queue`). The relay answers such a resend with the first queue id and
spools nothing. A message is the same when its Message-ID, envelope sender, recipients and
content (as received, before the relay's own header fields) are: `message_key` digests them.
A message without exactly one Message-ID field has no key and is never taken for a resend;
the same Message-ID sent to other recipients (the rest of a message after a 4xx) is another
message. Keys older than `RESEND_WINDOW` are not looked at.

Nothing here touches the store, the spool or the network.
"""

from __future__ import annotations

import hashlib
import re

__all__ = ["RESEND_WINDOW", "message_key", "message_id"]

RESEND_WINDOW = 7 * 86400.0
"""Seconds during which a device's resend of a message is recognised."""

_FIELD = re.compile(rb"^message-id[ \t]*:(.*(?:\r?\n[ \t].*)*)", re.IGNORECASE | re.MULTILINE)


def message_id(data: bytes) -> str | None:
    """The value of the one Message-ID field of the header section of `data` (unfolded,
    without surrounding white space), or None when there is none, more than one, or it is
    empty."""
    end = data.find(b"\r\n\r\n")
    head = data if end < 0 else data[: end + 2]
    found = _FIELD.findall(head)
    if len(found) != 1:
        return None
    value = re.sub(rb"\r?\n[ \t]", b" ", found[0]).strip()
    return value.decode("utf-8", "replace") if value else None


def message_key(data: bytes, sender: str, recipients: list[str]) -> str | None:
    """The hex SHA-256 of the message's Message-ID, envelope and content, or None when it
    has no single Message-ID."""
    mid = message_id(data)
    if mid is None:
        return None
    digest = hashlib.sha256()
    for part in (mid, sender.lower(), *sorted(r.lower() for r in recipients)):
        encoded = part.encode("utf-8", "surrogateescape")
        digest.update(len(encoded).to_bytes(4, "big") + encoded)
    digest.update(hashlib.sha256(data).digest())
    return digest.hexdigest()
