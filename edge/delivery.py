"""Delivery of spooled messages to their targets, with retries on a schedule.

`DeliveryQueue` owns the in-memory schedule of the spool's messages: it resolves each
pending recipient through the store, groups recipients by target, hands each group to a
`Deliverer` and records final outcomes in the spool. Temporary failures are retried on the
configured schedule; time comes from the injected clock. It never deletes a message whose
recipients are not all finished, and it never blocks the reactor: spool and store calls go
through `run_blocking` (a thread pool by default).
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from twisted.internet import defer, threads
from twisted.internet.interfaces import IDelayedCall, IReactorTCP, IReactorTime
from twisted.logger import Logger
from twisted.mail.smtp import ESMTPSender, ESMTPSenderFactory, SMTPDeliveryError

from edge.config import parse_listen
from edge.spool import QUEUE_ID_HEADER, Envelope, Spool
from edge.store import RecipientTarget

log = Logger()


@dataclass(frozen=True)
class Outcome:
    """What happened to one recipient in one attempt."""

    code: int
    text: str

    @property
    def final(self) -> bool:
        return self.code < 400 or self.code >= 500

    @property
    def delivered(self) -> bool:
        return 200 <= self.code < 300


class Deliverer(Protocol):
    def deliver(
        self, target: RecipientTarget, sender: str, recipients: list[str], data: bytes
    ) -> defer.Deferred[dict[str, Outcome]]: ...


_DOT_AT_LINE_START = re.compile(rb"^\.", re.MULTILINE)


class ExactDataSender(ESMTPSender):
    """Twisted's ESMTP sender, sending message data exactly as given.

    Twisted's own `transformChunk` rewrites LF to CRLF and dot-stuffs chunk by chunk, so a
    line starting with "." right after a chunk boundary went out unstuffed and ended DATA
    early (the rest ran as commands: a smuggled message). Spooled data is CRLF-only (bare
    CR/LF are refused at DATA) and is dot-stuffed whole before it is handed over.
    """

    def transformChunk(self, chunk: bytes) -> bytes:
        self.resetTimeout()
        return chunk


class ConnectorDeliverer:
    """Delivers to a device's connector over SMTP, authenticating with the device's secret."""

    def __init__(self, reactor: Any, hostname: str, timeout: float = 60.0) -> None:
        self.reactor = reactor
        self.hostname = hostname
        self.timeout = timeout

    def deliver(
        self, target: RecipientTarget, sender: str, recipients: list[str], data: bytes
    ) -> defer.Deferred[dict[str, Outcome]]:
        host, port = parse_listen(target.connector_smtp_addr)
        result: defer.Deferred[Any] = defer.Deferred()
        factory = ESMTPSenderFactory(
            (target.connector_username or "").encode(),
            (target.connector_secret or "").encode(),
            sender,
            recipients,
            io.BytesIO(_DOT_AT_LINE_START.sub(b"..", data)),
            result,
            retries=0,
            timeout=self.timeout,
            requireAuthentication=True,
            requireTransportSecurity=False,
            hostname=self.hostname,
        )
        factory.domain = self.hostname.encode()
        tcp: IReactorTCP = self.reactor
        factory.protocol = ExactDataSender
        tcp.connectTCP(host, port, factory, timeout=self.timeout)
        return result.addCallbacks(self._accepted, self._failed, errbackArgs=(recipients,))

    @staticmethod
    def _accepted(result: tuple[int, list[tuple[bytes, int, bytes]]]) -> dict[str, Outcome]:
        _num_ok, addresses = result
        return {
            _addr(addr): Outcome(code, resp.decode("utf-8", "replace"))
            for addr, code, resp in addresses
        }

    @staticmethod
    def _failed(failure: Any, recipients: list[str]) -> dict[str, Outcome]:
        err = failure.value
        addresses: Any = getattr(err, "addresses", None)
        code = getattr(err, "code", 0)
        if not isinstance(code, int) or not 400 <= code < 600 or not addresses:
            # Failing before the recipients were even tried (connection, TLS, AUTH) says
            # nothing about the message: always worth another try.
            code = 451
        resp = getattr(err, "resp", b"")
        text = resp.decode("utf-8", "replace") if isinstance(resp, bytes) and resp else str(err)
        outcomes = dict.fromkeys(recipients, Outcome(code, text or type(err).__name__))
        if isinstance(err, SMTPDeliveryError) and addresses:
            # Recipients refused at RCPT keep their own reply; the others share the
            # transaction's final reply (a refusal at end of DATA).
            for addr, rcpt_code, rcpt_resp in addresses:
                if not 200 <= rcpt_code < 300:
                    outcomes[_addr(addr)] = Outcome(rcpt_code, rcpt_resp.decode("utf-8", "replace"))
        return outcomes


def _addr(value: bytes | str) -> str:
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
    return text.strip("<>")


def _run_in_thread(fn: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
    return threads.deferToThread(fn, *args)


class DeliveryQueue:
    def __init__(
        self,
        spool: Spool,
        resolve: Callable[[str], RecipientTarget | None],
        deliverer: Deliverer,
        clock: IReactorTime,
        retry_schedule: list[float],
        run_blocking: Callable[..., defer.Deferred[Any]] = _run_in_thread,
    ) -> None:
        self.spool = spool
        self.resolve = resolve
        self.deliverer = deliverer
        self.clock = clock
        self.retry_schedule = retry_schedule
        self.run_blocking = run_blocking
        self.envelopes: dict[str, Envelope] = {}
        self.attempts: dict[str, int] = {}
        self._timers: dict[str, IDelayedCall] = {}
        self._running: set[str] = set()
        self._stopped = False

    def start(self) -> defer.Deferred[None]:
        """Load the spool and schedule everything in it for an attempt now."""
        d = self.run_blocking(self.spool.load)

        def loaded(envelopes: list[Envelope]) -> None:
            for env in envelopes:
                self.enqueue(env)
            if envelopes:
                log.info("queue: {n} message(s) recovered from the spool", n=len(envelopes))

        return d.addCallback(loaded)

    def stop(self) -> None:
        self._stopped = True
        for timer in self._timers.values():
            if timer.active():
                timer.cancel()
        self._timers.clear()

    def enqueue(self, envelope: Envelope, delay: float = 0.0) -> None:
        self.envelopes[envelope.qid] = envelope
        self._schedule(envelope.qid, delay)

    def _schedule(self, qid: str, delay: float) -> None:
        if self._stopped:
            return
        timer = self._timers.get(qid)
        if timer is not None and timer.active():
            timer.cancel()
        self._timers[qid] = self.clock.callLater(delay, self._kick, qid)

    def _kick(self, qid: str) -> None:
        self._timers.pop(qid, None)
        if qid in self._running:
            return
        self._running.add(qid)
        d = defer.ensureDeferred(self._attempt(qid))
        d.addErrback(self._attempt_failed, qid)
        d.addBoth(lambda _: self._running.discard(qid))

    def _attempt_failed(self, failure: Any, qid: str) -> None:
        """A fault of ours (store, disk) during an attempt: log it and try again later."""
        log.failure("queue: attempt for {qid} failed", failure, qid=qid)
        if qid in self.envelopes:
            self._retry_later(qid)

    def _retry_later(self, qid: str) -> None:
        n = self.attempts.get(qid, 0)
        self.attempts[qid] = n + 1
        self._schedule(qid, self.retry_schedule[min(n, len(self.retry_schedule) - 1)])

    async def _attempt(self, qid: str) -> None:
        env = self.envelopes[qid]
        done: set[str] = await self.run_blocking(self.spool.finished, qid)
        pending = [r for r in env.recipients if r not in done]
        groups: dict[tuple[str, str | None], tuple[RecipientTarget, list[str]]] = {}
        finals: dict[str, str] = {}
        for rcpt in pending:
            target = await self.run_blocking(self.resolve, rcpt)
            if target is None or target.kind != "device":
                finals[rcpt] = "bounced: 550 5.1.1 no route to this address any more"
                continue
            key = (target.connector_smtp_addr, target.device_id)
            groups.setdefault(key, (target, []))[1].append(rcpt)
        retry = False
        if groups:
            raw = await self.run_blocking(self.spool.read, qid)
            data = QUEUE_ID_HEADER + b": " + qid.encode() + b"\r\n" + raw
        for target, rcpts in groups.values():
            try:
                outcomes = await self.deliverer.deliver(target, env.sender, rcpts, data)
            except Exception as exc:  # a bad target must not stop the queue
                log.failure("queue: delivering {qid} failed", qid=qid)
                outcomes = dict.fromkeys(rcpts, Outcome(451, f"delivery failed: {exc}"))
            for rcpt in rcpts:
                outcome = outcomes.get(rcpt, Outcome(451, "no reply for this recipient"))
                if outcome.delivered:
                    finals[rcpt] = "delivered"
                elif outcome.final:
                    finals[rcpt] = f"bounced: {outcome.code} {outcome.text}"
                else:
                    retry = True
                    log.info(
                        "queue: {qid} to {rcpt} deferred: {code} {text}",
                        qid=qid,
                        rcpt=rcpt,
                        code=outcome.code,
                        text=outcome.text,
                    )
        if finals:
            await self.run_blocking(self.spool.mark_finished, qid, finals)
            for rcpt, final in finals.items():
                log.info("queue: {qid} to {rcpt}: {final}", qid=qid, rcpt=rcpt, final=final)
        if retry:
            self._retry_later(qid)
            return
        await self.run_blocking(self.spool.remove, qid)
        self.envelopes.pop(qid, None)
        self.attempts.pop(qid, None)
