"""The MX session policy: which recipients the edge accepts, the checks, and the spooling.

A recipient is accepted only when the store routes it (550 5.1.1 at RCPT otherwise, so the
edge never accepts mail it would have to bounce; 450 4.4.4 while its domain's verified route
is on its way to active, so senders retry). The check pipeline (`edge.checks`) runs
at connect, MAIL FROM, RCPT TO and after DATA; its refusals come back as `SMTPReplyError`s
for the SMTP server's one funnel. While the header section streams in, every incoming
header that claims the edge's authserv-id and every `X-Tailpost-*` header is dropped. An
accepted message is spooled with the edge's headers on top (Authentication-Results,
verdict, Received; the ARC set is added when it is forwarded); the 250 is sent only after
the spool commit (fsync) returned, and the message is then handed to the delivery queue.
Store lookups go through `lookup` (in the edge `CachedLookups.cached_or_load`: a fresh
cached answer is used at once, a miss is loaded in a worker thread); file and fsync calls
run in a thread pool, never in the reactor thread, and a message held in memory is read
inline.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn, cast

from twisted.internet import defer
from twisted.logger import Logger

from edge.checks import CheckPipeline, HeaderFilter, Recipient, Transaction
from edge.checks.pipeline import DataOutcome
from edge.runtime.nowlater import NowOrLater, then
from edge.smtp import replies, trace
from edge.smtp.address import Path
from edge.smtp.replies import Reply, SMTPReplyError
from edge.smtp.session import Refusal, Session
from edge.spool.spool import Envelope, Spool, SpoolWriter
from edge.store import RecipientTarget

log = Logger()

Commit = Callable[[SpoolWriter, Envelope], defer.Deferred[None]]
"""Makes one message durable (`edge.spool.committer.Committer.commit`, or the spool's own)."""


RECEIVED_HEADERS_ADDED = 1
"""How many Received headers the MX adds to a message (`received_header`): its hop, which
loop detection counts (`edge.smtp.data.Limits.own_received`)."""


def received_header(session: Session, hostname: str, qid: str, now: float) -> bytes:
    """The MX's Received header for the session's transaction (`edge.smtp.trace`)."""
    proto = "ESMTP" if session.esmtp else "SMTP"
    if session.tls:
        proto += "S"
    if session.authenticated_as:
        proto += "A"
    return trace.received_header(
        helo=session.helo,
        peer_host=session.peer_host,
        hostname=hostname,
        protocol=proto,
        qid=qid,
        tls=session.tls,
        recipient=session.recipients[0].address if len(session.recipients) == 1 else None,
        now=now,
    )


@dataclass
class Spooling:
    """What both spooling sinks need to make a message durable and hand it on."""

    writer: SpoolWriter
    envelope: Envelope
    spool: Spool
    run_blocking: Callable[..., defer.Deferred[Any]]
    accepted: Callable[[Envelope], None]
    filter: HeaderFilter
    commit: Commit

    def done(self) -> defer.Deferred[Reply]:
        """Commit (the 250 waits for the fsync), queue for delivery, and say so."""
        return self.commit(self.writer, self.envelope).addCallback(self._committed)

    def _committed(self, _: object) -> Reply:
        self.accepted(self.envelope)
        return replies.S250_QUEUED.with_text(f"Queued as {self.envelope.qid}")


class SpoolSink:
    """The MessageSink of one MX transaction without checks: streams into the spool."""

    def __init__(self, spooling: Spooling) -> None:
        self.spooling = spooling
        self.writer = spooling.writer
        self.filter = spooling.filter

    def write(self, chunk: bytes) -> None:
        for line in self.filter.feed(chunk):
            self.writer.write(line)

    def abort(self) -> None:
        self.writer.abort()

    def finish(self) -> defer.Deferred[Reply]:
        for line in self.filter.finish():
            self.writer.write(line)
        return self.spooling.done()


class CheckedSink:
    """The MessageSink of one MX transaction with checks: judge the whole message, then spool.

    The (filtered) data goes into the spool writer as it comes; after the end of data the
    checks run on it, and the edge's headers for an accepted message go on top of it in the
    writer before the commit.
    """

    def __init__(
        self, spooling: Spooling, checks: CheckPipeline, tx: Transaction, received: bytes
    ) -> None:
        self.spooling = spooling
        self.writer = spooling.writer
        self.filter = spooling.filter
        self.run_blocking = spooling.run_blocking
        self.checks = checks
        self.tx = tx
        self.received = received

    def write(self, chunk: bytes) -> None:
        for line in self.filter.feed(chunk):
            self.writer.write(line)

    def abort(self) -> None:
        self.writer.abort()

    def finish(self) -> NowOrLater[Reply]:
        """The 250 once the message is judged and durable (a Deferred of it), or the
        refusal raised (or as the Deferred's failure)."""
        for line in self.filter.finish():
            self.writer.write(line)
        if not self.writer.spilled:
            return self._judge(self.writer.data())
        data: defer.Deferred[bytes] = self.run_blocking(self.writer.data)
        return then(data, self._judge)

    def _judge(self, message: bytes) -> NowOrLater[Reply]:
        return then(self.checks.data(self.tx, message), self._store)

    def _store(self, outcome: DataOutcome) -> defer.Deferred[Reply]:
        self.spooling.envelope.extra["verdict"] = outcome.decision.action
        self.writer.put_on_top(outcome.headers + self.received)
        return self.spooling.done()


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
        checks: CheckPipeline | None = None,
        account_of: Callable[[RecipientTarget], str | None] | None = None,
        authserv_id: str | None = None,
        lookup: Callable[..., NowOrLater[Any]] | None = None,
        commit: Commit | None = None,
        awaiting: Callable[[str], bool] | None = None,
    ) -> None:
        """`resolve`, `account_of` and `awaiting` are blocking store lookups, called through
        `lookup` (`lookup(fn, *args)`, a Deferred): a cached-or-load runner such as
        `CachedLookups.cached_or_load`, or by default `run_blocking`. `awaiting` tells a
        recipient nobody takes whose refusal is only temporary
        (`edge.delivery.routing.RecipientResolver.awaiting`)."""
        self.resolve = resolve
        self.awaiting = awaiting
        self.spool = spool
        self.hostname = hostname
        self.clock = clock
        self.run_blocking = run_blocking
        self.lookup = lookup or run_blocking
        self.commit: Commit = commit or (lambda w, e: run_blocking(spool.commit, w, e))
        self.accepted = accepted
        self.checks = checks
        self.account_of = account_of
        self.authserv_id = (authserv_id or (checks.authserv_id if checks else hostname)).lower()
        self.tx: Transaction | None = None

    def connect(self, session: Session) -> Refusal:
        """None, or a Deferred of it; a refusal is raised (or fails the Deferred) as an
        SMTPReplyError, and the server closes the connection after sending it."""
        if self.checks is None:
            return None
        self.tx = self.checks.transaction(session.peer_host)
        return cast(Refusal, self.checks.connect(self.tx))

    def authenticate(self, session: Session, username: str, password: str) -> bool:
        return False

    def mail_from(self, session: Session, sender: Path) -> Refusal:
        """None, or a Deferred that fails with SMTPReplyError when the checks refuse."""
        if self.checks is None:
            return None
        if self.tx is None:
            self.tx = self.checks.transaction(session.peer_host)
        return cast(Refusal, self.checks.mail(self.tx, session.helo or "", sender.address))

    def rcpt_to(self, session: Session, recipient: Path) -> Refusal:
        """None, or a Deferred of it; refusals are raised (or fail the Deferred) as
        SMTPReplyError. A recipient whose route is cached is answered at once."""
        return then(self.lookup(self.resolve, recipient.address), self._routed, recipient)

    def _routed(self, target: RecipientTarget | None, recipient: Path) -> Refusal:
        if target is None:
            if self.awaiting is None:
                return self._refuse(False, recipient)
            return then(self.lookup(self.awaiting, recipient.address), self._refuse, recipient)
        if self.checks is None or self.tx is None:
            return None
        if self.account_of is None:
            return self._check_recipient(None, recipient)
        return then(self.lookup(self.account_of, target), self._check_recipient, recipient)

    @staticmethod
    def _refuse(awaiting: bool, recipient: Path) -> NoReturn:
        """550 5.1.1; 450 4.4.4 while the domain's verified route is not active yet."""
        if awaiting:
            why = f"the route of {recipient.address} is not active yet"
            raise SMTPReplyError(replies.S450_ROUTE_NOT_ACTIVE, why)
        raise SMTPReplyError(replies.S550_NO_SUCH_USER, f"no route for {recipient.address}")

    def _check_recipient(self, account: str | None, recipient: Path) -> Refusal:
        assert self.checks is not None and self.tx is not None
        return cast(Refusal, self.checks.rcpt(self.tx, Recipient(recipient.address, account)))

    def data(self, session: Session) -> SpoolSink | CheckedSink:
        assert session.sender is not None
        now = self.clock.seconds()
        writer = self.spool.writer()
        received = received_header(session, self.hostname, writer.qid, now)
        envelope = Envelope(
            qid=writer.qid,
            sender=session.sender.address,
            recipients=list(dict.fromkeys(r.address for r in session.recipients)),
            received_at=now,
            client_ip=session.peer_host,
            helo=session.helo or "",
            smtputf8="SMTPUTF8" in session.sender.params,
        )
        spooling = Spooling(
            writer,
            envelope,
            self.spool,
            self.run_blocking,
            self.accepted,
            HeaderFilter(self.authserv_id),
            self.commit,
        )
        if self.checks is not None and self.tx is not None:
            return CheckedSink(spooling, self.checks, self.tx, received)
        writer.write(received)
        return SpoolSink(spooling)
