"""One SMTP client session of the delivery pool: greeting, TLS and AUTH, then transactions.

Twisted's ESMTP client does the greeting, EHLO, STARTTLS and AUTH; after that this session
drives MAIL/RCPT/DATA itself, one transaction at a time, sending the data exactly as given
(already dot-stuffed, CRLF) and collecting one reply per recipient. A transaction may carry
a `prepare` step that makes the final data once the recipients are accepted, while the DATA
command is under way (the deliverer's ARC seal), so that an attempt that ends earlier never
pays for it. `edge.delivery.client` owns the pool of these sessions.

The paths go out exactly as given (the deliverer brackets them, as received by the MX). The
MAIL command carries `SMTPUTF8` when the transaction needs it (RFC 6531: UTF-8 paths or
header fields) or asks for it and the server offers it, and `BODY=8BITMIME` for 8-bit data
when the server offers 8BITMIME (RFC 6152). A transaction that needs SMTPUTF8 from a server
that does not offer it is never started: it ends with `NeedsSMTPUTF8`, the session stays
usable; so does one whose 8-bit data must have 8BITMIME (`Needs8BitMIME`). With an envelope
id and a server that offers DSN (RFC 3461), MAIL asks for the headers only in reports, under
that id, and each RCPT for reports of failure and delay, with the original recipient. An exception raised by this session's own code while it handles a reply ends the
transaction with `SessionDefect`, never with an error that looks like the network's.

A session must never start a transaction while another is unfinished, and never log the
AUTH exchange.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from OpenSSL import SSL
from twisted.internet import defer, error, protocol
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.mail.smtp import (
    SUCCESS,
    CramMD5ClientAuthenticator,
    ESMTPClient,
    LOGINAuthenticator,
    PLAINAuthenticator,
    SMTPClientError,
    SMTPConnectError,
    SMTPDeliveryError,
    SMTPProtocolError,
)
from twisted.protocols.basic import FileSender
from twisted.python.failure import Failure

from edge.smtp.replies import (
    D451_CONNECTION_LOST,
    D451_NO_CONNECTION,
    D451_NOT_DELIVERED,
    D451_PREPARE_FAILED,
    D451_TIMED_OUT,
    D451_TLS_FAILED,
    Reply,
)
from edge.tls import VerifyingClientTLS

log = Logger()

QUIT_TIMEOUT = 10.0  # the most a polite close waits for the reply to QUIT
_ANY_REPLY = list(range(1000))
_OK_REPLY = list(SUCCESS)
RcptReply = tuple[bytes, int, bytes]


class MailRefused(SMTPDeliveryError):
    """The server refused MAIL FROM (with anything but 421): an answer about this message,
    not a failure of the connection."""


class NeedsSMTPUTF8(SMTPClientError):
    """The transaction needs SMTPUTF8 and the server does not offer it: nothing was sent."""


class LocalFailure(SMTPClientError):
    """The session failed with no reply of the server's to show: the network, TLS, a
    timeout, our own side. `reply` (a `D` reply of `edge.smtp.replies`, with `values` for
    its fields; `where` is the delivery client's) is what the outcome says; `detail` (an
    exception's text, say) is for the log only."""

    def __init__(
        self, reply: Reply, detail: str = "", *, fatal: bool = True, **values: str
    ) -> None:
        super().__init__(-1, (detail or reply.text).encode("utf-8", "replace"), isFatal=fatal)
        self.reply = reply
        self.detail = detail
        self.values = values


class Needs8BitMIME(SMTPClientError):
    """The transaction's 8-bit data needs 8BITMIME, not offered: nothing was sent."""


class SessionDefect(Exception):
    """This session's own code raised while handling the server: `failure` says what."""

    def __init__(self, failure: Failure) -> None:
        super().__init__(f"defect in the SMTP session: {failure.getErrorMessage()}")
        self.failure = failure


_NETWORK_ERRORS = (error.ConnectionClosed, error.ConnectError, OSError, SSL.Error)
"""What a lost connection's reason is when the network (or TLS) ended it, not our code."""


@dataclass
class Result:
    """How one transaction ended, in the shapes of Twisted's sender results.

    `accepted` is `(number accepted, RCPT replies)` on success; otherwise `error` says why.
    `dead` is set when the session failed before the end of the data was sent: the server
    cannot have taken the message, so trying again elsewhere can never duplicate it.
    """

    accepted: tuple[int, list[RcptReply]] | None = None
    error: Exception | None = None
    dead: bool = False


@dataclass
class ClientTransaction:
    sender: bytes  # the reverse-path as it goes out, in angle brackets
    recipients: list[bytes]  # the forward-paths, the same way
    data: bytes  # already dot-stuffed: sent exactly as it is
    utf8_needed: bool = False  # SMTPUTF8 or nothing: UTF-8 paths or header fields
    utf8_wanted: bool = False  # SMTPUTF8 where offered: the message came with it
    eight_bit: bool = False  # the data has octets above 127: BODY=8BITMIME where offered
    # Called (once) when a recipient was accepted and DATA goes out; what it fires with
    # replaces `data`. It must not fail.
    prepare: Callable[[], defer.Deferred[bytes]] | None = None
    prepared: defer.Deferred[bytes] | None = None
    strict_8bit: bool = False  # 8-bit data: BODY=8BITMIME or nothing (an MX)
    envid: bytes = b""  # where DSN is offered: RET=HDRS ENVID=, NOTIFY= and ORCPT= per RCPT
    data_ready: bool = True  # False while `prepare` is under way
    go_ahead: bool = False  # the 354 to DATA came
    pending: list[bytes] = field(default_factory=list)
    current: bytes = b""
    replies: list[RcptReply] = field(default_factory=list)
    dot_sent: bool = False
    done: defer.Deferred[Result] = field(default_factory=defer.Deferred)


class ClientSession(ESMTPClient):
    """One SMTP connection: Twisted's handshake once, then our transactions one at a time.

    States: connecting -> idle <-> busy, then closing (QUIT sent), broken (failed), closed.
    """

    debug = False  # Twisted's line log would hold the AUTH exchange

    def __init__(
        self,
        username: bytes,
        secret: bytes,
        context: Any,
        identity: bytes,
        timeout: float,
        clock: IReactorTime,
        require_auth: bool,
        require_tls: bool = False,
    ) -> None:
        """`require_tls`: STARTTLS (with `context`) or nothing: a server that does not offer
        it fails the handshake before AUTH (Twisted's `requireTransportSecurity`)."""
        ESMTPClient.__init__(self, secret, context, identity)
        self.heloFallback = False
        self.requireAuthentication = require_auth
        self.requireTransportSecurity = require_tls
        for auth in (
            CramMD5ClientAuthenticator(username),
            LOGINAuthenticator(username),
            PLAINAuthenticator(username),
        ):
            self.registerAuthenticator(auth)
        self.response_timeout = timeout
        self.clock = clock
        self.state = "connecting"
        self.ready: defer.Deferred[ClientSession] = defer.Deferred()
        self.closed: defer.Deferred[None] = defer.Deferred()
        self.lost = False
        self.tx: ClientTransaction | None = None
        self.needs_rset = False
        self.transactions = 0
        self.counted = False  # holds one of its pool's connection slots
        self.idle_timer: IDelayedCall | None = None
        self.on_lost: Callable[[ClientSession], None] | None = None
        self.extensions: frozenset[bytes] = frozenset()  # EHLO keywords, upper case
        self.checked: VerifyingClientTLS | None = None  # the check of an MTA-STS policy

    def callLater(self, period: float, func: Callable[[], Any]) -> IDelayedCall:
        # TimeoutMixin's timer, on the injected clock.
        return self.clock.callLater(period, func)

    def connectionMade(self) -> None:
        if self.state != "connecting":  # given up on while the connect was under way
            self._abort()
            return
        _no_delay(self.transport)
        ESMTPClient.connectionMade(self)
        self.setTimeout(self.response_timeout)

    def _lose(self) -> None:
        if self.transport is not None:
            self.transport.loseConnection()

    def esmtpState_serverConfig(self, code: int, resp: bytes) -> None:
        """The reply to EHLO (again after STARTTLS): keep its keywords, then Twisted goes on."""
        self.extensions = frozenset(
            line.split(None, 1)[0].upper() for line in resp.splitlines()[1:] if line.strip()
        )
        ESMTPClient.esmtpState_serverConfig(self, code, resp)

    # -- Twisted's handshake ends here -------------------------------------------------------

    def smtpState_from(self, code: int, resp: bytes) -> None:
        """Called by Twisted's ESMTP client once greeting, EHLO, STARTTLS and AUTH are done."""
        if self.state != "connecting" or self.ready.called:
            self._broken(
                LocalFailure(D451_NOT_DELIVERED, "handshake ended twice, or was given up on")
            )
            return
        self.state = "idle"
        self._expect_nothing()
        self.ready.callback(self)

    def sendError(self, exc: Exception) -> None:
        """Twisted's handshake (or line parser) gave up: this session is unusable."""
        self._broken(exc)

    def timeoutConnection(self) -> None:
        if self.state == "closing":
            self._abort()
            return
        self._broken(LocalFailure(D451_TIMED_OUT, "no reply in time"), abort=True)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        ESMTPClient.connectionLost(self, reason)
        self.lost = True
        if self.state == "busy" and not reason.check(*_NETWORK_ERRORS):
            # Our own code raised while handling the server (the transport logged it and
            # dropped the connection): the transaction ends with that, not as a lost line.
            self._broken(SessionDefect(reason))
        elif self.state == "connecting":
            reply = D451_TLS_FAILED if reason.check(SSL.Error) else D451_NO_CONNECTION
            self._broken(LocalFailure(reply, f"unable to connect: {reason.value}"))
        elif self.state in ("idle", "busy"):
            reply = D451_TLS_FAILED if reason.check(SSL.Error) else D451_CONNECTION_LOST
            self._broken(LocalFailure(reply, f"connection lost: {reason.value}"))
        self.state = "closed"
        self._cancel_idle_timer()
        if not self.closed.called:
            self.closed.callback(None)
        if self.on_lost is not None:
            self.on_lost(self)

    # -- one transaction ---------------------------------------------------------------------

    @property
    def usable(self) -> bool:
        return self.state == "idle" and self.tx is None and not self.lost

    def send(self, tx: ClientTransaction) -> None:
        """Start `tx` on this idle session; `tx.done` fires with its `Result`."""
        if not self.usable:
            raise RuntimeError(f"SMTP session is {self.state}, not idle")
        self.state = "busy"
        self.tx = tx
        self.transactions += 1
        tx.pending = list(tx.recipients)
        self.setTimeout(self.response_timeout)
        if self.needs_rset:
            self._command(b"RSET", _OK_REPLY, self._rset_done, self._rset_refused)
        else:
            self._mail()

    def _command(
        self,
        line: bytes,
        expected: Any,
        ok: Callable[[int, bytes], None],
        fail: Callable[[int, bytes], None],
    ) -> None:
        self._expected = expected
        self._okresponse = ok
        self._failresponse = fail
        self.sendLine(line)

    def _rset_done(self, code: int, resp: bytes) -> None:
        self.needs_rset = False
        self._mail()

    def _rset_refused(self, code: int, resp: bytes) -> None:
        self._broken(SMTPProtocolError(code, b"RSET refused: " + resp))

    def _mail(self) -> None:
        tx = self.tx
        assert tx is not None
        line = b"MAIL FROM:" + tx.sender
        if tx.utf8_needed or tx.utf8_wanted:
            if b"SMTPUTF8" in self.extensions:
                line += b" SMTPUTF8"
            elif tx.utf8_needed:
                # RFC 6531 section 3.4: never sent to a server without SMTPUTF8.
                self._finish(Result(error=NeedsSMTPUTF8(553, b"SMTPUTF8 not offered")))
                return
        if tx.eight_bit and b"8BITMIME" in self.extensions:
            line += b" BODY=8BITMIME"
        elif tx.eight_bit and tx.strict_8bit:
            self._finish(Result(error=Needs8BitMIME(554, b"8BITMIME not offered")))
            return
        if tx.envid and b"DSN" in self.extensions:
            line += b" RET=HDRS ENVID=" + xtext(tx.envid)
        # From here until the reply to the end of data, a failure leaves a transaction open.
        self.needs_rset = True
        self._command(line, [250], self._mail_ok, self._mail_refused)

    def _mail_ok(self, code: int, resp: bytes) -> None:
        self._next_rcpt()

    def _mail_refused(self, code: int, resp: bytes) -> None:
        if code == 421:
            self._closing_reply(code, resp)
            return
        # The server's word on this message (its sender, its size): it stands.
        self._finish(Result(error=MailRefused(code, resp, None, [])))

    def _next_rcpt(self) -> None:
        tx = self.tx
        assert tx is not None
        if tx.pending:
            tx.current = tx.pending.pop(0)
            reply = self._rcpt_reply
            line = b"RCPT TO:" + tx.current
            if tx.envid and b"DSN" in self.extensions:
                line += b" NOTIFY=FAILURE,DELAY"
                if tx.current.isascii():  # (a UTF-8 ORCPT needs RFC 6533's form)
                    line += b" ORCPT=rfc822;" + xtext(tx.current[1:-1])
            self._command(line, _ANY_REPLY, reply, reply)
        elif any(code in SUCCESS for _addr, code, _resp in tx.replies):
            if tx.prepare is not None and tx.prepared is None:
                # Made while the DATA command is under way; waited for before the data goes.
                tx.data_ready = False
                tx.prepared = tx.prepare()
                tx.prepared.addCallback(self._data_prepared, tx)
                tx.prepared.addErrback(self._prepare_failed, tx)
            self._command(b"DATA", [354], self._send_data, self._data_refused)
        else:
            code = tx.replies[-1][1] if tx.replies else -1
            error = SMTPDeliveryError(code, b"No recipients accepted", None, list(tx.replies))
            self._finish(Result(error=error))

    def _rcpt_reply(self, code: int, resp: bytes) -> None:
        if code == 421:
            self._closing_reply(code, resp)
            return
        assert self.tx is not None
        self.tx.replies.append((self.tx.current, code, resp))
        self._next_rcpt()

    def _data_refused(self, code: int, resp: bytes) -> None:
        if code == 421:
            self._closing_reply(code, resp)
            return
        assert self.tx is not None
        self._finish(Result(error=SMTPDeliveryError(code, resp, None, list(self.tx.replies))))

    def _closing_reply(self, code: int, resp: bytes) -> None:
        """421 before the end of data: the server is closing the channel mid-transaction."""
        self._broken(SMTPDeliveryError(code, resp, None, []))

    def _data_prepared(self, data: bytes, tx: ClientTransaction) -> None:
        tx.data = data
        tx.data_ready = True
        if tx.go_ahead and self.tx is tx and self.state == "busy":
            self._write_data(tx)  # the 354 came first

    def _prepare_failed(self, failure: Failure, tx: ClientTransaction) -> None:
        log.failure("smtp: preparing the data failed", failure)
        if self.tx is tx and self.state == "busy":
            # The detail is in the log above.
            self._broken(LocalFailure(D451_PREPARE_FAILED, fatal=False), abort=True)

    def _send_data(self, code: int, resp: bytes) -> None:
        tx = self.tx
        assert tx is not None
        # Nothing is expected while the data goes out; a reply now puts us out of step.
        self._expected = []
        self._okresponse = self._failresponse = self._early_reply
        tx.go_ahead = True
        if tx.data_ready:
            self._write_data(tx)

    def _write_data(self, tx: ClientTransaction) -> None:
        sender = FileSender()
        d = sender.beginFileTransfer(io.BytesIO(tx.data), self.transport, self._chunk)
        d.addCallbacks(self._data_written, self._data_failed, (tx,), None, (tx,))

    def _chunk(self, chunk: bytes) -> bytes:
        self.resetTimeout()
        return chunk  # exactly as given: stuffed once, by `deliver`

    def _data_written(self, last: bytes | str, tx: ClientTransaction) -> None:
        if self.tx is not tx or self.state != "busy":
            return
        self._expected = _OK_REPLY
        self._okresponse = self._accepted
        self._failresponse = self._refused
        tx.dot_sent = True
        self.sendLine(b"." if last == b"\n" else b"\r\n.")

    def _data_failed(self, failure: Failure, tx: ClientTransaction) -> None:
        if self.tx is tx and self.state == "busy":
            detail = f"sending the data failed: {failure.value}"
            self._broken(LocalFailure(D451_CONNECTION_LOST, detail))

    def _early_reply(self, code: int, resp: bytes) -> None:
        assert self.tx is not None
        replies = list(self.tx.replies) if code != 421 else []
        # Abort: the rest of the data must not go out after a reply out of step.
        self._broken(SMTPDeliveryError(code, resp, None, replies), abort=True)

    def _accepted(self, code: int, resp: bytes) -> None:
        assert self.tx is not None
        self.needs_rset = False
        replies = list(self.tx.replies)
        ok = sum(1 for _addr, rcode, _resp in replies if rcode in SUCCESS)
        self._finish(Result(accepted=(ok, replies)))

    def _refused(self, code: int, resp: bytes) -> None:
        assert self.tx is not None
        self.needs_rset = False  # the reply to the end of data ends the transaction
        error = SMTPDeliveryError(code, resp, None, list(self.tx.replies))
        self._finish(Result(error=error), reusable=code != 421)

    def _finish(self, result: Result, reusable: bool = True) -> None:
        tx = self.tx
        assert tx is not None and self.state == "busy"
        self.tx = None
        if reusable:
            self.state = "idle"
            self._expect_nothing()
        else:
            self._quit()
        if not tx.done.called:  # (called already only if the delivery was cancelled)
            tx.done.callback(result)

    # -- idle, closing, failing --------------------------------------------------------------

    def _expect_nothing(self) -> None:
        self.setTimeout(None)
        self._expected = []
        self._okresponse = self._failresponse = self._unsolicited

    def _unsolicited(self, code: int, resp: bytes) -> None:
        # A reply to nothing (a 421 before the server hangs up, or garbage): done with it.
        self._broken(SMTPConnectError(code, resp))

    def close(self, timeout: float | None = None) -> None:
        """Say QUIT to an idle session; drop one given up on while connecting or busy."""
        self._cancel_idle_timer()
        if self.state == "idle":
            self._quit(timeout)
        elif self.state in ("connecting", "busy"):
            failure = LocalFailure(D451_NOT_DELIVERED, "connection given up on", fatal=False)
            self._broken(failure, abort=True)

    def _quit(self, timeout: float | None = None) -> None:
        self.state = "closing"
        self.setTimeout(min(self.response_timeout, timeout or QUIT_TIMEOUT))
        done = self._after_quit
        self._command(b"QUIT", _ANY_REPLY, done, done)

    def _after_quit(self, code: int, resp: bytes) -> None:
        self.setTimeout(None)
        self._lose()

    def _broken(self, exc: Exception, abort: bool = False) -> None:
        """This session cannot be used any more: fail what waits on it and drop it."""
        state = self.state
        if state in ("broken", "closed"):
            return
        self.state = "broken"
        self.setTimeout(None)
        self._cancel_idle_timer()
        self._expected = _ANY_REPLY
        self._okresponse = self._failresponse = lambda code, resp: None
        tx, self.tx = self.tx, None
        if state == "connecting" and not self.ready.called:
            self.ready.errback(Failure(exc))
        if tx is not None and not tx.done.called:
            tx.done.callback(Result(error=exc, dead=not tx.dot_sent))
        if self.lost or self.transport is None:
            return
        if abort:
            self._abort()
            return
        if isinstance(exc, SMTPClientError) and not exc.isFatal:
            self.sendLine(b"QUIT")
        self._lose()

    def _abort(self) -> None:
        abort = getattr(self.transport, "abortConnection", None)
        if abort is not None:
            abort()
        else:
            self._lose()

    def _cancel_idle_timer(self) -> None:
        timer, self.idle_timer = self.idle_timer, None
        if timer is not None and timer.active():
            timer.cancel()


class SessionFactory(protocol.ClientFactory):
    """Connects one `ClientSession`; a failed connect fails its `ready`."""

    noisy = False

    def __init__(self, session: ClientSession) -> None:
        self.session = session

    def buildProtocol(self, addr: Any) -> ClientSession:
        self.session.factory = self
        return self.session

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        session = self.session
        if session.state == "connecting" and not session.ready.called:
            session.state = "closed"
            detail = f"unable to connect: {reason.value}"
            session.ready.errback(Failure(LocalFailure(D451_NO_CONNECTION, detail)))
            if not session.closed.called:
                session.closed.callback(None)


def xtext(value: bytes) -> bytes:
    """`value` in RFC 3461's xtext: "+", "=" and octets outside "!" to "~" as "+XX"."""
    return b"".join(
        bytes([c]) if 33 <= c <= 126 and c not in b"+=" else b"+%02X" % c for c in value
    )


def _no_delay(transport: Any) -> None:
    """TCP_NODELAY. The end of the data (`.` and CRLF) is a small write right after the
    data: with Nagle's algorithm the kernel holds it until the data is acknowledged, and
    the peer delays its acknowledgement (up to 40 ms on Linux), so every transaction waited
    about 40 ms for nothing."""
    set_no_delay = getattr(transport, "setTcpNoDelay", None)
    if set_no_delay is not None:
        with contextlib.suppress(OSError):
            set_no_delay(True)
