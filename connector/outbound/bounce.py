"""The notice a sender gets on the device when its edge refused a recipient for good.

When the edge's relay listener answers a recipient with a 5xx, the message will never go
to that recipient; the device tells the sender with a short delivery status notification
(RFC 3464, built by `edge.delivery.dsn.build_dsn`, reporting MTA: the device) filed into
the sender's INBOX. Nothing here does I/O; it never includes the message's body, only its
header section, as any DSN of this system does.
"""

from __future__ import annotations

import hashlib

from edge.delivery.dsn import RecipientStatus, build_dsn
from edge.spool.items import Envelope as SpoolEnvelope

__all__ = ["bounce_notice", "notice_key"]


def notice_key(item_id: str, recipients: list[str]) -> str:
    """The Maildir deduplication key of the notice for these recipients of `item_id`: a
    notice written again after a crash (the relay answered the same) is stored once."""
    digest = hashlib.sha256("\n".join(sorted(recipients)).encode()).hexdigest()[:12]
    return f"{item_id}-bounce-{digest}"


def bounce_notice(
    item_id: str,
    sender: str,
    refused: dict[str, str],
    original: bytes,
    *,
    submitted_at: float,
    now: float,
    hostname: str,
    relay: str,
) -> bytes:
    """The DSN for the recipients `refused` (recipient -> the edge's reply) of a message."""
    envelope = SpoolEnvelope(item_id, sender, list(refused), submitted_at, kind="outbound")
    statuses = [RecipientStatus(rcpt, reply, relay) for rcpt, reply in refused.items()]
    return build_dsn(envelope, statuses, original, action="failed", reporting_mta=hostname, now=now)
