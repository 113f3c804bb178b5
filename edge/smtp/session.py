"""What an SMTP server session shares with its policy: the session's state and the policy's
interface.

`Session` is what a `SessionHandler` may know of the connection and the current transaction;
the handler decides what to accept and returns a reply, or None to accept, now or later
(`edge.runtime.nowlater`). The server (`edge.smtp.server`) owns the state; a handler reads
it and sets only `auth_needs_tls`. This module must never hold protocol logic.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from edge.runtime.nowlater import NowOrLater
from edge.smtp.address import Path
from edge.smtp.data import MessageSink
from edge.smtp.replies import Reply

__all__ = ["Refusal", "Session", "SessionHandler"]

Refusal = NowOrLater[Reply | None]
"""A handler's answer: the Reply to refuse with, or None to accept, now or later (a refusal
may also be raised, or fail the Deferred, as an SMTPReplyError)."""


@dataclass
class Session:
    """What the handler may know about the connection and the current transaction."""

    peer_host: str
    peer_port: int
    local_host: str
    local_port: int
    helo: str | None = None
    esmtp: bool = False
    tls: str | None = None
    authenticated_as: str | None = None
    auth_needs_tls: bool = False
    """Set by the handler (at connect) for a peer that may authenticate only over TLS: AUTH
    is then neither offered nor taken before STARTTLS (RFC 4954 §4, RFC 3207 §4)."""
    sender: Path | None = None
    recipients: list[Path] = field(default_factory=list)

    def reset_transaction(self) -> None:
        self.sender = None
        self.recipients = []


class SessionHandler(Protocol):
    """Policy for one connection. Methods return a Reply or None (accept), maybe later; a
    refusal may also be raised (or fail the Deferred) as an SMTPReplyError."""

    auth_offered: bool
    auth_required: bool

    def connect(self, session: Session) -> Refusal: ...

    def authenticate(self, session: Session, username: str, password: str) -> NowOrLater[bool]:
        """Whether the credentials are good."""
        ...

    def mail_from(self, session: Session, sender: Path) -> Refusal: ...

    def rcpt_to(self, session: Session, recipient: Path) -> Refusal: ...

    def data(self, session: Session) -> NowOrLater[MessageSink]:
        """Return the MessageSink for the transaction's data (or raise SMTPReplyError)."""
        ...
