"""The IMAP4rev1 server protocol: Twisted's IMAP4Server with tailpost's fixes.

Fixes over the base class: strict parsing of what the client sends (`args`, `parse`:
a malformed argument is BAD with a reason, never a spin nor an internal error), a cap on
APPEND literals (answered before any data is read) and the literal spooled to a file as
it arrives (`append`), session limits per user and per client address (`limits`), RFC 3501
responses for failed logins ([AUTHENTICATIONFAILED]), SELECT data clients rely on
(UIDNEXT, PERMANENTFLAGS, UNSEEN), \\Seen set by non-PEEK body fetches, exact header
and partial body sections, a working SEARCH, EXPUNGE/EXISTS reporting on NOOP, and
tagged answers instead of tracebacks. FETCH is answered by `fetchrun` (messages rendered
in worker threads, whole, before any of a response is written), not by the base class,
which drops the connection when a message fails half way. Every failure of a command
becomes a tagged answer in one place, `answer_failure`; anything unexpected is
`NO [SERVERBUG]` with the detail in the log. It must never echo an exception to a
client, nor drop a connection for what a message holds.
"""

from __future__ import annotations

import time
from typing import Any

from twisted.cred.error import UnauthorizedLogin
from twisted.internet import threads
from twisted.internet.defer import Deferred
from twisted.internet.protocol import connectionDone
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.mail import imap4
from twisted.mail.imap4 import (
    IllegalClientResponse,
    IllegalMailboxEncoding,
    IllegalOperation,
    MailboxException,
    ReadOnlyMailbox,
    collapseNestedLists,
)
from twisted.python.failure import Failure

from connector.collector import NO_PAUSE, WHOLE, CollectorPause

from .append import SpooledLiteral
from .args import StrictParsing
from .fetchrun import FetchOutcome, FetchRun
from .limits import SessionLimits
from .mailbox import MaildirMailbox, parse_internaldate
from .render import LISTING_ITEMS, listing_item
from .search import SearchError, reads_files, run_search

log = Logger()

DEFAULT_MAX_MESSAGE = 25 * 1024 * 1024
SLICE_SECONDS = 0.01
"""How long one reactor turn of such a FETCH may format before other sessions are served."""
SLICE_CHECK = 256
"""Every how many messages the clock is looked at."""


class TooBig(IllegalOperation):
    """A literal larger than the configured limit."""


