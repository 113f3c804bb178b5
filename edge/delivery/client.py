"""Sending mail over SMTP to a delivery target: the device's connector, an old MX, an MX.

Built on Twisted's ESMTP client (greeting, EHLO, STARTTLS and AUTH are its code), with the
transaction driven here, and with two corrections made here in one place: the data is sent
exactly as spooled (Twisted's own per-chunk LF rewriting and dot-stuffing let a dot line at
a 16 KiB boundary end DATA early), and the outcome is reported per recipient, with a
refusal at end of DATA applying to every recipient that RCPT had accepted. Hosts are tried
in order until one answers the transaction. Connection-level failures are always temporary,
and reported as such (`Outcome.connected` false): the queue keeps a device's mail in
arrival order only while the device cannot be reached this way.

The paths go out exactly as the MX received them (`<` + path + `>`, UTF-8), never parsed
again: whatever the MX's parser took, this sends. A message needs SMTPUTF8 (RFC 6531) when
its paths are not ASCII, or when its header section is not ASCII and it came with SMTPUTF8
or goes to an MX (a legacy 8-bit message goes to a device or an old MX as it came); one that
came with it asks for it wherever offered. A server without it gets no transaction for a
message that needs it: 553 5.6.7 (section 3.4), unless another host of the target takes it.
`BODY=8BITMIME` goes with 8-bit data where offered; to an MX without it the data is not sent
(554 5.6.3, unless another host takes it: RFC 6152 §3 says convert or return, and converting
would break the DKIM signature), to a device or an old MX it goes unchanged. Where the server
offers DSN (RFC 3461), a delivery with an `envid` asks for failure and delay reports under
it (`RET=HDRS ENVID=`, `NOTIFY=FAILURE,DELAY ORCPT=`), so they can be matched back.
Each host is reached in its target's TLS mode for it (`Target.tls_for`): STARTTLS when
offered, TLS from the first octet (a split domain's old MX on port 465), or plain SMTP.
An MX under an MTA-STS policy (`Target.tls_verify`) has its certificate checked against the
configured CA roots and its name: in `enforce` mode a host without STARTTLS or with a
certificate that does not verify gets no transaction (temporary, never plain text); in
`testing` mode that is logged and noted after the reply, and the mail goes.
A device target with a pin (`Target.tls_pin`, learned when the device registered) is
reached with STARTTLS required and the connector's key checked against the pin during the
handshake (`edge.tls.PinnedClientTLS`): a connector that does not offer STARTTLS, or
presents another key, gets no AUTH (its credentials are never sent) and the attempt is a
temporary failure of the connection, logged as such (the device may be rotating its
certificate; the mail waits).

With a sealer (`edge.checks.arc.ARCSealer`, `checks.arc_seal`), the edge's ARC set goes on
top of a message sent to a device or an upstream host (RFC 8617: sealing is the forwarding
hop's act). It is computed over the message as stored, which carries the edge's
Authentication-Results on top, in a worker thread, once per delivery and only when a
transaction got as far as DATA (recipients accepted): an attempt that fails before costs no
RSA signature. It goes under a leading `X-Tailpost-Queue-ID` line, which the connector
reads first. A seal that fails is logged and the message goes unsealed.

Connections to the same target are reused. Per (host, port, username, secret, TLS mode,
pin) the deliverer keeps the sessions that finished a transaction and sends the next
transaction for that key on one of them. At most `max_connections` are open per key (more
deliveries wait their turn); an idle session is closed after `idle_timeout` seconds, a
session after `max_transactions` transactions, and one the server closed or that failed is
dropped. When no connection to a host can be made and none is open, the deliveries waiting
for one get that answer at once. A transaction that failed only because a reused session
turned out dead (closed, timed out, 421, RSET refused) before the end of its data was sent
is tried once more on a fresh connection, so that this is never reported as a failure of
the message; a connection lost after the data was sent is reported (temporary), never
followed by a second copy.

It must never: send a message on a session whose previous transaction is unfinished (one
transaction at a time; RSET first after one that ended mid-way), let a session made for one
key (and its credentials) carry another key's mail, send the data anything but once and
unchanged, or report a failure of the connection as anything but temporary. Twisted's
session log is off, so that no error text can carry the AUTH exchange.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer, ssl, threads
from twisted.internet.interfaces import IReactorTCP, IReactorTime
from twisted.logger import Logger
from twisted.mail.smtp import TLSRequiredError
from twisted.python.failure import Failure

from edge.checks.arc import ARCSealer
from edge.delivery.clientsession import (
    QUIT_TIMEOUT,
    ClientSession,
    ClientTransaction,
    LocalFailure,
    SessionDefect,
    SessionFactory,
)
from edge.delivery.mtasts import checked_tls, sts_failure, tls_note, tls_noted
from edge.delivery.outcomes import Outcome, accepted, failed
from edge.delivery.routing import Target
from edge.smtp import replies
from edge.spool.spool import QUEUE_ID_HEADER
from edge.tls import PinnedClientTLS

log = Logger()

_DOT_AT_LINE_START = re.compile(rb"^\.", re.MULTILINE)

DEFAULT_MAX_CONNECTIONS = 4
DEFAULT_IDLE_TIMEOUT = 30.0
DEFAULT_MAX_TRANSACTIONS = 100

# host, port, username, secret, TLS mode, pin, certificate check ("" or "mode:name"):
# sessions are never shared across keys.
PoolKey = tuple[str, int, str | None, str | None, str, str | None, str]

SEALED_KINDS = ("device", "upstream")
"""The targets a message goes to with the edge's ARC set: those it forwards inbound mail to."""


