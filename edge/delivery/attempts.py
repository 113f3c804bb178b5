"""What a delivery attempt goes through and what is recorded of it.

The deliverer interface the queue hands each target's recipients to; what the queue keeps of
a message between attempts; which exceptions are passing faults (retried on the schedule)
and which are defects (the message is held); and what a report to the sender may say of a
recipient. The replies recorded for a hold, a DNS failure or an unreachable device are the
named `D` replies of `edge.smtp.replies`: a reply recorded here never carries an
exception's text or a device's private address.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from sqlalchemy import exc as sql_errors
from twisted.internet import defer, error

from edge.delivery.dsn import RecipientStatus
from edge.delivery.outcomes import Outcome
from edge.delivery.routing import Target
from edge.dns.resolver import DNSTemporaryError
from edge.smtp import replies
from edge.spool.spool import Envelope


class Deliverer(Protocol):
    def deliver(
        self,
        target: Target,
        sender: str,
        recipients: list[str],
        data: bytes,
        *,
        smtputf8: bool = False,
        envid: str = "",
    ) -> Any: ...


def dsn_of(envelope: Envelope, target: Target) -> dict[str, str]:
    """What a delivery asks of the receiver's DSN extension: reports naming the queue id,
    for a device's outbound mail to an MX (`edge.delivery.bouncematch` matches them back)."""
    return {"envid": envelope.qid} if envelope.kind == "outbound" and target.kind == "mx" else {}


_FAULTS = (
    OSError,
    DNSTemporaryError,
    error.ConnectError,
    error.ConnectionClosed,
    defer.TimeoutError,
    sql_errors.OperationalError,
    sql_errors.InterfaceError,
    sql_errors.DisconnectionError,
    sql_errors.TimeoutError,
)
"""Exceptions that are passing faults of the network or of our infrastructure (store, disk,
DNS), not of a message: retried on the schedule. Anything else is a defect: held."""


def is_passing_fault(exc: BaseException) -> bool:
    return isinstance(exc, _FAULTS)


def recipient_status(rcpt: str, outcome: Outcome, target: Target) -> RecipientStatus:
    """What is recorded of one recipient's attempt, and what a report to the sender says of
    it. The operator's record (events, `queue show`) keeps the reply as it was; a report
    names a device by no address: its connector's answer is kept (it is tailpost's own) with
    the address replaced, a failure to reach it is said in general terms, and no Remote-MTA
    is given."""
    reply = f"{outcome.code} {outcome.text}"
    if target.kind != "device":
        return RecipientStatus(rcpt, reply, outcome.host)
    if not outcome.connected and not outcome.final:
        return RecipientStatus(rcpt, reply, shown=replies.D451_DEVICE_UNREACHABLE.status)
    if not outcome.host:
        return RecipientStatus(rcpt, reply)
    text = outcome.text.replace(outcome.host, "the recipient's device")
    return RecipientStatus(rcpt, reply, shown=f"{outcome.code} {text}")


def defect_reason(exc: BaseException) -> str:
    """Why a message was held, for the operator only (`queue show`): never recorded as a
    recipient's reply, nor put in a report."""
    defect = f"{type(exc).__name__}: {exc}"
    return replies.D451_HELD_DEFECT.format(defect=defect).detail[:400]


@dataclass
class MessageState:
    """What the queue knows of a message beyond the spool: attempts and last errors."""

    attempts: int = 0
    next_attempt: float | None = None
    last_errors: dict[str, str] = field(default_factory=dict)
    last_shown: dict[str, str] = field(default_factory=dict)
    """What a report to the sender says of a last error, where it differs from it."""
    devices: dict[str, str] = field(default_factory=dict)
    waiting_on: set[str] = field(default_factory=set)