class IMAPServer(StrictParsing):
    """One IMAP connection."""

    IDENT = b"tailpost IMAP4rev1 ready"
    max_message_size = DEFAULT_MAX_MESSAGE
    idle_poll_seconds = 10.0
    gone = False
    """The connection is lost (a FETCH answered in slices stops at the next one)."""
    mbox: MaildirMailbox | None
    account: Any
    portal: Any
    limits: SessionLimits | None = None
    peer_host = "unknown"
    holds_address = False
    """This connection has a place among its address's (see `limits`)."""
    user: str | None = None
    """The user whose place among its sessions this connection has, once logged in."""
    _idle_loop: LoopingCall | None = None

    # -- dispatch ---------------------------------------------------------------------

    def lineReceived(self, line: bytes) -> None:
        """The base class's, except that a failure is answered by `answer_failure` (the
        base class sends the exception's text)."""
        if self.blocked is not None:
            self.blocked.append(line)
            return
        self.resetTimeout()
        try:
            getattr(self, "parse_" + self.parseState)(line)
        except Exception:
            self.answer_failure(Failure(), None)

    def lineLengthExceeded(self, line: bytes) -> None:
        self.sendLine(b"* BYE Line too long")
        if self.transport is not None:
            self.transport.loseConnection()

    def answer_failure(self, failure: Failure, tag: bytes | None) -> None:
        """The one place a command's failure becomes its answer: the client's mistakes
        are BAD, refusals NO with their response code, anything else `NO [SERVERBUG]`
        with the detail in the log only."""
        if failure.check(TooBig):
            self.sendNegativeResponse(tag, b"[TOOBIG] Message too large")
        elif failure.check(ReadOnlyMailbox):
            self.sendNegativeResponse(tag, b"[READ-ONLY] Mailbox is read-only")
        elif failure.check(IllegalClientResponse, SearchError):
            self.sendBadResponse(tag, b"Invalid arguments: " + _safe(failure.value))
        elif failure.check(IllegalOperation, IllegalMailboxEncoding, MailboxException):
            self.sendNegativeResponse(tag, _safe(failure.value))
        else:
            log.failure("IMAP command failed", failure)
            if tag is None:
                self.sendUntaggedResponse(b"BAD Internal server error")
            else:
                self.sendNegativeResponse(tag, b"[SERVERBUG] Internal server error")

    def _IMAP4Server__ebDispatch(self, failure: Failure, tag: bytes) -> None:
        self.answer_failure(failure, tag)

    # The base class's other failure answers send the exception's text.
    _IMAP4Server__ebStore = _IMAP4Server__ebDispatch
    _IMAP4Server__ebExpunge = _IMAP4Server__ebDispatch
    _IMAP4Server__ebClose = _IMAP4Server__ebDispatch
    _IMAP4Server__ebCheck = _IMAP4Server__ebDispatch
    _IMAP4Server__ebAppend = _IMAP4Server__ebDispatch
    _IMAP4Server__ebSearch = _IMAP4Server__ebDispatch
    _IMAP4Server__ebCopy = _IMAP4Server__ebDispatch
    _ebCopySelectedMailbox = _IMAP4Server__ebDispatch
    _ebAppendGotMailbox = _IMAP4Server__ebDispatch
    _ebStatusGotMailbox = _IMAP4Server__ebDispatch

    def _IMAP4Server__ebStatus(self, failure: Failure, tag: bytes, box: Any) -> None:
        self.answer_failure(failure, tag)

    def _ebSelectWork(self, failure: Failure, cmdName: bytes, tag: bytes) -> None:
        self.answer_failure(failure, tag)

    def _fail(self, tag: bytes) -> Any:
        return lambda failure: self.answer_failure(failure, tag)

    # -- literals -----------------------------------------------------------------------

    def arg_literal(self, line: bytes) -> Any:
        """APPEND's message: refused before any of it is read when over the limit, else
        written to a spool file as it arrives (see `append`)."""
        if not line or line[:1] != b"{":
            raise IllegalClientResponse("Missing literal")
        size = self._literal_size(line)
        if size > self.max_message_size:
            raise TooBig("Message too large")
        d: Deferred[Any] = Deferred()
        spool = SpooledLiteral(size, d, self.factory.maildir.spool_path())
        self.parseState = "pending"
        self._pendingLiteral = spool  # type: ignore[assignment]
        self.sendContinuationRequest(b"Ready for %d octets of data" % size)
        self.setRawMode()
        return d

    def parse_pending(self, line: bytes) -> None:
        """The base class's; a spooled literal its command did not take (the command
        failed on its other arguments) is removed."""
        literal = self._pendingLiteral
        super().parse_pending(line)
        if isinstance(literal, SpooledLiteral) and not literal.adopted:
            literal.discard()

    # -- capabilities and login ---------------------------------------------------------

    def capabilities(self) -> dict[bytes, Any]:
        caps: dict[bytes, Any] = super().capabilities()
        caps[b"APPENDLIMIT"] = [b"%d" % self.max_message_size]
        return caps

    def connectionMade(self) -> None:
        if self.limits is not None:
            if not self.limits.open_address(self.peer_host):
                log.info("IMAP connection from {host} refused: too many", host=self.peer_host)
                self.sendLine(b"* BYE Too many connections")
                self.gone = True
                self.transport.loseConnection()  # type: ignore[union-attr]
                return
            self.holds_address = True
        super().connectionMade()

    def _IMAP4Server__cbLogin(self, result: Any, tag: bytes) -> None:
        if self._take_user_place(result, tag):
            _base_callback("__cbLogin")(self, result, tag)

    def _IMAP4Server__cbAuthResp(self, result: Any, tag: bytes) -> None:
        if self._take_user_place(result, tag):
            _base_callback("__cbAuthResp")(self, result, tag)

    def _take_user_place(self, result: Any, tag: bytes) -> bool:
        """After a successful login: whether the user may have one more session (if not,
        the login is undone and answered `NO [LIMIT]`)."""
        _iface, avatar, logout = result
        user = str(getattr(avatar, "user", ""))
        if self.gone:
            logout()
            return False
        if self.limits is not None:
            if not self.limits.open_user(user):
                logout()
                log.info("IMAP login of {user} refused: too many sessions", user=user)
                self.sendNegativeResponse(tag, b"[LIMIT] Too many sessions")
                return False
            self.user = user
        return True

    def _release_places(self) -> None:
        if self.limits is None:
            return
        if self.holds_address:
            self.holds_address = False
            self.limits.close_address(self.peer_host)
        if self.user is not None:
            self.limits.close_user(self.user)
            self.user = None

    def _IMAP4Server__ebLogin(self, failure: Failure, tag: bytes) -> None:
        if failure.check(UnauthorizedLogin):
            self.sendNegativeResponse(tag, b"[AUTHENTICATIONFAILED] Authentication failed")
        else:
            log.failure("login failed", failure)
            self.sendNegativeResponse(tag, b"[UNAVAILABLE] Authentication unavailable")

    _IMAP4Server__ebAuthResp = _IMAP4Server__ebLogin

    def _IMAP4Server__ebAuthChunk(self, failure: Failure, tag: bytes) -> None:
        self.sendNegativeResponse(tag, b"[AUTHENTICATIONFAILED] Authentication failed")

    # -- mailbox state ------------------------------------------------------------------

    def _cbSelectWork(self, mbox: MaildirMailbox | None, cmdName: bytes, tag: bytes) -> None:
        if mbox is None:
            self.sendNegativeResponse(tag, b"[NONEXISTENT] No such mailbox")
            return
        flags = " ".join(mbox.getFlags()).encode()
        self.sendUntaggedResponse(b"FLAGS (" + flags + b")")
        self.sendUntaggedResponse(b"%d EXISTS" % mbox.getMessageCount())
        self.sendUntaggedResponse(b"%d RECENT" % mbox.getRecentCount())
        unseen = mbox.first_unseen()
        if unseen is not None:
            self.sendPositiveResponse(None, b"[UNSEEN %d] First unseen" % unseen)
        self.sendPositiveResponse(None, b"[UIDVALIDITY %d] UIDs valid" % mbox.getUIDValidity())
        self.sendPositiveResponse(None, b"[UIDNEXT %d] Predicted next UID" % mbox.getUIDNext())
        if mbox.isWriteable():
            self.sendPositiveResponse(None, b"[PERMANENTFLAGS (" + flags + b")] Limited")
        else:
            self.sendPositiveResponse(None, b"[PERMANENTFLAGS ()] Read-only")
        mode = b"READ-WRITE" if mbox.isWriteable() else b"READ-ONLY"
        mbox.addListener(self)
        self.sendPositiveResponse(tag, b"[" + mode + b"] " + cmdName + b" completed")
        self.state = "select"
        self.mbox = mbox

    def sync_mailbox(self) -> None:
        """Report what changed in the selected folder (EXPUNGE, EXISTS, FETCH FLAGS)."""
        if self.mbox is None:
            return
        expunged, exists, changed = self.mbox.refresh()
        for seq in expunged:
            self.sendUntaggedResponse(b"%d EXPUNGE" % seq)
        if exists is not None:
            self.sendUntaggedResponse(b"%d EXISTS" % exists)
        for seq, flags in sorted(changed.items()):
            self.sendUntaggedResponse(b"%d FETCH (FLAGS (%s))" % (seq, " ".join(flags).encode()))

    def do_NOOP(self, tag: bytes) -> None:
        if self.state == "select":
            self.sync_mailbox()
        self.sendPositiveResponse(tag, b"NOOP completed")

    def do_CHECK(self, tag: bytes) -> None:
        self.sync_mailbox()
        self.sendPositiveResponse(tag, b"CHECK completed")

    def do_IDLE(self, tag: bytes) -> None:
        super().do_IDLE(tag)
        if self.mbox is not None and self._idle_loop is None:
            self._idle_loop = LoopingCall(self.sync_mailbox)
            self._idle_loop.start(self.idle_poll_seconds, now=False)

    def parse_idle(self, *args: Any) -> None:
        self._stop_idle()
        super().parse_idle(*args)

    def _stop_idle(self) -> None:
        if self._idle_loop is not None:
            if self._idle_loop.running:
                self._idle_loop.stop()
            self._idle_loop = None

    def folder_changed(self, names: set[str]) -> None:
        """Another part of the device changed these folders: an IDLE client hears of it now."""
        if self._idle_loop is not None and self.mbox is not None and self.mbox.folder.name in names:
            self.sync_mailbox()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.gone = True
        self._stop_idle()
        self._release_places()
        if isinstance(self._pendingLiteral, SpooledLiteral):
            self._pendingLiteral.discard()
        sessions = getattr(self.factory, "sessions", None)
        if sessions is not None:
            sessions.discard(self)
        super().connectionLost(reason)

    def _listWork(self, tag: bytes, ref: bytes, mbox: bytes, sub: int, cmdName: bytes) -> None:
        if mbox == "" and not sub:
            self.sendUntaggedResponse(b'LIST (\\Noselect) "." ""')
            self.sendPositiveResponse(tag, b"LIST completed")
            return
        super()._listWork(tag, ref, mbox, sub, cmdName)

    def do_STATUS(self, tag: bytes, name: str, names: list[bytes]) -> None:
        mbox = self.account.select(name, 0)
        if mbox is None:
            self.sendNegativeResponse(tag, b"[NONEXISTENT] No such mailbox")
            return
        status = mbox.requestStatus([n.decode("ascii", "replace") for n in names])
        items = " ".join(f"{k} {v}" for k, v in status.items()).encode()
        self.sendUntaggedResponse(
            b"STATUS " + collapseNestedLists([name.encode("imap4-utf-7")]) + b" (" + items + b")"
        )
        self.sendPositiveResponse(tag, b"STATUS completed")

    # -- APPEND / COPY / STORE / EXPUNGE ---------------------------------------------------

    def do_APPEND(
        self, tag: bytes, mailbox: str, flags: Any, date: Any, message: SpooledLiteral
    ) -> None:
        """Deliver the spooled message. Until it is adopted here, `parse_pending` removes
        the spool when this returns or raises."""
        target = self.account.select(mailbox)
        if target is None:
            self.sendNegativeResponse(tag, b"[TRYCREATE] No such mailbox")
            return
        flag_names = [f.decode("ascii", "replace") for f in flags or []]
        internaldate = parse_internaldate(date)  # BAD before doing anything if malformed
        path = message.adopt()
        d = threads.deferToThread(target.folder.add_file, path, flag_names, internaldate)

        def done(info: Any) -> None:
            if self.mbox is not None and self.mbox.folder.path == target.folder.path:
                self.sync_mailbox()
            self.sendPositiveResponse(tag, b"APPEND completed")

        d.addCallback(done)
        d.addErrback(self._fail(tag))

    def do_COPY(self, tag: bytes, messages: Any, name: str, uid: int = 0) -> None:
        assert self.mbox is not None
        target = self.account.select(name)
        if target is None:
            self.sendNegativeResponse(tag, b"[TRYCREATE] No such mailbox")
            return
        infos = [m.info for _seq, m in self.mbox.fetch(messages, bool(uid))]
        folder = target.folder

        def work() -> None:
            for info in infos:
                with open(info.path, "rb") as f:
                    data = f.read()
                folder.add(data, info.flags, info.internaldate)

        def done(_: Any) -> None:
            if self.mbox is not None and self.mbox.folder.path == folder.path:
                self.sync_mailbox()
            self.sendPositiveResponse(tag, b"COPY completed")

        threads.deferToThread(work).addCallback(done).addErrback(self._fail(tag))

    def do_STORE(self, tag: bytes, messages: Any, mode: bytes, flags: Any, uid: int = 0) -> None:
        if self.mbox is None or not self.mbox.isWriteable():
            self.sendNegativeResponse(tag, b"[READ-ONLY] Mailbox is read-only")
            return
        super().do_STORE(tag, messages, mode, flags, uid)

    # -- SEARCH ---------------------------------------------------------------------------

    def do_SEARCH(self, tag: bytes, charset: Any, query: Any, uid: int = 0) -> None:
        assert self.mbox is not None
        if charset is not None and charset.strip(b'"').upper() not in (b"US-ASCII", b"UTF-8"):
            self.sendNegativeResponse(tag, b"[BADCHARSET (US-ASCII UTF-8)] Unsupported")
            return
        mbox = self.mbox
        last_uid = mbox.uids[-1] if mbox.uids else 0
        # A search that reads no file (the listing, or header fields the cache holds for
        # every message) runs with the collector paused until it is done; one that parses
        # message files makes garbage the collector is needed for.
        cache = getattr(self.factory, "field_cache", None)
        warm = cache is not None and cache.size(mbox.folder.name) >= len(mbox.uids)
        pause = NO_PAUSE if reads_files(query, warm) else self._collector_pause()

        def done(found: list[tuple[int, int]]) -> None:
            ids = [u if uid else s for s, u in found]
            self.sendUntaggedResponse(b" ".join([b"SEARCH", *(b"%d" % i for i in ids)]))
            self.sendPositiveResponse(tag, b"SEARCH completed")

        with pause:
            messages = mbox.fetch(imap4.parseIdList(b"1:*"), False)
            d = pause.until(threads.deferToThread(run_search, query, messages, last_uid, cache))
            del messages  # held by the search alone, and freed when it is done
        d.addCallback(done).addErrback(self._fail(tag))

    def _collector_pause(self) -> CollectorPause:
        """The process's collector pause (`connector.collector`), held by a command over a
        whole folder."""
        pause: CollectorPause = getattr(self.factory, "pause", WHOLE)
        return pause

    # -- FETCH ----------------------------------------------------------------------------

    def do_FETCH(self, tag: bytes, messages: Any, query: Any, uid: int = 0) -> None:
        assert self.mbox is not None
        if not query:
            self.sendPositiveResponse(tag, b"FETCH completed")
            return
        marks = any(
            p.type in ("rfc822", "rfc822text")
            or (p.type == "body" and not p.peek and (p.empty or p.header or p.text or p.mime))
            for p in query
        )
        if marks and self.mbox.isWriteable():
            if self.mbox.mark_seen(messages, bool(uid)) and not any(
                p.type == "flags" for p in query
            ):
                query = [*query, imap4._FetchParser.Flags()]
        listing = all(p.type in LISTING_ITEMS for p in query)
        pause = self._collector_pause() if listing else NO_PAUSE
        with pause:  # and, for a listing, until its last slice is written
            found = self.mbox.fetch(messages, uid=bool(uid))
            if listing and any(p.type == "rfc822size" for p in query):
                # The served size is known once a message file has been read.
                listing = all(msg.known_size() is not None for _seq, msg in found)
            if listing:
                pause.until(self._fetch_listing(tag, found, query, uid))
                return
        self._fetch_rendered(tag, found, query, uid)

    def _fetch_rendered(self, tag: bytes, found: Any, query: Any, uid: int) -> None:
        """Any other FETCH: each message's response rendered in a worker thread
        (`fetchrun`); commands that arrive meanwhile wait, as they do for any FETCH."""
        self._oldTimeout = self.setTimeout(None)
        if self.blocked is None:
            self.blocked = []
        run = FetchRun(
            self.transport,
            found,
            list(query),
            bool(uid),
            lambda: self.gone,
            pause=self._collector_pause(),
        )
        del found

        def done(outcome: FetchOutcome) -> None:
            if self.gone or outcome.gone:
                return
            self.setTimeout(self._oldTimeout)
            del self._oldTimeout
            if outcome.failed:
                self.sendNegativeResponse(tag, b"[SERVERBUG] Some messages could not be fetched")
            elif outcome.missing and not uid:
                self.sendNegativeResponse(
                    tag, b"[EXPUNGEISSUED] Some of the requested messages no longer exist"
                )
            else:
                self.sendPositiveResponse(tag, b"FETCH completed")
            self._unblock()

        run.start().addCallback(done).addErrback(self._fail(tag))

    def _fetch_listing(self, tag: bytes, found: Any, query: Any, uid: int) -> Deferred[None]:
        """A FETCH of what the store lists (flags, UID, size, date), which a client asks of
        every message when it resyncs: answered in slices of up to `SLICE_SECONDS`, each
        written at once. (Twisted's FETCH takes a reactor turn and a write per message.)
        Commands that arrive meanwhile wait, as they do for any FETCH. The Deferred fires
        once the last slice is written (or the client has gone)."""
        written: Deferred[None] = Deferred()
        items = list(query)
        if uid and not any(p.type == "uid" for p in items):
            items.append(imap4._FetchParser.UID())
        messages = iter(found)
        del found
        self._oldTimeout = self.setTimeout(None)
        if self.blocked is None:
            self.blocked = []

        def one_slice() -> bool:
            """Write the next slice; whether more is left."""
            out: list[bytes] = []
            deadline = time.monotonic() + SLICE_SECONDS
            more = False
            for n, (seq, msg) in enumerate(messages):
                out.append(b"* %d FETCH (" % seq)
                out.append(b" ".join(listing_item(p, msg) for p in items))
                out.append(b")\r\n")
                if n % SLICE_CHECK == SLICE_CHECK - 1 and time.monotonic() >= deadline:
                    more = True
                    break
            if out:
                self.transport.write(b"".join(out))  # type: ignore[union-attr]
            return more

        def turn() -> None:
            more = False
            try:
                more = not self.gone and one_slice()
            finally:
                if not more:
                    written.callback(None)
            if more:
                self.callLater(0, turn)
                return
            if self.gone:  # the client left in the middle: nothing more to say or time
                return
            self.setTimeout(self._oldTimeout)
            del self._oldTimeout
            self.sendPositiveResponse(tag, b"FETCH completed")
            self._unblock()

        turn()
        return written


def _base_callback(name: str) -> Any:
    """A name-mangled method of Twisted's IMAP4Server."""
    return getattr(imap4.IMAP4Server, "_IMAP4Server" + name)


def _safe(value: object) -> bytes:
    text = str(value).replace("\r", " ").replace("\n", " ")[:200]
    return text.encode("ascii", "replace")