def wire_path(address: str) -> bytes:
    """A path as it goes out: exactly as received, in angle brackets, UTF-8. One that no
    SMTP command could carry (the MX's parser never takes such a path) raises ValueError."""
    if any(c in address for c in "<>\r\n\0"):
        raise ValueError(f"path {address!r} cannot be sent in an SMTP command")
    return b"<" + address.encode("utf-8") + b">"


@dataclass(frozen=True)
class Needs:
    """What a message asks of the server's extensions (`ClientTransaction`'s flags)."""

    utf8_needed: bool
    utf8_wanted: bool
    eight_bit: bool
    strict_8bit: bool = False
    """8BITMIME or nothing for 8-bit data: set for an MX (`Target.kind` "mx")."""
    envid: str = ""
    """Where the server offers DSN (RFC 3461): the ENVID its reports are to name."""

    @classmethod
    def of(
        cls,
        sender: str,
        recipients: list[str],
        data: bytes,
        smtputf8: bool,
        strict: bool = False,
        envid: str = "",
    ) -> Needs:
        """`strict` for an MX: a non-ASCII header section needs SMTPUTF8 whatever the
        message came with, and 8-bit data needs 8BITMIME."""
        paths = sender.isascii() and all(r.isascii() for r in recipients)
        ascii_data = data.isascii()
        head_end = data.find(b"\r\n\r\n")
        ascii_head = ascii_data or data[: head_end if head_end >= 0 else len(data)].isascii()
        return cls(
            utf8_needed=not paths or ((smtputf8 or strict) and not ascii_head),
            utf8_wanted=smtputf8,
            eight_bit=not ascii_data,
            strict_8bit=strict,
            envid=envid,
        )


def dot_stuff(data: bytes) -> bytes:
    """`data` as DATA sends it: a line that starts with "." gets another (RFC 5321 §4.5.2)."""
    return _DOT_AT_LINE_START.sub(b"..", data)


def _pin_failure(exc: Exception, pinned: PinnedClientTLS, where: str) -> Exception:
    """Why a pinned connection failed, said plainly in the log and the outcome's text."""
    if pinned.mismatch:
        failure = LocalFailure(
            replies.D451_PIN_MISMATCH, seen=str(pinned.seen), pin=str(pinned.pin)
        )
    elif isinstance(exc, TLSRequiredError):
        failure = LocalFailure(replies.D451_PIN_NO_STARTTLS)
    else:
        return exc
    log.warn("smtp: {text}", text=failure.reply.format(where=where, **failure.values).detail)
    return failure


