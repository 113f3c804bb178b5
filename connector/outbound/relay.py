"""The device's SMTP client of its edge's relay listener: one message at a time, in order.

Built on the edge's delivery session (`edge.delivery.clientsession.Session`: Twisted's
greeting, EHLO, STARTTLS and AUTH, then transactions driven there, the data sent exactly as
given, a reply per recipient). It authenticates with AUTH PLAIN as the device: user name
the device's id, password its device key, both from its registration link. STARTTLS is used
whenever the edge offers it, and required (no AUTH is sent without it) unless the edge's
address is loopback or inside `[device] plaintext_networks` (`connector.hoppolicy`). The
edge's certificate is not verified: the device has no pin of it yet, so TLS here keeps the
key from passive listeners only (the tailnet is what authenticates the edge).

The relay's 250 to the data is "250 2.0.0 Queued as <QID>"; the QID comes back in the
`RelayResult`. A session is kept for the next message and closed after `idle_timeout`
seconds without one. `send` never fails: a device not linked yet, an edge that cannot be
reached, a refused AUTH or a lost connection are 4xx outcomes for every recipient (the
queue tries again later); the edge's own replies, per recipient, are returned as they are.
It must never send the device key to an edge that requires TLS before STARTTLS, nor log it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import urlsplit

from twisted.internet import defer, ssl
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.mail.smtp import PLAINAuthenticator
from twisted.python.failure import Failure

from connector.hoppolicy import IPNetwork, plaintext_allowed
from connector.outbound.queue import RelayOutcome, RelayResult
from edge.config import ConfigError, parse_listen
from edge.delivery.client import Needs, dot_stuff, wire_path
from edge.delivery.clientsession import (
    QUIT_TIMEOUT,
    ClientSession,
    ClientTransaction,
    SessionFactory,
)
from edge.delivery.outcomes import Outcome, accepted, failed
from edge.smtp import replies
from edge.smtp.replies import Reply

__all__ = ["DEFAULT_RELAY_PORT", "EdgeRelay", "relay_address"]

log = Logger(namespace="tailpost.outbound.relay")

DEFAULT_RELAY_PORT = 2526
_QUEUED_AS = re.compile(rb"Queued as ([A-Za-z0-9._-]{1,80})")


def relay_address(edge_relay: str, edge_url: str) -> str:
    """`[device] edge_relay`, or the host of `edge_url` with port 2526 ("" without either)."""
    if edge_relay:
        return edge_relay
    host = urlsplit(edge_url).hostname if edge_url else None
    if not host:
        return ""
    return f"[{host}]:{DEFAULT_RELAY_PORT}" if ":" in host else f"{host}:{DEFAULT_RELAY_PORT}"


class _RelaySession(ClientSession):
    """A delivery session that authenticates with AUTH PLAIN only and keeps the text of
    the reply to the end of the data (it carries the edge's queue id)."""

    def __init__(self, username: bytes, *args: Any, **kwargs: Any) -> None:
        super().__init__(username, *args, **kwargs)
        self.authenticators = [PLAINAuthenticator(username)]
        self.final_reply = b""

    def _accepted(self, code: int, resp: bytes) -> None:
        self.final_reply = resp
        super()._accepted(code, resp)


def _everyone(
    recipients: list[str], reply: Reply, where: str, connected: bool = False
) -> RelayResult:
    """The same named reply for every recipient (by default: the edge never answered)."""
    outcome = RelayOutcome(reply.code, reply.detail)
    return RelayResult(dict.fromkeys(recipients, outcome), "", where, connected)


def _result(outcomes: dict[str, Outcome], where: str, queue_id: str = "") -> RelayResult:
    relay = {rcpt: RelayOutcome(o.code, o.text) for rcpt, o in outcomes.items()}
    return RelayResult(relay, queue_id, where, any(o.connected for o in outcomes.values()))


def _text(resp: Any) -> str:
    if isinstance(resp, bytes):
        return resp.decode("utf-8", "replace").replace("\n", " ").strip()
    return str(resp)


class EdgeRelay:
    """Sends the queue's messages to the edge's relay listener (`connector.outbound.queue`'s
    `Relay`)."""

    def __init__(
        self,
        reactor: Any,
        hostname: str,
        address: Callable[[], str],
        credentials: Callable[[], tuple[str, str] | None],
        *,
        plaintext_networks: Sequence[IPNetwork] = (),
        clock: IReactorTime | None = None,
        timeout: float = 60.0,
        idle_timeout: float = 30.0,
    ) -> None:
        """`address()`: the relay's host:port now (the all-in-one learns its port late);
        `credentials()`: (device id, device key), or None while the device is not linked."""
        self.reactor = reactor
        self.clock: IReactorTime = clock if clock is not None else reactor
        self.hostname = hostname
        self.address = address
        self.credentials = credentials
        self.plaintext_networks = plaintext_networks
        self.timeout = timeout
        self.idle_timeout = idle_timeout
        self._session: _RelaySession | None = None
        self._session_key: tuple[str, int, str, str] | None = None
        self._idle: IDelayedCall | None = None

    def point_at(self, address: str) -> None:
        """Relay to `address` (host:port) from now on (the all-in-one, once its edge
        listens); a session kept for another address is not used again."""
        self.address = lambda: address

    def requires_tls(self, host: str) -> bool:
        """Whether the device key may go to `host` only over TLS."""
        return not plaintext_allowed(host, self.plaintext_networks)

    def send(self, sender: str, recipients: list[str], data: bytes) -> Deferred[RelayResult]:
        return defer.ensureDeferred(self._send(sender, recipients, data))

    async def _send(self, sender: str, recipients: list[str], data: bytes) -> RelayResult:
        creds = self.credentials()
        if not creds:
            return _everyone(recipients, replies.D451_NOT_LINKED, "")
        address = self.address()
        if not address:
            log.info("outbound relay: no edge relay address (yet); the mail waits")
            return _everyone(recipients, replies.D451_NO_RELAY_ADDRESS, "")
        try:
            host, port = parse_listen(address)
        except ConfigError as exc:
            log.error("outbound relay: no usable edge relay address: {error}", error=exc)
            return _everyone(recipients, replies.D451_NO_RELAY_ADDRESS, "")
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            paths = [wire_path(r) for r in recipients]
            mail_from = wire_path(sender)
        except ValueError:
            return _everyone(recipients, replies.D550_BAD_ADDRESS, where, connected=True)
        head_end = data.find(b"\r\n\r\n")  # none: the message is all header section
        head = data if head_end < 0 else data[:head_end]
        needs = Needs.of(sender, recipients, data, smtputf8=not head.isascii())
        stuffed = dot_stuff(data)
        for attempt in range(2):
            try:
                session = await self._ready(host, port, creds, fresh=attempt > 0)
            except Exception as exc:
                log.warn(
                    "outbound relay: the edge at {where} is not reachable: {error}",
                    where=where,
                    error=_text(getattr(exc, "resp", exc)),
                )
                reply = replies.D451_NO_CONNECTION.format(where=where)
                return _everyone(recipients, reply, where)
            reused = session.transactions > 0
            tx = ClientTransaction(
                mail_from, paths, stuffed, needs.utf8_needed, needs.utf8_wanted, needs.eight_bit
            )
            session.final_reply = b""
            session.send(tx)
            result = await tx.done
            self._keep_or_drop(session)
            if result.error is None:
                assert result.accepted is not None
                match = _QUEUED_AS.search(session.final_reply)
                qid = match.group(1).decode() if match else ""
                return _result(accepted(result.accepted, where), where, qid)
            if result.dead and reused and attempt == 0:
                # A kept session the edge had closed: the data never went; a new one, once.
                continue
            return _result(failed(Failure(result.error), recipients, where), where)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _ready(
        self, host: str, port: int, creds: tuple[str, str], *, fresh: bool = False
    ) -> _RelaySession:
        """A session for this key: the kept one (unless `fresh`), else a new one."""
        key = (host, port, creds[0], creds[1])
        idle, self._idle = self._idle, None
        if idle is not None and idle.active():
            idle.cancel()
        session = self._session
        if session is not None and session.usable and self._session_key == key and not fresh:
            return session
        if session is not None:
            session.close(QUIT_TIMEOUT)
        self._session = None
        require_tls = self.requires_tls(host)
        session = _RelaySession(
            creds[0].encode(),
            creds[1].encode(),
            ssl.CertificateOptions(),
            self.hostname.encode(),
            self.timeout,
            self.clock,
            require_auth=True,
            require_tls=require_tls,
        )
        self.reactor.connectTCP(host, port, SessionFactory(session), timeout=self.timeout)
        ready = await session.ready
        assert isinstance(ready, _RelaySession)
        self._session, self._session_key = ready, key
        return ready

    def _keep_or_drop(self, session: _RelaySession) -> None:
        if session is not self._session:
            return
        if not session.usable:
            self._session = None
            return
        self._idle = self.clock.callLater(self.idle_timeout, self._close_idle)

    def _close_idle(self) -> None:
        self._idle = None
        session, self._session = self._session, None
        if session is not None:
            session.close(QUIT_TIMEOUT)

    def close(self) -> Deferred[None]:
        """QUIT the kept session; fires once it is closed."""
        idle, self._idle = self._idle, None
        if idle is not None and idle.active():
            idle.cancel()
        session, self._session = self._session, None
        if session is None or session.lost:
            return defer.succeed(None)
        session.close(QUIT_TIMEOUT)
        return session.closed
