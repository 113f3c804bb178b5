"""Sending one message to one target over SMTP: the device's connector, an old MX, an MX.

Built on Twisted's ESMTP client, with two corrections made here in one place: the data is
sent exactly as spooled (Twisted's own per-chunk LF rewriting and dot-stuffing let a dot
line at a 16 KiB boundary end DATA early), and the outcome is reported per recipient, with
a refusal at end of DATA applying to every recipient that RCPT had accepted. Hosts are tried
in order until one answers the transaction. Connection-level failures are always temporary.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer, ssl
from twisted.internet.interfaces import IReactorTCP
from twisted.mail.smtp import ESMTPSender, ESMTPSenderFactory, SMTPDeliveryError

from edge.routing import Target

_DOT_AT_LINE_START = re.compile(rb"^\.", re.MULTILINE)


@dataclass(frozen=True)
class Outcome:
    """What happened to one recipient in one attempt."""

    code: int
    text: str
    host: str = ""
    connected: bool = True

    @property
    def final(self) -> bool:
        return self.code < 400 or self.code >= 500

    @property
    def delivered(self) -> bool:
        return 200 <= self.code < 300


class ExactDataSender(ESMTPSender):
    """Twisted's ESMTP sender, sending message data exactly as given (already stuffed)."""

    def transformChunk(self, chunk: bytes) -> bytes:
        self.resetTimeout()
        return chunk


def _addr(value: bytes | str) -> str:
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
    return text.strip("<>")


class SMTPDeliverer:
    def __init__(self, reactor: Any, hostname: str, timeout: float = 60.0) -> None:
        self.reactor = reactor
        self.hostname = hostname
        self.timeout = timeout

    async def deliver(
        self, target: Target, sender: str, recipients: list[str], data: bytes
    ) -> dict[str, Outcome]:
        stuffed = _DOT_AT_LINE_START.sub(b"..", data)
        outcomes: dict[str, Outcome] = {}
        for host, port in target.hosts:
            outcomes = await self._send(target, host, port, sender, recipients, stuffed)
            if any(o.connected for o in outcomes.values()):
                break  # this host answered the transaction: its word stands
        return outcomes

    def _send(
        self, target: Target, host: str, port: int, sender: str, rcpts: list[str], data: bytes
    ) -> defer.Deferred[dict[str, Outcome]]:
        result: defer.Deferred[Any] = defer.Deferred()
        context = ssl.CertificateOptions() if target.starttls else None
        factory = ESMTPSenderFactory(
            (target.username or "").encode(),
            (target.secret or "").encode(),
            sender,
            rcpts,
            io.BytesIO(data),
            result,
            retries=0,
            timeout=self.timeout,
            contextFactory=context,
            requireAuthentication=target.username is not None,
            requireTransportSecurity=False,
        )
        factory.protocol = ExactDataSender
        factory.domain = self.hostname.encode()
        tcp: IReactorTCP = self.reactor
        tcp.connectTCP(host, port, factory, timeout=self.timeout)
        where = f"{host}:{port}"
        return result.addCallbacks(
            self._accepted, self._failed, callbackArgs=(where,), errbackArgs=(rcpts, where)
        )

    @staticmethod
    def _accepted(
        result: tuple[int, list[tuple[bytes, int, bytes]]], where: str
    ) -> dict[str, Outcome]:
        _num_ok, addresses = result
        return {
            _addr(addr): Outcome(code, resp.decode("utf-8", "replace"), where)
            for addr, code, resp in addresses
        }

    @staticmethod
    def _failed(failure: Any, recipients: list[str], where: str) -> dict[str, Outcome]:
        err = failure.value
        addresses: Any = getattr(err, "addresses", None)
        code = getattr(err, "code", 0)
        connected = isinstance(err, SMTPDeliveryError) and bool(addresses)
        if not isinstance(code, int) or not 400 <= code < 600 or not connected:
            # Failing before the recipients were even tried (connection, TLS, AUTH) says
            # nothing about the message: always worth another try, maybe at another host.
            code = 451
        resp = getattr(err, "resp", b"")
        text = resp.decode("utf-8", "replace") if isinstance(resp, bytes) and resp else str(err)
        outcome = Outcome(code, text or type(err).__name__, where, connected)
        outcomes = dict.fromkeys(recipients, outcome)
        if connected:
            # Recipients refused at RCPT keep their own reply; the others share the
            # transaction's final reply (a refusal at end of DATA).
            for addr, rcpt_code, rcpt_resp in addresses:
                if not 200 <= rcpt_code < 300:
                    text = rcpt_resp.decode("utf-8", "replace")
                    outcomes[_addr(addr)] = Outcome(rcpt_code, text, where)
        return outcomes
