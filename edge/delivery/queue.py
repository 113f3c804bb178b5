"""The delivery queue: every spooled message to its targets, retried, bounced or expired.

`DeliveryQueue` owns the schedule of the spool's messages. For each attempt it finds each
pending recipient's target (`edge.delivery.routing.Router`: a device, a route's old MX, an MX),
groups recipients by target, hands each group to the deliverer, and records final outcomes
in the spool. Temporary failures are retried on the configured schedule until the
message's lifetime runs out; permanent failures and expiry bounce with an RFC 3464 DSN to
the sender (never to `<>`, never for spam), and a "delayed" DSN goes out once after the
configured delay. One recipient's failure never holds back another's. Time comes from the
injected clock; spool, store and DNS calls go through `run_blocking`, never the reactor.
It never forgets a message while one of its recipients is unfinished.

A target's mail goes in arrival order only while the target cannot be reached (the
connection failed, timed out or was lost before the transaction, or the host closed it
with 421): then younger messages wait behind the oldest, and all go, oldest first, once
one gets through. A message refused for its own reasons (a 4xx at MAIL, RCPT or DATA)
is retried on its own schedule and holds back nothing.

One message's failure never holds back another. An exception while delivering a message
that is not a network or infrastructure fault (store, disk, DNS: retried on the schedule)
is a defect of ours: it is logged with its traceback and the message is held, with the
reason (`queue list`, `queue show`), for an operator to release once it is fixed; the next
message goes. A permanent refusal bounces (DSN), as always.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable
from typing import Any

from twisted.internet import defer, threads
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from edge.delivery.attempts import (
    Deliverer,
    MessageState,
    defect_reason,
    dsn_of,
    is_passing_fault,
    recipient_status,
)
from edge.delivery.dsn import RecipientStatus, build_dsn, dsn_allowed
from edge.delivery.outcomes import Outcome
from edge.delivery.routing import NoRoute, Target
from edge.dns.resolver import DNSTemporaryError
from edge.runtime import nowlater
from edge.runtime.logthrottle import Quieter
from edge.smtp import replies
from edge.spool.spool import QUEUE_ID_HEADER, Envelope, Spool

log = Logger()

Routes = dict[str, nowlater.NowOrLater[Target] | Exception]  # by recipient; or what it raised

DEFAULT_LIFETIME = 5 * 86400.0
DEFAULT_DELAY_WARNING = 4 * 3600.0
INTAKE_WAIT = 0.01
"""Seconds at most between the MX's hand-over of a message and its first attempt."""