class _Pool:
    """The sessions of one key: idle ones to reuse, and a bound on how many are open."""

    def __init__(self, owner: SMTPDeliverer, key: PoolKey, target: Target) -> None:
        self.owner = owner
        self.key = key
        self.target = target
        self.idle: list[ClientSession] = []  # most recently used last
        self.open = 0  # sessions holding a slot: connecting, idle or busy
        self.waiters: deque[defer.Deferred[None]] = deque()

    async def acquire(self, fresh: bool) -> ClientSession:
        """An idle session (unless `fresh`), a new one, or wait for one to be free."""
        waited = False
        while True:
            while self.idle and not fresh:
                session = self.idle.pop()
                session._cancel_idle_timer()
                if session.usable:
                    return session
                self._discard(session)
            if fresh and self.open >= self.owner.max_connections and self.idle:
                self._discard(self.idle.pop(0))  # make room: the oldest idle one goes
            if self.open < self.owner.max_connections:
                return await self._connect()
            waiter: defer.Deferred[None] = defer.Deferred()
            # A waiter woken for nothing keeps its place at the front.
            (self.waiters.appendleft if waited else self.waiters.append)(waiter)
            waited = True
            await waiter

    async def _connect(self) -> ClientSession:
        owner, target = self.owner, self.target
        host, port, tls, pin = self.key[0], self.key[1], self.key[4], self.key[5]
        pinned = PinnedClientTLS(pin) if pin is not None else None
        context: Any = pinned
        checked = checked_tls(self.key[6], owner.ca_file)
        if checked is not None and tls == "starttls":
            context = checked
        if context is None and tls == "starttls":
            context = ssl.CertificateOptions()
        session = ClientSession(
            (target.username or "").encode(),
            (target.secret or "").encode(),
            context,
            owner.hostname.encode(),
            owner.timeout,
            owner.clock,
            require_auth=target.username is not None,
            require_tls=pinned is not None or (checked is not None and checked.strict),
        )
        session.checked = checked
        session.counted = True
        self.open += 1
        session.on_lost = self._lost
        if tls == "tls":  # TLS from the first octet: the session sees a secure transport
            owner.reactor.connectSSL(
                host, port, SessionFactory(session), ssl.CertificateOptions(), owner.timeout
            )
        else:
            tcp: IReactorTCP = owner.reactor
            tcp.connectTCP(host, port, SessionFactory(session), timeout=owner.timeout)
        try:
            ready = await session.ready
            tls_noted(ready, target.where(host, port))
            return ready
        except Exception as exc:
            said = exc if pinned is None else _pin_failure(exc, pinned, target.where(host, port))
            if checked is not None and checked.strict:
                said = sts_failure(exc, checked, target.where(host, port))
            session.close()  # (only does something when this wait was cancelled)
            self._forget(session)
            if self.open == 0 and self.waiters:
                # No connection to this host could be made and none is open: those waiting
                # get the same answer now, rather than each waiting for its own timeout.
                waiters, self.waiters = list(self.waiters), deque()
                for waiter in waiters:
                    if not waiter.called:
                        waiter.errback(Failure(said))
                self._drop_if_unused()
            else:
                self._wake()
            if said is exc:
                raise
            raise said from None

    def release(self, session: ClientSession) -> None:
        """A transaction on `session` has ended: keep it for the next one, or close it."""
        if (
            session.usable
            and session.counted
            and not self.owner.closing
            and session.transactions < self.owner.max_transactions
        ):
            session.idle_timer = self.owner.clock.callLater(
                self.owner.idle_timeout, self._expire, session
            )
            self.idle.append(session)
        else:
            self._discard(session)
        self._wake()

    def _expire(self, session: ClientSession) -> None:
        session.idle_timer = None
        if session in self.idle:
            self.idle.remove(session)
            self._discard(session)
            self._wake()

    def _lost(self, session: ClientSession) -> None:
        if session in self.idle:
            self.idle.remove(session)
        if session.counted:
            self._forget(session)
            self._wake()

    def _discard(self, session: ClientSession) -> None:
        if session in self.idle:
            self.idle.remove(session)
        session.close()
        self._forget(session)

    def _forget(self, session: ClientSession) -> None:
        if session.counted:
            session.counted = False
            self.open -= 1
        self._drop_if_unused()

    def _drop_if_unused(self) -> None:
        if self.open == 0 and not self.waiters and not self.idle:
            if self.owner._pools.get(self.key) is self:
                del self.owner._pools[self.key]

    def _wake(self) -> None:
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.called:  # (called already only if that delivery was cancelled)
                waiter.callback(None)
                return

    def close_idle(self) -> list[defer.Deferred[None]]:
        closing = []
        for session in list(self.idle):
            closing.append(session.closed)
            self.idle.remove(session)
            session._cancel_idle_timer()
            session.close(QUIT_TIMEOUT)
            self._forget(session)
        return closing


