"""The connector's SMTP policy: accept mail only from the authenticated edge, store it once.

The edge authenticates with AUTH PLAIN using the device's connector credentials; without
them MAIL is refused (530). A peer outside loopback and `[device] plaintext_networks` (see
`connector.hoppolicy`) must issue STARTTLS first: until then AUTH is not offered, AUTH is
refused with 538 5.7.11 and MAIL with 530 5.7.0, so the password never crosses an
unprotected network in the clear. The message is written into the Maildir (tmp, fsync, rename into
new) before the 250. The edge puts its queue id in a first `X-Tailpost-Queue-ID` header; the
Maildir deduplicates on it (plus the recipients), so a redelivery after a lost reply never
stores a message twice. Maildir writes run in a thread pool, never in the reactor thread.

As the final delivery (RFC 5321 §4.4), the connector writes the trace of the envelope on top
of each stored copy: `Return-Path: <sender>` (`<>` for the null sender) first, then one
`Delivered-To:` per recipient the copy is for, above the edge's headers (and its queue id
line). Any `Return-Path:` the message already carried came from outside and is removed. In
the default mailbox mode a device keeps one INBOX for all its addresses, so a message for
several of them is stored once, with a `Delivered-To:` for each (several copies of one
message in one INBOX would only be duplicates); in address-mailbox mode each address's
folder gets its own copy with its own `Delivered-To:`.

The edge's verdict header (`X-Tailpost-Verdict`, see `maildir.verdict`) decides the folder:
mail the edge judged junk goes into `Junk`, the rest into `INBOX`. The header is trusted
only because the edge removes every incoming `X-Tailpost-*` header before adding its own
and this receiver accepts mail only from its authenticated edge.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet import defer

from connector.hoppolicy import TAILNET, IPNetwork, plaintext_allowed
from edge.smtp import replies
from edge.smtp.address import Path
from edge.smtp.replies import Reply
from edge.smtp.session import Session
from edge.smtp.trace import delivered_to, return_path
from edge.spool.spool import QUEUE_ID_HEADER
from maildir import Maildir, MessageInfo, address_folder
from maildir.verdict import parse_verdict

JUNK_FOLDER = "Junk"

_RETURN_PATH = re.compile(rb"^return-path[ \t]*:", re.IGNORECASE | re.MULTILINE)
_QID = re.compile(rb"^" + re.escape(QUEUE_ID_HEADER) + rb":[ \t]*([A-Za-z0-9]{1,40})\r\n", re.I)


def dedup_key(data: bytes, recipients: list[str]) -> str | None:
    """The key that makes a redelivered message a no-op, or None without a queue id."""
    match = _QID.match(data)
    if match is None:
        return None
    digest = hashlib.sha256("\n".join(sorted(recipients)).encode()).hexdigest()[:12]
    return f"{match.group(1).decode()}-{digest}"


def without_return_path(data: bytes) -> bytes:
    """`data` without the Return-Path fields (folded lines included) of its header section.

    Read line by line over the bytes rather than with `email`, whose parser would rewrite
    the message (and so break its signatures)."""
    end = -2 if data.startswith(b"\r\n") else data.find(b"\r\n\r\n")
    head_end = len(data) if end == -1 else end + 2
    if _RETURN_PATH.search(data, 0, head_end) is None:
        return data
    kept: list[bytes] = []
    dropping = False
    for line in data[:head_end].splitlines(keepends=True):
        if line[:1] in (b" ", b"\t"):
            if not dropping:
                kept.append(line)
            continue
        dropping = _RETURN_PATH.match(line) is not None
        if not dropping:
            kept.append(line)
    return b"".join(kept) + data[head_end:]


def with_trace(data: bytes, sender: str, recipients: list[str]) -> bytes:
    """The copy to store: the envelope's Return-Path and Delivered-To fields on top."""
    top = return_path(sender) + b"".join(delivered_to(r) for r in recipients)
    return top + without_return_path(data)


def folder_for(data: bytes, recipient: str | None = None) -> str:
    """Where the edge's verdict files the message: Junk for junk, else INBOX (or, in
    address-mailbox mode, the recipient's own folder)."""
    verdict = parse_verdict(data)
    if verdict is not None and verdict.junk:
        return JUNK_FOLDER
    if recipient is None or "@" not in recipient:  # (bare `postmaster` goes to the INBOX)
        return "INBOX"
    return address_folder(recipient)


def _deliver(maildir: Maildir, data: bytes, folder: str, key: str | None) -> MessageInfo:
    maildir.ensure_folder(folder)  # the user may have deleted it: mail must still land
    return maildir.deliver(data, folder, dedup_key=key)


class MaildirSink:
    def __init__(
        self,
        maildir: Maildir,
        recipients: list[str],
        run_blocking: Callable[..., defer.Deferred[Any]],
        delivered: Callable[[MessageInfo], None],
        per_address: bool = False,
        sender: str = "",
    ) -> None:
        """`sender` is the envelope sender ("" for the null sender)."""
        self.maildir = maildir
        self.sender = sender
        self.recipients = recipients
        self.run_blocking = run_blocking
        self.delivered = delivered
        self.per_address = per_address
        self.chunks: list[bytes] = []

    def write(self, chunk: bytes) -> None:
        self.chunks.append(chunk)

    def abort(self) -> None:
        self.chunks = []

    def finish(self) -> defer.Deferred[Reply]:
        """The 250 once every copy is stored (a Deferred of it)."""
        return defer.ensureDeferred(self._store())

    async def _store(self) -> Reply:
        data = b"".join(self.chunks)
        self.chunks = []
        if not self.per_address:
            key = dedup_key(data, self.recipients)
            rcpts = list(dict.fromkeys(self.recipients))
            copy = with_trace(data, self.sender, rcpts)
            info: MessageInfo = await self.run_blocking(
                _deliver, self.maildir, copy, folder_for(data), key
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
            copy = with_trace(data, self.sender, rcpts)
            info = await self.run_blocking(_deliver, self.maildir, copy, folder, key)
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
        plaintext_networks: Sequence[IPNetwork] = TAILNET,
    ) -> None:
        """`plaintext_networks`: where a peer may authenticate without TLS (loopback always;
        by default the tailnet's ranges, as `[device] plaintext_networks`)."""
        self.per_address = per_address
        self.plaintext_networks = plaintext_networks
        self.maildir = maildir
        self.username = username
        self.password = password
        self.run_blocking = run_blocking
        self.delivered = delivered

    def connect(self, session: Session) -> None:
        session.auth_needs_tls = not plaintext_allowed(session.peer_host, self.plaintext_networks)
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
        assert session.sender is not None
        rcpts = [r.address for r in session.recipients]
        return MaildirSink(
            self.maildir,
            rcpts,
            self.run_blocking,
            self.delivered,
            self.per_address,
            sender=session.sender.address,
        )
