"""Delivery reports about the edge's own outbound mail, matched back to it (RFC 3464).

A device's outbound mail goes to an MX that offers DSN with its queue id as the envelope id
(`edge.delivery.attempts.dsn_of`). A receiver that accepted it and fails later sends a report
to the sender, an address a device takes, as ordinary inbound mail. `BounceMatching` wraps
the queue's deliverer: of each message on its way to a device it looks at the sender and the
top Content-Type only (the header section, on the reactor thread: next to nothing), and reads
a message from the null sender of type multipart/report; report-type=delivery-status in a
worker thread. For each recipient the report says `failed`, when its Original-Envelope-Id is
a queue id under which the edge delivered to that recipient (Original-Recipient, else
Final-Recipient), the recipient is not one the edge takes itself (mail to it never leaves
over the internet), and no bounce is recorded for it yet, a "bounced" event is recorded for
(queue id, recipient) with the report's status code and diagnostic as detail. The report goes
on to the device like any mail; matching never waits on it nor changes it.

It must never parse an ordinary message, block the reactor, record an event for a queue id
and recipient the edge delivered nothing to, or let a failure of its own stop a delivery.
"""

from __future__ import annotations

import email
import re
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from email import policy
from email.message import Message
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger

from edge.delivery.attempts import Deliverer
from edge.delivery.dsn import one_line
from edge.delivery.routing import Target
from edge.spool.spool import QUEUE_ID_HEADER
from edge.store.events import DeliveryEvents

log = Logger()

HEAD_LIMIT = 64 * 1024
"""Octets of a message searched for its header section's end."""
REPORT_LIMIT = 1024 * 1024
"""Octets of a report read: its status part comes before any returned message."""
MAX_REMEMBERED = 10_000
"""Reports already read, by their own queue id (a retry to the device reads none twice)."""

_REPORT_TYPE = re.compile(
    rb"^content-type:[ \t]*(?:\r?\n[ \t]+)?multipart/report[ \t]*(?:;|\r?\n|$)",
    re.IGNORECASE | re.MULTILINE,
)
_QUEUE_ID = re.compile(r"[0-9A-Za-z]{1,64}")
_STATUS = re.compile(r"5\.\d{1,3}\.\d{1,3}")


@dataclass(frozen=True)
class Bounce:
    queue_id: str
    recipient: str
    detail: str


def is_report(sender: str, data: bytes) -> bool:
    """Whether a message may be a delivery report: from the null sender (RFC 5321 §4.5.5),
    with a top Content-Type of multipart/report. Cheap: for the reactor thread."""
    if sender:
        return False
    end = data.find(b"\r\n\r\n", 0, HEAD_LIMIT)
    return _REPORT_TYPE.search(data, 0, end if end >= 0 else HEAD_LIMIT) is not None


def _xtext_decoded(value: str) -> str:
    return re.sub(r"\+([0-9A-Fa-f]{2})", lambda m: chr(int(m.group(1), 16)), value)


def _address(value: str | None) -> str:
    """The address of an `Original-Recipient`/`Final-Recipient` value (`type; address`)."""
    _type, _, address = (value or "").partition(";")
    return _xtext_decoded(address.strip().strip("<>").strip())


def _blocks(part: Message) -> list[Message]:
    """The field blocks of a (global-)delivery-status part: per message, then per recipient."""
    payload = part.get_payload()
    if part.get_content_type() == "message/delivery-status" and isinstance(payload, list):
        return [b for b in payload if isinstance(b, Message)]  # the parser split the blocks
    if isinstance(payload, list):  # read by the parser as one message: its text again
        raw = b"".join(m.as_bytes() for m in payload if isinstance(m, Message))
    else:
        decoded = part.get_payload(decode=True)
        raw = decoded if isinstance(decoded, bytes) else b""
    text = raw.decode("utf-8", "replace")
    chunks = re.split(r"\r?\n[ \t]*\r?\n", text.strip())
    return [email.message_from_string(c.strip() + "\n") for c in chunks if c.strip()]


