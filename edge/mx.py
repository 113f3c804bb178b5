"""The MX session policy: which recipients the edge accepts and how accepted mail is spooled.

A recipient is accepted only when the store routes it (550 5.1.1 at RCPT otherwise, so the
edge never accepts mail it would have to bounce). Data goes straight into the spool with a
Received header on top; the 250 is sent only after the spool commit (fsync) returned, and
the message is then handed to the delivery queue. Store and fsync calls run in a thread
pool, never in the reactor thread.
"""

from __future__ import annotations

import email.utils
from collections.abc import Callable
from typing import Any

from twisted.internet import defer

from edge.smtp import replies
from edge.smtp.address import Path
from edge.smtp.replies import Reply, SMTPReplyError
from edge.smtp.server import Session
from edge.spool import Envelope, Spool, SpoolWriter
from edge.store import RecipientTarget


def received_header(session: Session, hostname: str, qid: str, now: float) -> bytes:
    """The trace header of RFC 5321 §4.4, with the protocol of RFC 3848 and the TLS details."""
    proto = "ESMTP" if session.esmtp else "SMTP"
    if session.tls:
        proto += "S"
    if session.authenticated_as:
        proto += "A"
    helo = session.helo or "unknown"
    lines = [
        f"Received: from {helo} ([{session.peer_host}])",
        f"\tby {hostname} (tailpost) with {proto} id {qid}",
    ]
    if session.tls:
        lines.append(f"\t(using {session.tls})")
    if len(session.recipients) == 1:
        lines.append(f"\tfor <{session.recipients[0].address}>")
    lines[-1] += f"; {email.utils.formatdate(now, localtime=True)}"
    return "\r\n".join(lines).encode("utf-8", "replace") + b"\r\n"


class SpoolSink:
    """The MessageSink of one MX transaction: streams into the spool, commits on finish."""

    def __init__(
        self,
        writer: SpoolWriter,
        envelope: Envelope,
        spool: Spool,
        run_blocking: Callable[..., defer.Deferred[Any]],
        accepted: Callable[[Envelope], None],
    ) -> None:
        self.writer = writer
        self.envelope = envelope
        self.spool = spool
        self.run_blocking = run_blocking
        self.accepted = accepted

    def write(self, chunk: bytes) -> None:
        self.writer.write(chunk)

    def abort(self) -> None:
        self.writer.abort()

    async def finish(self) -> Reply:
        await self.run_blocking(self.spool.commit, self.writer, self.envelope)
        self.accepted(self.envelope)
        return replies.S250_QUEUED.with_text(f"Queued as {self.envelope.qid}")


class DiscardSink:
    """Counts the data and answers 250 without keeping anything (accept_mode = "discard").

    For measuring the protocol and policy layers alone; never for a real MX, since the
    250 it sends is a lie about durability.
    """

    def __init__(self) -> None:
        self.size = 0

    def write(self, chunk: bytes) -> None:
        self.size += len(chunk)

    def abort(self) -> None:
        self.size = 0

    def finish(self) -> Reply:
        return replies.S250_OK.with_text("Discarded")


class MXHandler:
    """Policy of one inbound MX connection."""

    auth_offered = False
    auth_required = False

    def __init__(
        self,
        resolve: Callable[[str], RecipientTarget | None],
        spool: Spool,
        hostname: str,
        clock: Any,
        run_blocking: Callable[..., defer.Deferred[Any]],
        accepted: Callable[[Envelope], None],
        *,
        discard: bool = False,
    ) -> None:
        self.discard = discard
        self.resolve = resolve
        self.spool = spool
        self.hostname = hostname
        self.clock = clock
        self.run_blocking = run_blocking
        self.accepted = accepted

    def connect(self, session: Session) -> None:
        return None

    def authenticate(self, session: Session, username: str, password: str) -> bool:
        return False

    def mail_from(self, session: Session, sender: Path) -> None:
        return None

    async def rcpt_to(self, session: Session, recipient: Path) -> Reply | None:
        target = await self.run_blocking(self.resolve, recipient.address)
        if target is None or target.kind != "device":
            raise SMTPReplyError(replies.S550_NO_SUCH_USER, f"no route for {recipient.address}")
        return None

    def data(self, session: Session) -> SpoolSink | DiscardSink:
        assert session.sender is not None
        if self.discard:
            return DiscardSink()
        writer = self.spool.writer()
        now = self.clock.seconds()
        writer.write(received_header(session, self.hostname, writer.qid, now))
        envelope = Envelope(
            qid=writer.qid,
            sender=session.sender.address,
            recipients=list(dict.fromkeys(r.address for r in session.recipients)),
            received_at=now,
            client_ip=session.peer_host,
            helo=session.helo or "",
        )
        return SpoolSink(writer, envelope, self.spool, self.run_blocking, self.accepted)
