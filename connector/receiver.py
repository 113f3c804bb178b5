"""The connector's SMTP policy: accept mail only from the authenticated edge, store it once.

The edge authenticates with AUTH PLAIN using the device's connector credentials; without
them MAIL is refused (530). The message is written into the Maildir (tmp, fsync, rename into
new) before the 250. The edge puts its queue id in a first `X-Tailpost-Queue-ID` header; the
Maildir deduplicates on it (plus the recipients), so a redelivery after a lost reply never
stores a message twice. Maildir writes run in a thread pool, never in the reactor thread.

The edge's verdict header (`X-Tailpost-Verdict`, see `maildir.verdict`) decides the folder:
mail the edge judged junk goes into `Junk`, the rest into `INBOX`. The header is trusted
only because the edge removes every incoming `X-Tailpost-*` header before adding its own
and this receiver accepts mail only from its authenticated edge.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Callable
from typing import Any

from twisted.internet import defer

from edge.smtp import replies
from edge.smtp.address import Path
from edge.smtp.replies import Reply
from edge.smtp.server import Session
from edge.spool import QUEUE_ID_HEADER
from maildir import FolderExists, Maildir, MessageInfo, address_folder
from maildir.verdict import parse_verdict

JUNK_FOLDER = "Junk"

_QID = re.compile(rb"^" + re.escape(QUEUE_ID_HEADER) + rb":[ \t]*([A-Za-z0-9]{1,40})\r\n", re.I)


def dedup_key(data: bytes, recipients: list[str]) -> str | None:
    """The key that makes a redelivered message a no-op, or None without a queue id."""
    match = _QID.match(data)
    if match is None:
        return None
    digest = hashlib.sha256("\n".join(sorted(recipients)).encode()).hexdigest()[:12]
    return f"{match.group(1).decode()}-{digest}"


def folder_for(data: bytes, recipient: str | None = None) -> str:
    """Where the edge's verdict files the message: Junk for junk, else INBOX (or, in
    address-mailbox mode, the recipient's own folder)."""
    verdict = parse_verdict(data)
    if verdict is not None and verdict.junk:
        return JUNK_FOLDER
    return address_folder(recipient) if recipient is not None else "INBOX"


def _deliver(maildir: Maildir, data: bytes, folder: str, key: str | None) -> MessageInfo:
    if folder != "INBOX" and folder not in maildir.list_folders():
        try:
            maildir.create_folder(folder)  # the user deleted it: mail must still land
        except FolderExists:
            pass
    return maildir.deliver(data, folder, dedup_key=key)


class MaildirSink:
    def __init__(
        self,
        maildir: Maildir,
        recipients: list[str],
        run_blocking: Callable[..., defer.Deferred[Any]],
        delivered: Callable[[MessageInfo], None],
        per_address: bool = False,
    ) -> None:
        self.maildir = maildir
        self.recipients = recipients
        self.run_blocking = run_blocking
        self.delivered = delivered
        self.per_address = per_address
        self.chunks: list[bytes] = []

    def write(self, chunk: bytes) -> None:
        self.chunks.append(chunk)

    def abort(self) -> None:
        self.chunks = []

    async def finish(self) -> Reply:
        data = b"".join(self.chunks)
        self.chunks = []
        if not self.per_address:
            key = dedup_key(data, self.recipients)
            info: MessageInfo = await self.run_blocking(
                _deliver, self.maildir, data, folder_for(data), key
            )
            self.delivered(info)
            return replies.S250_OK.with_text(f"Stored as {info.id}")
        # Address-mailbox mode: one copy in each recipient's own folder (junk: one in Junk),
        # each stored once.
        folders: dict[str, list[str]] = {}
        for rcpt in dict.fromkeys(r.lower() for r in self.recipients):
            folders.setdefault(folder_for(data, rcpt), []).append(rcpt)
        stored = []
        for folder, rcpts in folders.items():
            key = dedup_key(data, rcpts)
            info = await self.run_blocking(_deliver, self.maildir, data, folder, key)
            self.delivered(info)
            stored.append(info.id)
        return replies.S250_OK.with_text(f"Stored as {' '.join(stored)}")


class ConnectorHandler:
    """Policy of one connection from the edge."""

    auth_offered = True
    auth_required = True

    def __init__(
        self,
        maildir: Maildir,
        username: str,
        password: str,
        run_blocking: Callable[..., defer.Deferred[Any]],
        delivered: Callable[[MessageInfo], None],
        *,
        per_address: bool = False,
    ) -> None:
        self.per_address = per_address
        self.maildir = maildir
        self.username = username
        self.password = password
        self.run_blocking = run_blocking
        self.delivered = delivered

    def connect(self, session: Session) -> None:
        return None

    def authenticate(self, session: Session, username: str, password: str) -> bool:
        if not self.password:
            return False
        user_ok = hmac.compare_digest(username.encode(), self.username.encode())
        pass_ok = hmac.compare_digest(password.encode(), self.password.encode())
        return user_ok and pass_ok

    def mail_from(self, session: Session, sender: Path) -> None:
        return None

    def rcpt_to(self, session: Session, recipient: Path) -> None:
        return None

    def data(self, session: Session) -> MaildirSink:
        rcpts = [r.address for r in session.recipients]
        return MaildirSink(self.maildir, rcpts, self.run_blocking, self.delivered, self.per_address)
