"""The SMTP server protocol (RFC 5321, with STARTTLS, AUTH, PIPELINING, SIZE).

This module parses the wire and keeps the session state machine; what to accept is decided
by a `SessionHandler` (policy) passed in by the factory. Every reply comes from
`edge.smtp.replies`, and every exception a handler raises goes through one funnel: an
`SMTPReplyError` becomes its reply, a timeout 451 4.4.5, anything else 451 4.3.0 with the
detail in the log only. It never buffers more than one command line or one text line
beyond what the handler's sink was given, and it never executes a command that arrived in
the same read as STARTTLS.

A client cannot hold a session by trickling bytes: the first byte of the next command must come
within `Limits.idle_timeout`, the whole line within `Limits.command_timeout` of its first byte
(bytes that arrive do not restart either), and DATA must average `Limits.min_data_rate` octets per
second over each `Limits.data_rate_window`; otherwise the session is closed with 421 4.4.2 and an
unfinished message is aborted. No timer runs against the client while the server itself is working
on a command. The factory (`edge.smtp.factory`) admits a connection only within the total,
per-address and per-network limits (see `admit`). AUTH (PLAIN, and LOGIN where the policy offers
it) is `edge.smtp.auth`; a failed AUTH is answered through the shared `AuthThrottle` when one is
given.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar, TypeVarTuple

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol as TwistedProtocol
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure

from edge.runtime.nowlater import NowOrLater, is_deferred, now, then
from edge.smtp import replies
from edge.smtp.address import Path, parse_mail_from, parse_rcpt_to
from edge.smtp.auth import AuthExchange
from edge.smtp.data import DataReader, Limits, MessageSink
from edge.smtp.rate import DataRate
from edge.smtp.replies import Reply, SMTPReplyError
from edge.smtp.sendnow import send_now
from edge.smtp.session import Session, SessionHandler
from edge.smtp.trace import helo_ok, tls_description

if TYPE_CHECKING:
    from edge.smtp.factory import SMTPServerFactory

log = Logger()
T = TypeVar("T")
Ts = TypeVarTuple("Ts")

Answer = NowOrLater[Reply | None]
"""What a command gives: its reply (None when it has answered itself) now, or later."""
Answered = Answer | NowOrLater[Reply]  # (what `_run` takes: a sink's answer too)

_BUSY, _IDLE, _LINE, _DATA = "busy", "idle", "line", "data"
"""What the session waits for, which decides its timer (`SMTPServer._arm`): the server's
own work (no timer), the next command's first byte, the rest of a command line, message
data."""


class SMTPServer(TwistedProtocol, TimeoutMixin):
    """One SMTP session."""

    factory: SMTPServerFactory

    def __init__(
        self,
        handler: SessionHandler,
        limits: Limits,
        hostname: str,
        clock: IReactorTime,
        tls_context: Any = None,
    ) -> None:
        self.handler = handler
        self.limits = limits
        self.hostname = hostname
        self.clock = clock
        self.tls_context = tls_context
        self.callLater = clock.callLater  # type: ignore[method-assign,assignment]
        self.session: Session | None = None
        self._buffer = b""
        self._busy = False
        self._discarding = False
        self._closed = False
        self._errors = 0
        self._junk = 0  # NOOP, RSET, VRFY, HELP since the last message accepted
        self._data: DataReader | None = None
        self._auth = AuthExchange(self)
        self._processing = False
        # The answer this session waits for (there is at most one) and the one timer that
        # cancels it when it is late: reset for each answer, never made per command.
        self._waiting_for: defer.Deferred[Any] | None = None
        self._answer_timer: IDelayedCall | None = None
        self._phase: str | None = None
        self._rate = DataRate(self.clock, self.limits, self._data_too_slow)
        self.network = ""
        """The client's network, as the connection limits count it (set by `admit`)."""

    # -- connection lifecycle -------------------------------------------------------------

    def connectionMade(self) -> None:
        peer = self.transport.getPeer()  # type: ignore[union-attr]
        host = self.transport.getHost()  # type: ignore[union-attr]
        self.session = Session(
            peer_host=getattr(peer, "host", "unknown"),
            peer_port=getattr(peer, "port", 0),
            local_host=getattr(host, "host", ""),
            local_port=getattr(host, "port", 0),
        )
        self._busy = True
        refusal = self.factory.admit(self)
        if refusal is not None:
            self._greeted(refusal)
            return
        try:
            result = self._call(self.handler.connect, self.session)
        except Exception:
            result = self._funnel(Failure())
        self._run(result, self._greeted)
        self._arm()

    def _greeted(self, refusal: Reply | None) -> None:
        if refusal is not None and refusal.is_error:
            self._send(refusal)
            self._close()
            return
        self._send(Reply(220, "", f"{self.hostname} ESMTP tailpost"))
        self._busy = False
        self._process()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._closed = True
        self.setTimeout(None)
        self._rate.stop()
        timer, self._answer_timer = self._answer_timer, None
        if timer is not None and timer.active():
            timer.cancel()
        self._abort_data()
        self.factory.release(self)

    def timeoutConnection(self) -> None:
        late = replies.S421_COMMAND_TIMEOUT if self._phase == _LINE else replies.S421_IDLE
        log.info("smtp {peer}: {text}", peer=self._peer(), text=late.text)
        self._abort_data()
        self._send(late)
        self._close()

    def _arm(self) -> None:
        """Set the session's timer for what it now waits for. A timer runs from the moment
        its wait begins: bytes that arrive do not restart it (but for DATA's silence bound,
        restarted by each read; DATA's pace is `DataRate`'s), a command that completes
        does."""
        if self._closed:
            return
        if self._busy:
            phase = _BUSY
        elif self._data is not None:
            phase = _DATA
        elif self._buffer or self._discarding:
            phase = _LINE
        else:
            phase = _IDLE
        if phase == self._phase:
            return
        self._phase = phase
        if phase == _BUSY:
            self.setTimeout(None)  # the handler's and the sink's own timeouts bound this
        elif phase == _IDLE:
            self.setTimeout(self.limits.idle_timeout)
        elif phase == _LINE:
            self.setTimeout(self.limits.command_timeout)
        else:
            self.setTimeout(self.limits.data_timeout)

    def _close(self) -> None:
        self._closed = True
        self._busy = True
        self.setTimeout(None)
        self._rate.stop()
        if self.transport is not None:
            self.transport.loseConnection()

    def _send(self, reply: Reply) -> None:
        if self.transport is None or (self._closed and reply.code not in (221, 421, 554)):
            return
        send_now(self.transport, reply.wire)

    # -- input ---------------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._closed:
            return
        if self._data is not None:
            self._rate.octets += len(data)
            self.resetTimeout()
        self._buffer += data
        self._process()

    def _process(self) -> None:
        if self._processing:
            return  # the loop further up the stack carries on
        self._processing = True
        try:
            self._process_buffer()
        finally:
            self._processing = False
        self._arm()

    def _process_buffer(self) -> None:
        while self._buffer and not self._busy and not self._closed:
            if self._data is not None:
                ended, self._buffer = self._data.feed(self._buffer)
                if not ended:
                    return  # waiting for the rest of a line
                self._end_data()
                continue
            nl = self._buffer.find(b"\n")
            if nl < 0:
                if len(self._buffer) > self.limits.max_line_length + 2:
                    self._buffer = b""
                    if not self._discarding:
                        self._discarding = True
                        self._reply_error(replies.S500_LINE_TOO_LONG)
                return
            line, self._buffer = self._buffer[:nl], self._buffer[nl + 1 :]
            if self._discarding:
                self._discarding = False
                continue
            if line.endswith(b"\r"):
                line = line[:-1]
            if len(line) > self.limits.max_line_length:
                self._reply_error(replies.S500_LINE_TOO_LONG)
                continue
            self._execute(line)

    def _run(self, result: Answered, finish: Callable[[Reply | None], None] | None = None) -> None:
        """Finish one command (by default; or the greeting) with its answer: now, or once
        its Deferred fires. While it waits, later pipelined input stays in the buffer."""
        self._busy = True
        finish = finish or self._finish_command
        if is_deferred(result):
            result.addErrback(self._funnel)
            result.addCallback(finish)
            result.addErrback(self._internal_error)
            return
        try:
            finish(result)
        except Exception:
            self._internal_error(Failure())

    def _execute(self, line: bytes) -> None:
        self._busy = True
        self._phase = None  # a command completed: the next wait starts afresh
        try:
            result = self._command(line)
        except Exception:
            result = self._funnel(Failure())
        self._run(result)

    def _finish_command(self, reply: Reply | None) -> None:
        if reply is not None:
            self._reply_error(reply) if reply.is_error else self._send(reply)
        if not self._closed:
            self._busy = False
            self._process()

    def _funnel(self, failure: Failure) -> Reply:
        """The one place where exceptions become replies."""
        if failure.check(SMTPReplyError):
            err: SMTPReplyError = failure.value  # type: ignore[assignment]
            if err.reason:
                log.info(
                    "smtp {peer}: {reply.code} {reason}",
                    peer=self._peer(),
                    reply=err.reply,
                    reason=err.reason,
                )
            return err.reply
        if failure.check(defer.TimeoutError, defer.CancelledError):
            log.warn("smtp {peer}: handler timed out", peer=self._peer())
            return replies.S451_TIMEOUT
        log.failure("smtp {peer}: internal error", failure, peer=self._peer())
        return replies.S451_INTERNAL

    def _internal_error(self, failure: Failure) -> None:
        log.failure("smtp {peer}: session failed", failure, peer=self._peer())
        self._abort_data()
        self._send(replies.S451_INTERNAL)
        self._close()

    def _reply_error(self, reply: Reply) -> None:
        self._send(reply)
        self._errors += 1
        if self._errors >= self.limits.max_errors and not self._closed:
            self._send(replies.S421_TOO_MANY_ERRORS)
            self._close()

    def _peer(self) -> str:
        return self.session.peer_host if self.session else "?"

    def _call(self, fn: Callable[[*Ts], NowOrLater[T]], *args: *Ts) -> NowOrLater[T]:
        """`fn(*args)` of the handler: its value when it has one now (an exception it raised,
        or a fired Deferred's failure, is raised here), else a Deferred under the handler
        timeout."""
        return self._settle(fn(*args), self.limits.handler_timeout)

    def _settle(self, result: NowOrLater[T], timeout: float) -> NowOrLater[T]:
        """A handler's or sink's answer as a value when it has one now
        (`edge.runtime.nowlater.now`), else the Deferred, cancelled (a 451) if it has not fired
        after `timeout` seconds."""
        result = now(result)
        if is_deferred(result):
            self._waiting_for = result
            timer = self._answer_timer
            if timer is not None and timer.active():
                timer.reset(timeout)
            else:
                self._answer_timer = self.clock.callLater(timeout, self._answer_late)
        return result

    def _answer_late(self) -> None:
        waiting, self._waiting_for = self._waiting_for, None
        if waiting is not None and not waiting.called:
            waiting.cancel()

    # -- commands ------------------------------------------------------------------------

    def _command(self, line: bytes) -> Answer:
        assert self.session is not None
        if self._auth.pending is not None:
            return self._auth.continue_(line)
        verb, _, rest = line.partition(b" ")
        method = _COMMANDS.get(verb.upper())
        if method is None:
            try:
                line.decode("utf-8")
            except UnicodeDecodeError:
                return replies.S500_UNKNOWN.with_text("Command line is not valid UTF-8")
            return replies.S500_UNKNOWN
        try:
            arg = rest.decode("utf-8")
        except UnicodeDecodeError:
            return replies.S500_UNKNOWN.with_text("Command line is not valid UTF-8")
        return method(self, arg if method in _RAW_ARGUMENT else arg.strip())

    def cmd_HELO(self, arg: str) -> Reply:
        return self._greeting(arg, esmtp=False)

    def cmd_EHLO(self, arg: str) -> Reply:
        return self._greeting(arg, esmtp=True)

    def _greeting(self, arg: str, esmtp: bool) -> Reply:
        assert self.session is not None
        if not helo_ok(arg):
            return replies.S501_HELO_ARG
        self.session.helo = arg
        self.session.esmtp = esmtp
        if self.session.tls is not None:
            self.session.tls = tls_description(self.transport)
        self.session.reset_transaction()
        if not esmtp:
            return Reply(250, "", self.hostname)
        lines = [
            self.hostname,
            f"SIZE {self.limits.max_message_size}",
            "PIPELINING",
            "8BITMIME",
            "SMTPUTF8",
            "ENHANCEDSTATUSCODES",
        ]
        if self.tls_context is not None and self.session.tls is None:
            lines.append("STARTTLS")
        auth = self._auth.advertised()
        if auth is not None:
            lines.append(auth)
        return Reply(250, "", "\n".join(lines))

    def cmd_STARTTLS(self, arg: str) -> Answer:
        assert self.session is not None
        if arg:
            return replies.S501_SYNTAX
        if self.tls_context is None:
            return replies.S454_TLS_UNAVAILABLE
        if self.session.tls is not None or self.session.helo is None:
            return replies.S503_BAD_SEQUENCE
        self._send(replies.S220_READY_TLS)
        # Anything pipelined after STARTTLS in plaintext is discarded, never executed.
        self._buffer = b""
        self.transport.startTLS(self.tls_context)  # type: ignore[union-attr]
        self.session.helo = None
        self.session.esmtp = False
        self.session.authenticated_as = None
        self.session.reset_transaction()
        self.session.tls = "TLS"
        return None

    def cmd_AUTH(self, arg: str) -> Answer:
        return self._auth.start(arg)

    def cmd_MAIL(self, arg: str) -> Answer:
        assert self.session is not None
        if self.session.helo is None or self.session.sender is not None:
            return replies.S503_BAD_SEQUENCE
        if self.handler.auth_required and self.session.authenticated_as is None:
            if self.session.tls is None and self.session.auth_needs_tls:
                return replies.S530_STARTTLS_FIRST
            return replies.S530_AUTH_REQUIRED
        sender = parse_mail_from(arg, max_size=self.limits.max_message_size)
        refusal = self._call(self.handler.mail_from, self.session, sender)
        return then(refusal, self._sender_taken, sender)

    def _sender_taken(self, refusal: Reply | None, sender: Path) -> Reply:
        assert self.session is not None
        if refusal is not None:
            return refusal
        self.session.sender = sender
        return replies.S250_SENDER_OK

    def cmd_RCPT(self, arg: str) -> Answer:
        assert self.session is not None
        if self.session.sender is None:
            return replies.S503_BAD_SEQUENCE
        if len(self.session.recipients) >= self.limits.max_recipients:
            return replies.S452_TOO_MANY_RCPTS
        recipient = parse_rcpt_to(arg, smtputf8="SMTPUTF8" in self.session.sender.params)
        refusal = self._call(self.handler.rcpt_to, self.session, recipient)
        return then(refusal, self._recipient_taken, recipient)

    def _recipient_taken(self, refusal: Reply | None, recipient: Path) -> Reply:
        assert self.session is not None
        if refusal is not None:
            return refusal
        self.session.recipients.append(recipient)
        return replies.S250_RCPT_OK

    def cmd_DATA(self, arg: str) -> Answer:
        assert self.session is not None
        if arg:
            return replies.S501_SYNTAX
        if self.session.sender is None:
            return replies.S503_BAD_SEQUENCE
        if not self.session.recipients:
            return replies.S554_NO_VALID_RCPTS
        return then(self._call(self.handler.data, self.session), self._data_begins)

    def _data_begins(self, sink: MessageSink) -> Reply:
        self._data = DataReader(self.limits, sink)
        self._rate.start()
        return replies.S354_DATA

    def _junk_command(self, reply: Reply) -> Reply | None:
        """`reply` to a command that moves no mail (NOOP, RSET, VRFY, HELP), unless the
        session has sent more than `max_junk_commands` of them since its last message was
        accepted: then it is closed, so that such commands cannot hold a slot for ever."""
        self._junk += 1
        if self._junk <= self.limits.max_junk_commands:
            return reply
        self._send(replies.S421_TOO_MANY_JUNK)
        self._close()
        return None

    def cmd_RSET(self, arg: str) -> Reply | None:
        assert self.session is not None
        self.session.reset_transaction()
        return self._junk_command(replies.S250_RESET)

    def cmd_NOOP(self, arg: str) -> Reply | None:
        return self._junk_command(replies.S250_OK)

    def cmd_VRFY(self, arg: str) -> Reply | None:
        return self._junk_command(replies.S252_VRFY if arg else replies.S501_SYNTAX)

    def cmd_HELP(self, arg: str) -> Reply | None:
        return self._junk_command(replies.S211_HELP)

    def cmd_QUIT(self, arg: str) -> Reply | None:
        self._send(replies.S221_BYE)
        self._close()
        return None

    # -- DATA ----------------------------------------------------------------------------

    def _data_too_slow(self, octets: int) -> None:
        """DATA brought less than its window's share of `min_data_rate` (`DataRate`)."""
        if self._data is None or self._closed:
            return
        log.info(
            "smtp {peer}: DATA too slow: {n} octets in {window:g} s",
            peer=self._peer(),
            n=octets,
            window=self.limits.data_rate_window,
        )
        self._abort_data()
        self._send(replies.S421_DATA_TOO_SLOW)
        self._close()

    def _abort_data(self) -> None:
        self._rate.stop()
        reader, self._data = self._data, None
        if reader is not None:
            reader.abort()

    def _end_data(self) -> None:
        assert self.session is not None and self._data is not None
        self._rate.stop()
        reader, self._data = self._data, None
        sink = reader.take_sink()
        error = reader.error
        self.session.reset_transaction()
        if error is not None or sink is None:
            self._run(error or replies.S451_INTERNAL)
            return
        try:
            result = self._settle(sink.finish(), self.limits.data_timeout)
        except Exception:
            sink.abort()
            result = self._funnel(Failure())
        else:
            if is_deferred(result):
                result.addErrback(_aborting, sink)
        self._run(result, self._message_answered)

    def _message_answered(self, reply: Reply | None) -> None:
        if reply is not None and not reply.is_error:
            self._junk = 0  # a message accepted: the session moves mail
        self._finish_command(reply)


def _aborting(failure: Failure, sink: MessageSink) -> Failure:
    sink.abort()
    return failure


_COMMANDS: dict[bytes, Callable[[SMTPServer, str], Answer]] = {
    name[4:].encode(): getattr(SMTPServer, name)
    for name in dir(SMTPServer)
    if name.startswith("cmd_")
}
"""The commands by their verb (upper case)."""

_RAW_ARGUMENT = {SMTPServer.cmd_MAIL, SMTPServer.cmd_RCPT}
"""Commands whose argument is parsed with its spaces as received."""