def read_report(data: bytes) -> tuple[str, list[tuple[str, str]]]:
    """A delivery report's envelope id and its failed recipients with their details
    (("", []) for anything else). Blocking: a worker thread's work."""
    message = email.message_from_bytes(data[:REPORT_LIMIT], policy=policy.compat32)
    report_type = str(message.get_param("report-type") or "").lower()
    if message.get_content_type() != "multipart/report" or report_type != "delivery-status":
        return "", []
    kinds = ("message/delivery-status", "message/global-delivery-status")
    part = next((p for p in message.walk() if p.get_content_type() in kinds), None)
    blocks = _blocks(part) if part is not None else []
    if len(blocks) < 2:
        return "", []
    envid = _xtext_decoded(str(blocks[0].get("Original-Envelope-Id", "")).strip())
    failed = []
    for block in blocks[1:]:
        if str(block.get("Action", "")).strip().lower() != "failed":
            continue
        recipient = _address(block.get("Original-Recipient")) or _address(
            block.get("Final-Recipient")
        )
        status = str(block.get("Status", "")).strip()
        if recipient and _STATUS.fullmatch(status):
            diagnostic = one_line(str(block.get("Diagnostic-Code", "")))[:400]
            failed.append((recipient, f"{status} {diagnostic}".strip()))
    return envid, failed


class BounceMatching:
    """The queue's deliverer, matching delivery reports on their way to a device."""

    def __init__(
        self,
        deliverer: Deliverer,
        events: DeliveryEvents,
        record: Callable[[str, str, str, str], None],
        run_blocking: Callable[..., defer.Deferred[Any]],
        takes: Callable[[str], object | None] = lambda address: None,
    ) -> None:
        """`record(queue_id, recipient, event, detail)` records an event (reactor thread);
        `takes(address)` is the edge's own recipient rule (blocking): not None for an
        address it delivers itself."""
        self.deliverer = deliverer
        self.events = events
        self.record = record
        self.run_blocking = run_blocking
        self.takes = takes
        self._read: OrderedDict[bytes, None] = OrderedDict()

    def deliver(
        self,
        target: Target,
        sender: str,
        recipients: list[str],
        data: bytes,
        *,
        smtputf8: bool = False,
        **asks: str,
    ) -> Any:
        if target.kind == "device" and is_report(sender, data):
            self._look(data)
        return self.deliverer.deliver(target, sender, recipients, data, smtputf8=smtputf8, **asks)

    def _look(self, data: bytes) -> None:
        key = data[: data.find(b"\n")] if data.startswith(QUEUE_ID_HEADER) else data[:HEAD_LIMIT]
        if key in self._read:
            return
        self._read[key] = None
        while len(self._read) > MAX_REMEMBERED:
            self._read.popitem(last=False)
        d = self.run_blocking(self.match, data)
        d.addCallback(self._found)
        d.addErrback(lambda f: log.failure("bounces: reading a delivery report failed", f))

    def match(self, data: bytes) -> list[Bounce]:
        """The bounces a report tells of the edge's own deliveries (blocking)."""
        envid, failed = read_report(data)
        if not failed or not _QUEUE_ID.fullmatch(envid):
            return []
        found: dict[str, Bounce] = {}
        for recipient, detail in failed:
            lowered = recipient.lower()
            if lowered in found:
                continue
            known = {e.event for e in self.events.query(queue_id=envid, recipient=lowered)}
            if "delivered" not in known or "bounced" in known:
                continue
            if self.takes(recipient) is not None:
                continue  # delivered here, never over the internet: not a report of ours
            found[lowered] = Bounce(envid, lowered, detail)
        return list(found.values())

    def _found(self, bounces: list[Bounce]) -> None:
        for bounce in bounces:
            log.info(
                "bounces: {qid} to {rcpt} bounced after delivery: {detail}",
                qid=bounce.queue_id,
                rcpt=bounce.recipient,
                detail=bounce.detail,
            )
            self.record(bounce.queue_id, bounce.recipient, "bounced", bounce.detail)