def _run_in_thread(fn: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
    return threads.deferToThread(fn, *args)


class DeliveryQueue:
    def __init__(
        self,
        spool: Spool,
        route: Callable[[str, str], Target],
        deliverer: Deliverer,
        clock: IReactorTime,
        retry_schedule: list[float],
        *,
        lifetime: float = DEFAULT_LIFETIME,
        delay_warning: float = DEFAULT_DELAY_WARNING,
        hostname: str = "localhost",
        run_blocking: Callable[..., defer.Deferred[Any]] = _run_in_thread,
        on_event: Callable[[str, str, str, str], None] | None = None,
        route_soon: Callable[[str, str], nowlater.NowOrLater[Target]] | None = None,
    ) -> None:
        """`route` is blocking (it may query the store and DNS); `route_soon`, when given,
        answers the same at once when its caches can (a Target, or NoRoute raised), and as a
        Deferred otherwise."""
        self.spool = spool
        self.route = route
        self.route_soon = route_soon or (lambda rcpt, kind: run_blocking(route, rcpt, kind))
        self.deliverer = deliverer
        self.clock = clock
        self.retry_schedule = retry_schedule
        self.lifetime = lifetime
        self.delay_warning = delay_warning
        self.hostname = hostname
        self.run_blocking = run_blocking
        self.on_event = on_event
        self.quiet = Quieter(log, clock)
        self.envelopes: dict[str, Envelope] = {}
        self.states: dict[str, MessageState] = {}
        # When each message is due for its next attempt: a heap of (time, sequence, qid),
        # with the live entry of each qid in `_due_at` (others are dropped when they come
        # up), and one reactor timer for the earliest. One DelayedCall per message in the
        # reactor's own heap (ordered by Python comparisons) costs far more.
        self._due: list[tuple[float, int, str]] = []
        self._due_at: dict[str, tuple[float, int]] = {}
        self._sequence = itertools.count()
        self._alarm: IDelayedCall | None = None
        self._alarm_at = 0.0
        self._running: set[str] = set()
        self._flushing: set[str] = set()
        # Per target key: the messages waiting for it, and a heap of (arrival, qid) whose
        # stale entries (no longer waiting) are dropped when they reach the top.
        self._waiting: dict[str, set[str]] = {}
        self._oldest: dict[str, list[tuple[float, str]]] = {}
        self._fresh: list[Envelope] = []
        self._intake_timer: IDelayedCall | None = None
        self._stopped = False

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> defer.Deferred[None]:
        """Load the spool and schedule everything in it for an attempt now."""
        d = self.run_blocking(self.spool.load)

        def loaded(envelopes: list[Envelope]) -> None:
            for env in envelopes:
                self.envelopes[env.qid] = env
                self.states[env.qid] = MessageState()
                if not self.spool.entry(env.qid).held:
                    self.schedule(env.qid, 0.0)
            if envelopes:
                log.info("queue: {n} message(s) recovered from the spool", n=len(envelopes))

        return d.addCallback(loaded)

    def stop(self) -> None:
        self._stopped = True
        if self._alarm is not None and self._alarm.active():
            self._alarm.cancel()
        self._alarm = None
        if self._intake_timer is not None:
            self._intake_timer.cancel()
            self._intake_timer = None
        self._due.clear()
        self._due_at.clear()

    def enqueue(self, envelope: Envelope, delay: float = 0.0) -> None:
        """A message just committed to the spool: deliver it."""
        self._register(envelope)
        self.schedule(envelope.qid, delay)

    def take(self, envelope: Envelope) -> None:
        """A message the MX has just committed and is answering. It joins the queue with
        every other message taken meanwhile, and gets its first attempt there and then
        (no trip through the retry heap), either when `intake` is called (the MX calls it
        while the disk syncs its next batch, time the reactor would spend waiting) or at
        the latest `INTAKE_WAIT` seconds later. So none of this work delays a client: not
        the 250 being answered, nor the next command. A message taken but not yet queued
        when the edge stops is in the spool, and the next start queues it."""
        self._fresh.append(envelope)
        if self._intake_timer is None:
            self._intake_timer = self.clock.callLater(INTAKE_WAIT, self._take_fresh)

    def intake(self) -> None:
        """Queue (and attempt) every message taken so far, now."""
        if self._intake_timer is not None:
            self._intake_timer.cancel()
            self._take_fresh()

    def _take_fresh(self) -> None:
        self._intake_timer = None
        fresh, self._fresh = self._fresh, []
        for envelope in fresh:
            self._register(envelope)
        if self._stopped:
            return
        for envelope in fresh:
            self._kick(envelope.qid)

    def _register(self, envelope: Envelope) -> None:
        self.envelopes[envelope.qid] = envelope
        self._state(envelope.qid)
        for rcpt in envelope.recipients:
            self.record_event(envelope.qid, rcpt, "accepted", "")

    async def submit(self, sender: str, recipients: list[str], data: bytes, kind: str) -> Envelope:
        """Queue a message made here (a DSN, or a device's outbound mail)."""
        writer = self.spool.writer()
        writer.write(data)
        env = Envelope(writer.qid, sender, recipients, self.clock.seconds(), kind=kind)
        await self.run_blocking(self.spool.commit, writer, env)
        self.enqueue(env)
        return env

    # -- scheduling --------------------------------------------------------------------------

    def schedule(self, qid: str, delay: float) -> None:
        if self._stopped:
            return
        now = self.clock.seconds()
        entry = (now + max(delay, 0.0), next(self._sequence))
        self._due_at[qid] = entry
        heapq.heappush(self._due, (*entry, qid))
        self._state(qid).next_attempt = now + delay
        self._arm()

    def _arm(self) -> None:
        """Set the one timer for the earliest message due (stale entries dropped first)."""
        due, due_at = self._due, self._due_at
        while due and due_at.get(due[0][2]) != due[0][:2]:
            heapq.heappop(due)
        alarm = self._alarm
        armed = alarm is not None and alarm.active()
        if not due:
            if armed:
                alarm.cancel()  # type: ignore[union-attr]
            return
        at = due[0][0]
        if armed and self._alarm_at <= at:
            return
        if armed:
            alarm.cancel()  # type: ignore[union-attr]
        self._alarm_at = at
        self._alarm = self.clock.callLater(max(at - self.clock.seconds(), 0.0), self._ring)

    def _ring(self) -> None:
        """Attempt every message that is due now, earliest first."""
        self._alarm = None
        now = self.clock.seconds()
        due, due_at = self._due, self._due_at
        ready = []
        while due and due[0][0] <= now:
            at, seq, qid = heapq.heappop(due)
            if due_at.get(qid) == (at, seq):
                del due_at[qid]
                ready.append(qid)
        for qid in ready:
            self._kick(qid)
        self._arm()

    def is_running(self, qid: str) -> bool:
        return qid in self._running

    def unschedule(self, qid: str) -> None:
        self._due_at.pop(qid, None)  # its heap entry is dropped when it comes up
        if qid in self.states:
            self.states[qid].next_attempt = None

    def _kick(self, qid: str) -> None:
        self._due_at.pop(qid, None)
        if qid in self._running or qid not in self.envelopes:
            return
        routes = self._deferred_at_once(qid)
        if routes is None:
            return
        self._running.add(qid)
        d = defer.ensureDeferred(self._attempt(qid, routes=routes))
        d.addErrback(self._attempt_failed, qid)
        d.addBoth(lambda _: self._running.discard(qid))

    def _attempt_failed(self, failure: Failure, qid: str) -> None:
        """An attempt raised. A passing fault of ours (store, disk): log it and try again
        later. Anything else is a defect: the message is held with the reason."""
        log.failure("queue: attempt for {qid} failed", failure, qid=qid)
        if qid not in self.envelopes:
            return
        exc = failure.value
        if exc is None or is_passing_fault(exc):
            self._retry_later(qid)
            return
        d = defer.ensureDeferred(self._hold(qid, defect_reason(exc)))
        d.addErrback(self._hold_failed, qid)

    def _hold_failed(self, failure: Failure, qid: str) -> None:
        log.failure("queue: holding {qid} failed; it is tried again later", failure, qid=qid)
        if qid in self.envelopes:
            self._retry_later(qid)

    async def _hold(self, qid: str, reason: str, rcpts: list[str] | None = None) -> None:
        """Hold `qid` (recording why) after a defect; what waited behind it goes on."""
        self.unschedule(qid)
        state = self._state(qid)
        keys = set(state.waiting_on)
        self._stop_waiting(qid)
        if qid not in self.envelopes:
            return
        entry = self.spool.entry(qid)
        if not entry.pending:  # nothing left to deliver: done with it
            await self.run_blocking(self.spool.remove, qid)
            self.forget(qid)
            return
        await self.run_blocking(self.spool.set_held, qid, True, reason)
        # The reason, with the defect's detail, is for the operator (`queue show`); what a
        # sender may see in a report later, and the recipient's events, say only this.
        reply = replies.D451_HELD.status
        for rcpt in rcpts if rcpts is not None else entry.pending:
            state.last_errors[rcpt] = reply
            state.last_shown.pop(rcpt, None)
            self.record_event(qid, rcpt, "deferred", reply)
        log.warn("queue: {qid} held: {reason}", qid=qid, reason=reason)
        for key in keys:
            self._flush_soon(key)

    def _retry_later(self, qid: str) -> None:
        state = self._state(qid)
        n = state.attempts
        state.attempts = n + 1
        delay = self.retry_schedule[min(n, len(self.retry_schedule) - 1)]
        env = self.envelopes[qid]
        until_expiry = env.received_at + self.lifetime - self.clock.seconds()
        self.schedule(qid, min(delay, max(until_expiry, 0.0)))

    def _state(self, qid: str) -> MessageState:
        state = self.states.get(qid)
        if state is None:
            state = self.states[qid] = MessageState()
        return state

    def record_event(self, qid: str, rcpt: str, event: str, detail: str) -> None:
        if self.on_event is not None:
            try:
                self.on_event(qid, rcpt, event, detail)
            except Exception:
                log.failure("queue: recording the {event} event failed", event=event)

    # -- one attempt -------------------------------------------------------------------------

    def _deferred_at_once(self, qid: str) -> Routes | None:
        """An attempt decided without waiting: when every pending recipient's route is known
        at once to be unusable for now (a device that is offline, say) and no report is due,
        the message is deferred here as `_attempt` would defer it, without a coroutine (the
        common case for a device away from its edge), and the answer is None. Otherwise
        nothing is done, and the answer is the routes asked for so far, for `_attempt` to
        use (each a Target, a Deferred of one, or what routing raised): nothing is routed
        twice."""
        routes: Routes = {}
        env = self.envelopes[qid]
        entry = self.spool.entry(qid)
        age = self.clock.seconds() - env.received_at
        if entry.held or age >= min(self.delay_warning, self.lifetime):
            return routes
        temporary: dict[str, RecipientStatus] = {}
        for rcpt in entry.pending:
            try:
                routes[rcpt] = nowlater.now(self.route_soon(rcpt, env.kind))
            except Exception as exc:
                # A NoRoute is kept as a copy without traceback or cause: those hold the
                # frames up this stack, this one with `routes` among them, and the cycle
                # would wait for the cyclic collector (once per message to an absent device).
                routes[rcpt] = NoRoute(exc.named) if isinstance(exc, NoRoute) else exc
                if isinstance(exc, NoRoute) and exc.temporary:
                    temporary[rcpt] = RecipientStatus(rcpt, exc.reply)
                    continue
            return routes
        if not temporary:
            return routes
        state = self._state(qid)
        state.next_attempt = None
        self._stop_waiting(qid)
        self._deferred(qid, state, temporary)
        self._retry_later(qid)
        return None

    def _deferred(
        self, qid: str, state: MessageState, temporary: dict[str, RecipientStatus]
    ) -> None:
        state.last_errors.update({r: s.reply for r, s in temporary.items()})
        state.last_shown.update({r: s.shown for r, s in temporary.items()})
        for rcpt, status in temporary.items():
            self.record_event(qid, rcpt, "deferred", status.reply)
            self.quiet.say(
                f"queue: deferred: {status.reply}",
                "queue: {qid} to {rcpt} deferred: {r}",
                qid=qid,
                rcpt=rcpt,
                r=status.reply,
            )

    async def _attempt(
        self, qid: str, in_order: bool = False, routes: Routes | None = None
    ) -> None:
        """One delivery attempt; `routes` are routes already asked for (`_deferred_at_once`)."""
        routes = routes or {}
        env = self.envelopes[qid]
        entry = self.spool.entry(qid)
        if entry.held:
            return
        state = self._state(qid)
        state.next_attempt = None
        self._stop_waiting(qid)
        finals: dict[str, str] = {}
        failed: list[RecipientStatus] = []
        temporary: dict[str, RecipientStatus] = {}
        groups: dict[str, tuple[Target, list[str]]] = {}
        for rcpt in entry.pending:
            try:
                routed = routes.pop(rcpt) if rcpt in routes else self.route_soon(rcpt, env.kind)
                if isinstance(routed, BaseException):
                    raise routed
                target = await routed if nowlater.is_deferred(routed) else routed
            except NoRoute as exc:
                status = RecipientStatus(rcpt, exc.reply)
                (temporary.__setitem__(rcpt, status) if exc.temporary else failed.append(status))
                continue
            except DNSTemporaryError as exc:
                # The resolver's own words (its servers, its timeouts) go to the log only.
                log.info(
                    "queue: {qid} to {rcpt}: DNS lookup failed: {e}", qid=qid, rcpt=rcpt, e=exc
                )
                temporary[rcpt] = RecipientStatus(rcpt, replies.D451_DNS_FAILED.status)
                continue
            if target.device_id:
                state.devices[rcpt] = target.device_id
            groups.setdefault(target.key, (target, []))[1].append(rcpt)
        raw = await self.run_blocking(self.spool.read, qid) if groups else b""
        postponed: set[str] = set()
        answered: set[str] = set()  # targets that answered (or failed us by a defect)
        defect = ""  # the first defect met, if any: the message is held for it
        held: list[str] = []
        for target, rcpts in groups.values():
            if not in_order and self._older_waiting(target.key, qid):
                # Older mail for this target is still waiting: it goes first, this one after.
                for rcpt in rcpts:
                    reply = state.last_errors.get(rcpt, replies.D451_OLDER_FIRST.status)
                    shown = state.last_shown.get(rcpt, "")
                    temporary[rcpt] = RecipientStatus(rcpt, reply, shown=shown)
                self._wait(qid, target.key)
                postponed.add(target.key)
                continue
            data = raw
            if target.kind == "device":
                data = QUEUE_ID_HEADER + b": " + qid.encode() + b"\r\n" + raw
            try:
                outcomes: dict[str, Outcome] = await self.deliverer.deliver(
                    target, env.sender, rcpts, data, smtputf8=env.smtputf8, **dsn_of(env, target)
                )
            except Exception as exc:  # one message's failure must not stop the queue
                log.failure("queue: delivering {qid} failed", qid=qid)
                if not is_passing_fault(exc):
                    defect = defect or defect_reason(exc)
                    held.extend(rcpts)
                    answered.add(target.key)
                    continue
                # The detail (an exception's text: paths, addresses) is in the log above;
                # the reply, which the sender may read in a report, names the fault only.
                fault = Outcome(451, replies.D451_PASSING_FAULT.detail, connected=False)
                outcomes = dict.fromkeys(rcpts, fault)
            if any(o.connected for o in outcomes.values()):
                answered.add(target.key)  # reachable: what waits for it may go
            for rcpt in rcpts:
                outcome = outcomes.get(rcpt, Outcome(451, replies.D451_NO_REPLY.detail))
                status = recipient_status(rcpt, outcome, target)
                if outcome.delivered:
                    finals[rcpt] = "delivered"
                    self.record_event(qid, rcpt, "delivered", status.reply)
                elif outcome.final:
                    failed.append(status)
                else:
                    temporary[rcpt] = status
                    if not outcome.connected:
                        # Not reachable: younger mail for it waits behind this one.
                        self._wait(qid, target.key)
        for status in failed:
            finals[status.recipient] = f"bounced: {status.reply}"
            self.record_event(qid, status.recipient, "bounced", status.reply)
        for key in answered:
            self._flush_soon(key, skip=qid)
        now = self.clock.seconds()
        # Held for a defect: nothing of it expires or is tried again before it is released.
        expired = bool(temporary) and not defect and now - env.received_at >= self.lifetime
        if expired:
            for status in temporary.values():
                finals[status.recipient] = f"expired: {status.reply}"
                self.record_event(qid, status.recipient, "expired", status.reply)
                failed.append(status)
            temporary = {}
        if finals:
            await self.run_blocking(self.spool.mark_finished, qid, finals)
            for rcpt, final in finals.items():
                log.info("queue: {qid} to {rcpt}: {final}", qid=qid, rcpt=rcpt, final=final)
        if failed:
            await self.report(env, raw, failed, "failed")
        if defect:
            self._deferred(qid, state, temporary)
            await self._hold(qid, defect, held)
            return
        if temporary:
            self._deferred(qid, state, temporary)
            if not entry.warned and now - env.received_at >= self.delay_warning:
                await self.report(env, raw, list(temporary.values()), "delayed")
                await self.run_blocking(self.spool.set_warned, qid)
            self._retry_later(qid)
            for key in postponed:
                self._flush_soon(key)
            return
        await self.run_blocking(self.spool.remove, qid)
        self.forget(qid)

    def _wait(self, qid: str, key: str) -> None:
        state = self._state(qid)
        if key in state.waiting_on:
            return
        state.waiting_on.add(key)
        self._waiting.setdefault(key, set()).add(qid)
        heapq.heappush(self._oldest.setdefault(key, []), (self.envelopes[qid].received_at, qid))

    def _stop_waiting(self, qid: str) -> None:
        state = self.states.get(qid)
        if state is None:
            return
        for key in state.waiting_on:
            waiting = self._waiting.get(key)
            if waiting is not None:
                waiting.discard(qid)
                if not waiting:
                    del self._waiting[key]
                    self._oldest.pop(key, None)
        state.waiting_on = set()

    def _older_waiting(self, key: str, qid: str) -> bool:
        """Whether a message older than `qid` waits for `key` (amortised O(log n))."""
        heap = self._oldest.get(key, [])
        waiting = self._waiting.get(key, set())
        while heap and heap[0][1] not in waiting:
            heapq.heappop(heap)
        return bool(heap) and heap[0] < (self.envelopes[qid].received_at, qid)

    def _flush_soon(self, key: str, skip: str | None = None) -> None:
        """Deliver what waits for `key`, oldest first, one after another."""
        if key in self._flushing or self._stopped:
            return
        self._flushing.add(key)

        def start() -> None:
            # After the current attempt has finished, so that it can take its turn too.
            d = defer.ensureDeferred(self._flush(key, skip))
            d.addErrback(lambda f: log.failure("queue: flushing {key} failed", f, key=key))
            d.addBoth(lambda _: self._flushing.discard(key))

        self.clock.callLater(0, start)

    async def _flush(self, key: str, skip: str | None) -> None:
        while not self._stopped:
            turn = sorted(
                (self.envelopes[qid].received_at, qid)
                for qid in self._waiting.get(key, ())
                if qid != skip and qid in self.envelopes
            )
            progressed = False
            for _arrival, qid in turn:
                if self._stopped:
                    return
                state = self.states.get(qid)
                if state is None or key not in state.waiting_on or qid in self._running:
                    continue
                if self.spool.entry(qid).held:
                    continue
                self.unschedule(qid)
                self._running.add(qid)
                try:
                    await self._attempt(qid, in_order=True)
                except Exception:
                    self._attempt_failed(Failure(), qid)
                finally:
                    self._running.discard(qid)
                state = self.states.get(qid)
                if state is not None and key in state.waiting_on:
                    return  # still not taking mail: the retry timers carry on
                progressed = True
            if not progressed:
                return  # what is left is held, running or skipped

    async def report(
        self, env: Envelope, raw: bytes, statuses: list[RecipientStatus], action: str
    ) -> None:
        """Send a DSN about `statuses` to the envelope sender, when one is allowed."""
        if not dsn_allowed(env):
            return
        if not raw:
            raw = await self.run_blocking(self.spool.read, env.qid)
        now = self.clock.seconds()
        dsn = build_dsn(
            env,
            statuses,
            raw,
            action=action,
            reporting_mta=self.hostname,
            now=now,
            retry_until=env.received_at + self.lifetime,
        )
        report = await self.submit("", [env.sender], dsn, "dsn")
        log.info("queue: {action} DSN {dsn} for {qid}", action=action, dsn=report.qid, qid=env.qid)

    def forget(self, qid: str) -> None:
        self.unschedule(qid)
        self._stop_waiting(qid)
        self.envelopes.pop(qid, None)
        self.states.pop(qid, None)
