"""The device's submission listener policy (RFC 6409): local mail clients send mail here.

It runs on the edge's SMTP server protocol (`edge.smtp.server`) with the MX's limits and
replies, and this policy: a client from anywhere but loopback is refused at connect (554
5.7.1); AUTH PLAIN and LOGIN are offered (STARTTLS too, with the device's certificate, but
on loopback not required) and required before MAIL; a login is an address of the device
with its IMAP password (`connector.credentials`), checked through the device's shared
`AuthThrottle` (failures are delayed and logged, as for IMAP). A login sends only as itself:
MAIL FROM and every address of the message's From field must be the login's address (553
5.7.1 otherwise); a message without a From field gets `From: <login>`. The message goes
into the outbound queue (`OutboundQueue.submit`), and the 250 ("Queued as <id>") is sent
only after the queue's Deferred fired: the message is on disk and its Sent copy stored.

It never accepts mail before authentication, never lets a login send as another address,
and never answers 250 for a message that is not on disk.
"""

from __future__ import annotations

from collections.abc import Callable
from email import policy
from email.parser import BytesHeaderParser
from email.utils import getaddresses

from twisted.internet import defer
from twisted.internet.defer import Deferred

from connector.hoppolicy import plaintext_allowed
from connector.outbound.queue import OutboundQueue
from edge.smtp import replies
from edge.smtp.address import Path
from edge.smtp.replies import Reply, SMTPReplyError
from edge.smtp.session import Session
from maildir.mimetree import header_section

__all__ = ["SubmissionHandler", "from_addresses"]

SOURCE = "submission"


def from_addresses(data: bytes) -> list[str] | None:
    """The lower-cased addresses of the message's From fields (None when it has none; an
    empty list when a From field names no address)."""
    head = BytesHeaderParser(policy=policy.compat32).parsebytes(header_section(data))
    fields = head.get_all("From")
    if not fields:
        return None
    found = getaddresses([str(f) for f in fields])
    return [addr.strip().lower() for _name, addr in found if addr.strip()]


class SubmissionSink:
    """One message's data, queued at its end."""

    def __init__(self, queue: OutboundQueue, login: str, sender: str, recipients: list[str]):
        self.queue = queue
        self.login = login
        self.sender = sender
        self.recipients = recipients
        self.chunks: list[bytes] = []

    def write(self, chunk: bytes) -> None:
        self.chunks.append(chunk)

    def abort(self) -> None:
        self.chunks = []

    def finish(self) -> Deferred[Reply]:
        """The 250 once the message is queued (a Deferred of it)."""
        return defer.ensureDeferred(self._queue())

    async def _queue(self) -> Reply:
        data = b"".join(self.chunks)
        self.chunks = []
        found = from_addresses(data)
        if found is None:
            data = f"From: <{self.login}>\r\n".encode() + data
        elif not found or any(addr != self.login for addr in found):
            raise SMTPReplyError(
                replies.S553_SUBMIT_FROM_NOT_OWNED, f"{self.login} sent as From {', '.join(found)}"
            )
        try:
            item = await self.queue.submit(self.sender, self.recipients, data, source=SOURCE)
        except ValueError as exc:
            raise SMTPReplyError(replies.S554_SUBMIT_BAD_MESSAGE, str(exc)) from None
        return replies.S250_QUEUED.with_text(f"Queued as {item.id}")


class SubmissionHandler:
    """The policy of one submission connection."""

    auth_offered = True
    auth_required = True
    auth_mechanisms = ("PLAIN", "LOGIN")

    def __init__(self, check_password: Callable[[str, str], bool], queue: OutboundQueue) -> None:
        """`check_password(address, password)`: whether that is the address's password."""
        self.check_password = check_password
        self.queue = queue

    def connect(self, session: Session) -> Reply | None:
        if not plaintext_allowed(session.peer_host, ()):
            return replies.S554_SUBMIT_LOCAL_ONLY
        session.auth_needs_tls = False  # loopback: the password never leaves this machine
        return None

    def authenticate(self, session: Session, username: str, password: str) -> bool:
        try:
            return self.check_password(username, password) is True
        except Exception:
            return False

    def _login(self, session: Session) -> str:
        return (session.authenticated_as or "").strip().lower()

    def mail_from(self, session: Session, sender: Path) -> Reply | None:
        if sender.address.lower() != self._login(session):
            return replies.S553_SUBMIT_SENDER_NOT_OWNED
        return None

    def rcpt_to(self, session: Session, recipient: Path) -> None:
        return None

    def data(self, session: Session) -> SubmissionSink:
        assert session.sender is not None
        rcpts = [r.address for r in session.recipients]
        return SubmissionSink(self.queue, self._login(session), session.sender.address, rcpts)
