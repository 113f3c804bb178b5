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
from twisted.mail.smtp import PLAINAuthenticator, SMTPDeliveryError

from connector.hoppolicy import IPNetwork, plaintext_allowed
from connector.outbound.queue import RelayOutcome, RelayResult
from edge.config import ConfigError, parse_listen
from edge.delivery.client import Needs, wire_path
from edge.delivery.clientsession import (
    QUIT_TIMEOUT,
    MailRefused,
    NeedsSMTPUTF8,
    Session,
    SessionFactory,
    Transaction,
)

__all__ = ["DEFAULT_RELAY_PORT", "EdgeRelay", "relay_address"]

log = Logger(namespace="tailpost.outbound.relay")

DEFAULT_RELAY_PORT = 2526
_DOT_AT_LINE_START = re.compile(rb"^\.", re.MULTILINE)
_QUEUED_AS = re.compile(rb"Queued as ([A-Za-z0-9._-]{1,80})")


def relay_address(edge_relay: str, edge_url: str) -> str:
    """`[device] edge_relay`, or the host of `edge_url` with port 2526 ("" without either)."""
    if edge_relay:
        return edge_relay
    host = urlsplit(edge_url).hostname if edge_url else None
    if not host:
        return ""
    return f"[{host}]:{DEFAULT_RELAY_PORT}" if ":" in host else f"{host}:{DEFAULT_RELAY_PORT}"


class _RelaySession(Session):
    """A delivery session that authenticates with AUTH PLAIN only and keeps the text of
    the reply to the end of the data (it carries the edge's queue id)."""

    def __init__(self, username: bytes, *args: Any, **kwargs: Any) -> None:
        super().__init__(username, *args, **kwargs)
        self.authenticators = [PLAINAuthenticator(username)]
        self.final_reply = b""

    def _accepted(self, code: int, resp: bytes) -> None:
        self.final_reply = resp
        super()._accepted(code, resp)


def _everyone(recipients: list[str], code: int, text: str, where: str) -> RelayResult:
    outcome = RelayOutcome(code, text)
    return RelayResult(dict.fromkeys(recipients, outcome), "", where)


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

    def requires_tls(self, host: str) -> bool:
        """Whether the device key may go to `host` only over TLS."""
        return not plaintext_allowed(host, self.plaintext_networks)

    def send(self, sender: str, recipients: list[str], data: bytes) -> Deferred[RelayResult]:
        return defer.ensureDeferred(self._send(sender, recipients, data))

    async def _send(self, sender: str, recipients: list[str], data: bytes) -> RelayResult:
        creds = self.credentials()
        if not creds:
            text = "4.7.0 this device is not linked to an edge yet"
            return _everyone(recipients, 451, text, "")
        try:
            host, port = parse_listen(self.address())
        except ConfigError as exc:
            log.error("outbound relay: no usable edge relay address: {error}", error=exc)
            return _everyone(recipients, 451, "4.3.5 no edge relay address is configured", "")
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            paths = [wire_path(r) for r in recipients]
            mail_from = wire_path(sender)
        except ValueError as exc:
            return _everyone(recipients, 553, f"5.1.3 {exc}", where)
        try:
            session = await self._ready(host, port, creds)
        except Exception as exc:
            log.warn(
                "outbound relay: the edge at {where} is not reachable: {error}",
                where=where,
                error=_text(getattr(exc, "resp", exc)),
            )
            return _everyone(
                recipients, 451, f"4.4.1 the edge's relay at {where} is not reachable", where
            )
        head_end = data.find(b"\r\n\r\n")
        needs = Needs.of(sender, recipients, data, smtputf8=not data[: max(head_end, 0)].isascii())
        stuffed = _DOT_AT_LINE_START.sub(b"..", data)
        tx = Transaction(
            mail_from, paths, stuffed, needs.utf8_needed, needs.utf8_wanted, needs.eight_bit
        )
        by_path = dict(zip(paths, recipients, strict=True))
        session.final_reply = b""
        session.send(tx)
        result = await tx.done
        self._keep_or_drop(session)
        if result.error is None:
            assert result.accepted is not None
            match = _QUEUED_AS.search(session.final_reply)
            outcomes = {
                by_path.get(addr, _text(addr).strip("<>")): RelayOutcome(code, _text(resp))
                for addr, code, resp in result.accepted[1]
            }
            return RelayResult(outcomes, match.group(1).decode() if match else "", where)
        return self._failed(result.error, recipients, by_path, where)

    @staticmethod
    def _failed(
        err: Exception, recipients: list[str], by_path: dict[bytes, str], where: str
    ) -> RelayResult:
        if isinstance(err, NeedsSMTPUTF8):
            text = f"5.6.7 the edge's relay at {where} does not offer SMTPUTF8"
            return _everyone(recipients, 553, text, where)
        code = getattr(err, "code", 0)
        addresses: Any = getattr(err, "addresses", None) or []
        answered = isinstance(err, SMTPDeliveryError) and (
            bool(addresses) or isinstance(err, MailRefused)
        )
        if not answered or not isinstance(code, int) or not 400 <= code < 600:
            log.warn(
                "outbound relay: sending to {where} failed: {error}",
                where=where,
                error=_text(getattr(err, "resp", err)),
            )
            return _everyone(recipients, 451, f"4.4.2 the connection to {where} failed", where)
        result = _everyone(recipients, code, _text(getattr(err, "resp", b"")), where)
        for addr, rcpt_code, rcpt_resp in addresses:
            if not 200 <= rcpt_code < 300:
                rcpt = by_path.get(addr, _text(addr).strip("<>"))
                result.outcomes[rcpt] = RelayOutcome(rcpt_code, _text(rcpt_resp))
        return result

    async def _ready(self, host: str, port: int, creds: tuple[str, str]) -> _RelaySession:
        key = (host, port, creds[0], creds[1])
        idle, self._idle = self._idle, None
        if idle is not None and idle.active():
            idle.cancel()
        session = self._session
        if session is not None and session.usable and self._session_key == key:
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