def _trace_end(data: bytes) -> int:
    """Where the message proper starts: after a leading X-Tailpost-Queue-ID line, if any."""
    name = QUEUE_ID_HEADER + b":"
    if data[: len(name)].lower() == name.lower():
        end = data.find(b"\n")
        return len(data) if end < 0 else end + 1
    return 0


class _Seal:
    """The ARC-sealed data of one delivery, made at most once, when first asked for."""

    def __init__(self, deliverer: SMTPDeliverer, sealer: ARCSealer, data: bytes, stuffed: bytes):
        self.deliverer = deliverer
        self.sealer = sealer
        self.data = data
        self.stuffed = stuffed
        self.result: defer.Deferred[bytes] | None = None

    def __call__(self) -> defer.Deferred[bytes]:
        if self.result is None:
            owner = self.deliverer
            cut = _trace_end(self.data)
            work = owner.run_blocking(self.sealer.seal, self.data[cut:], int(owner.clock.seconds()))
            self.data = b""  # (the thread has its slice)
            work.addCallback(lambda arc_set: self._sealed(cut, arc_set))
            work.addErrback(self._failed)
            self.result = work
        out: defer.Deferred[bytes] = defer.Deferred()

        def fire(stuffed: bytes) -> bytes:
            out.callback(stuffed)
            return stuffed

        self.result.addCallback(fire)
        return out

    def _sealed(self, cut: int, arc_set: list[bytes]) -> bytes:
        # The ARC set's lines never start with ".": the stuffed data takes it as it is.
        return self.stuffed[:cut] + b"".join(arc_set) + self.stuffed[cut:]

    def _failed(self, failure: Failure) -> bytes:
        log.failure("smtp: ARC sealing failed; the message goes unsealed", failure)
        return self.stuffed


class SMTPDeliverer:
    """Delivers one message to one target per call, reusing connections per target."""

    def __init__(
        self,
        reactor: Any,
        hostname: str,
        timeout: float = 60.0,
        *,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        max_transactions: int = DEFAULT_MAX_TRANSACTIONS,
        clock: IReactorTime | None = None,
        sealer: ARCSealer | None = None,
        run_blocking: Callable[..., defer.Deferred[Any]] = threads.deferToThread,
        ca_file: str = "",
    ) -> None:
        """`ca_file`: the CA roots MX certificates are checked against under MTA-STS (PEM;
        "" for the system's)."""
        if max_connections < 1 or max_transactions < 1:
            raise ValueError("max_connections and max_transactions must be at least 1")
        self.reactor = reactor
        self.hostname = hostname
        self.timeout = timeout
        self.max_connections = max_connections
        self.idle_timeout = idle_timeout
        self.max_transactions = max_transactions
        self.clock: IReactorTime = clock if clock is not None else reactor
        self.sealer = sealer
        self.run_blocking = run_blocking  # for the ARC seal (CPU-heavy)
        self.ca_file = ca_file
        self.closing = False
        self._pools: dict[PoolKey, _Pool] = {}

    async def deliver(
        self,
        target: Target,
        sender: str,
        recipients: list[str],
        data: bytes,
        *,
        smtputf8: bool = False,
        envid: str = "",
    ) -> dict[str, Outcome]:
        """Send `data` from `sender` to `recipients`; `smtputf8`: the message came with
        SMTPUTF8; `envid`: the envelope id that reports of the receiver (RFC 3461) name,
        asked for where DSN is offered. An outcome per recipient; an exception only for a
        defect of ours."""
        paths = (wire_path(sender), [wire_path(r) for r in recipients])
        needs = Needs.of(sender, recipients, data, smtputf8, target.kind == "mx", envid)
        stuffed = dot_stuff(data)
        prepare = None
        if self.sealer is not None and target.kind in SEALED_KINDS:
            prepare = _Seal(self, self.sealer, data, stuffed)
        outcomes: dict[str, Outcome] = {}
        for host, port in target.hosts:
            outcomes = await self._send(
                target, host, port, paths, recipients, stuffed, needs, prepare
            )
            if any(o.connected for o in outcomes.values()):
                break  # this host answered the transaction: its word stands
        return outcomes

    def idle_count(self, target: Target, host: str, port: int) -> int:
        """How many idle sessions are kept for `target` at `host:port` (for tests, metrics)."""
        pool = self._pools.get(self._key(target, host, port))
        return len(pool.idle) if pool is not None else 0

    def close(self) -> defer.Deferred[None]:
        """Close every idle session (QUIT); busy ones close when their transaction ends.

        Fires once the idle ones are disconnected. Delivering after this still works, on
        connections that are not kept.
        """
        self.closing = True
        closing: list[defer.Deferred[None]] = []
        for pool in list(self._pools.values()):
            closing.extend(pool.close_idle())
        done = defer.DeferredList(closing, consumeErrors=True)
        return done.addCallback(lambda _: None)

    @staticmethod
    def _key(target: Target, host: str, port: int) -> PoolKey:
        tls = target.tls_for(host, port)
        checked = f"{target.tls_verify}:{target.name_of(host, port)}" if target.tls_verify else ""
        return (host.lower(), port, target.username, target.secret, tls, target.tls_pin, checked)

    def _pool(self, target: Target, host: str, port: int) -> _Pool:
        key = self._key(target, host, port)
        pool = self._pools.get(key)
        if pool is None:
            pool = self._pools[key] = _Pool(self, key, target)
        return pool

    async def _send(
        self,
        target: Target,
        host: str,
        port: int,
        paths: tuple[bytes, list[bytes]],
        rcpts: list[str],
        data: bytes,
        needs: Needs,
        prepare: Callable[[], defer.Deferred[bytes]] | None = None,
    ) -> dict[str, Outcome]:
        where = target.where(host, port)  # the host name, with the address connected to
        mail_from, encoded = paths
        for attempt in range(2):
            pool = self._pool(target, host, port)
            try:
                session = await pool.acquire(fresh=attempt > 0)
            except defer.CancelledError:
                raise
            except Exception:
                return failed(Failure(), rcpts, where)
            reused = session.transactions > 0
            tx = ClientTransaction(
                mail_from,
                encoded,
                data,
                needs.utf8_needed,
                needs.utf8_wanted,
                needs.eight_bit,
                prepare,
                strict_8bit=needs.strict_8bit,
                envid=needs.envid.encode("ascii", "replace"),
            )
            try:
                session.send(tx)
                result = await tx.done
            finally:
                pool.release(session)
            if result.error is None:
                assert result.accepted is not None
                return accepted(result.accepted, where, tls_note(session))
            if isinstance(result.error, SessionDefect):
                result.error.failure.raiseException()  # a defect of ours, not the host's
            if result.dead and reused and attempt == 0:
                log.info(
                    "smtp: reused connection to {where} failed ({error}); again on a new one",
                    where=where,
                    error=result.error,
                )
                continue
            return failed(Failure(result.error), rcpts, where)
        raise AssertionError("unreachable")  # pragma: no cover


class DelivererService(Service):
    """Closes the deliverer's idle connections when the edge stops."""

    def __init__(self, deliverer: SMTPDeliverer) -> None:
        self.setName("smtp-deliverer")
        self.deliverer = deliverer

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        return self.deliverer.close()
