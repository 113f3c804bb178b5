"""The device's durable outbound queue: every submitted message on disk until its edge took it.

`OutboundQueue.submit` (used by the submission listener and the local API) completes the
message as an MSA does (RFC 6409 §8: CRLF line ends, a `Date:` and a `Message-ID:` where
missing), stores its Sent copy (`\\Seen`, in `Sent`; in address-mailbox mode in the sender's
folder's `Sent` below it), then writes the message and its envelope into the queue directory
(`connector.outbound.outbox`: file fsynced, renamed into place, directory fsynced) and
records a `submitted` event; only then does its Deferred fire. The Sent copy comes first: a
crash between the two leaves a Sent copy of a message the client was never told was taken
(it sends again, so Sent may hold it twice), never a queued message without its answer.

Messages are relayed to the edge one at a time, in the order of their ids (which increase
with each submission, across restarts), through a `Relay` (`connector.outbound.relay`).
Per recipient, a 2xx makes it `relayed` with the edge's queue id, a 5xx `bounced` with a
notice to the sender (`connector.outbound.bounce`). No answer at all (the edge unreachable)
stops the whole queue, tried again after a delay that doubles from `retry_initial` to
`retry_max` seconds; a 4xx from the edge (a rate limit of the sender's address, say) stops
only the mail of that sender, with the same growing delay, while other senders' mail goes
on: each sender's mail still goes in its order. A message not relayed `lifetime` seconds (5
days, as the edge's own queue) after its submission bounces at its next failed attempt. After a relay attempt's answer, the
recipients' states are written (fsynced) before anything acts on them: only then is the
message's file removed (once no recipient still waits to be relayed) and the events
recorded. So a crash after the state is on disk never sends the message again: at start,
a message whose recipients all have a state is not relayed, and its file is removed then.

Between the edge committing the message (it sends its 250 only after its spool's fsync)
and this queue's state write being on disk, a crash of the device, or a connection lost
after the end of the data was sent but before the 250 was read, leaves the message queued
as not relayed, and it is relayed again at start or at the next attempt, byte for byte the
same. The edge's relay recognises such a resend (`edge.outbound.resend`: same Message-ID,
envelope and content, within 7 days) and answers with the first queue id without spooling
it again, so the message is delivered once.

Recipients `relayed` (or `deferred`) wait for their outcome; `record_outcome` (called by
`connector.outbound.poller` with what the edge reports) moves them to `delivered`,
`deferred` or `bounced`; a message whose recipients are all final is forgotten (its state
file removed; its events stay in the log). This module never blocks the reactor thread
(disk and Maildir work go through `run_blocking`) and never relays a message twice while
running, nor one whose state says it was relayed.
"""

from __future__ import annotations

import bisect
import email.utils
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from connector.outbound.bounce import bounce_notice, notice_key
from connector.outbound.events import OutboundEvents
from connector.outbound.items import Entry, OutboundItem, Relay, RelayOutcome, RelayResult
from connector.outbound.message import ItemIds, check_path, complete
from connector.outbound.outbox import Outbox, OutboxEnvelope, RecipientState, Stored
from edge.smtp import replies
from maildir import Maildir, MessageInfo, address_folder
from maildir.message import header_summary

__all__ = [
    "DEFAULT_MAX_RECIPIENTS",
    "OutboundItem",
    "OutboundQueue",
    "Relay",
    "RelayOutcome",
    "RelayResult",
    "SENT_FOLDER",
]

log = Logger(namespace="tailpost.outbound")

SENT_FOLDER = "Sent"
DEFAULT_MAX_RECIPIENTS = 100
_NO_REPLY = RelayOutcome(replies.D451_NO_REPLY.code, replies.D451_NO_REPLY.detail)
DEFAULT_LIFETIME = 5 * 86400.0
"""How long a message may wait for its edge before its recipients bounce (as the edge's)."""


class OutboundQueue(Service):
    """The queue on disk, its relay loop, and the outcomes of what it relayed."""

    def __init__(
        self,
        directory: Path,
        maildir: Maildir,
        events: OutboundEvents,
        *,
        clock: IReactorTime,
        run_blocking: Callable[..., Deferred[Any]],
        hostname: str,
        relay: Relay | None = None,
        per_address: bool = False,
        on_stored: Callable[[MessageInfo], None] = lambda _info: None,
        retry_initial: float = 5.0,
        retry_max: float = 300.0,
        max_recipients: int = DEFAULT_MAX_RECIPIENTS,
        lifetime: float = DEFAULT_LIFETIME,
    ) -> None:
        """`on_stored` is told (in the reactor thread) of each Sent copy and notice stored.
        The directory is read here, once: what it holds is relayed when the service starts."""
        self.setName("outbound")
        self.outbox = Outbox(directory)
        self.maildir = maildir
        self.events = events
        self.clock = clock
        self.run = run_blocking
        self.hostname = hostname
        self.relay = relay
        self.per_address = per_address
        self.on_stored = on_stored
        self.retry_initial = retry_initial
        self.retry_max = retry_max
        self.max_recipients = max_recipients
        self.lifetime = lifetime
        self._held: dict[str, tuple[float, int]] = {}  # sender -> (until, refusals)
        self._wake_timer: IDelayedCall | None = None
        self._entries: dict[str, Entry] = {}
        self._queued: list[str] = []  # ids with recipients to relay, in submission order
        self._busy = False
        self._retry: IDelayedCall | None = None
        self._failures = 0
        self._drained: list[Deferred[None]] = []
        self.attempts = 0
        """Relay attempts made (each answered or failed), for tests and metrics."""
        stored, bad = self.outbox.load()
        for name in bad:
            log.error("outbound queue: {name} is unreadable and left alone", name=name)
        last = max((s.envelope.id for s in stored), default="")
        self._ids = ItemIds(clock.seconds, max(last, events.log.last_item_id))
        for item in stored:
            self._restore(item)

    # -- state -------------------------------------------------------------------------

    def _restore(self, item: Stored) -> None:
        entry = Entry(item.envelope, item.states, item.has_data)
        if entry.has_data and not entry.pending:
            # Relayed (its state is on disk) but its file was not removed yet: removed now,
            # never sent again.
            self.outbox.remove(entry.envelope.id, ".msg")
            entry.has_data = False
        if not entry.pending and not entry.awaiting:
            self.outbox.remove(entry.envelope.id, ".state")
            return
        self._entries[entry.envelope.id] = entry
        if entry.pending:
            self._queued.append(entry.envelope.id)

    @property
    def queued(self) -> list[str]:
        """The ids still to be relayed, in the order they go."""
        return list(self._queued)

    @property
    def relaying(self) -> bool:
        """Whether a relay attempt is under way (its outcome not yet written)."""
        return self._busy

    def awaiting(self) -> dict[str, list[tuple[str, str]]]:
        """The edge's queue ids of relayed messages with recipients whose outcome is not known
        yet: queue id -> (message id, recipient) pairs."""
        out: dict[str, list[tuple[str, str]]] = {}
        for entry in self._entries.values():
            for rcpt in entry.awaiting:
                qid = entry.states[rcpt].queue_id
                if qid:
                    out.setdefault(qid, []).append((entry.envelope.id, rcpt))
        return out

    def when_drained(self) -> Deferred[None]:
        """Fires once nothing is left to relay (at once when nothing is)."""
        if not self._queued:
            return defer.succeed(None)
        d: Deferred[None] = Deferred()
        self._drained.append(d)
        return d

    # -- submission ----------------------------------------------------------------------

    def submit(
        self,
        sender: str,
        recipients: list[str],
        data: bytes,
        *,
        source: str,
        subject: str = "",
        message_id: str = "",
    ) -> Deferred[OutboundItem]:
        """Queue one message; fires once it (and its envelope) is on disk, with its Sent copy
        stored and its `submitted` event recorded. A bad argument fails with ValueError."""
        try:
            check_path(sender, "sender")
            if not recipients or not isinstance(recipients, list):
                raise ValueError("a message needs at least one recipient")
            if len(recipients) > self.max_recipients:
                raise ValueError(f"more than {self.max_recipients} recipients")
            rcpts = list(dict.fromkeys(check_path(r, "recipient") for r in recipients))
            if not isinstance(data, bytes) or not data.strip():
                raise ValueError("the message is empty")
            if any(c in message_id for c in "\r\n\0"):
                raise ValueError("the Message-ID must be one line")
        except ValueError:
            return defer.fail()
        item_id = self._ids.new()
        now = self.clock.seconds()
        wanted_id = message_id or f"<{item_id.lower()}@{self.hostname}>"
        envelope = OutboxEnvelope(item_id, sender, rcpts, source, wanted_id, subject, now)
        date = email.utils.formatdate(now, localtime=True)
        d = self.run(self._store, envelope, data, date)
        d.addCallback(self._submitted)
        return d

    def _sent_folder(self, sender: str) -> str:
        if not self.per_address:
            return SENT_FOLDER
        try:
            return f"{address_folder(sender)}.{SENT_FOLDER}"
        except ValueError:
            return SENT_FOLDER

    def _notice_folder(self, sender: str) -> str:
        if not self.per_address:
            return "INBOX"
        try:
            return address_folder(sender)
        except ValueError:
            return "INBOX"

    def _store(
        self, envelope: OutboxEnvelope, data: bytes, date: str
    ) -> tuple[OutboxEnvelope, MessageInfo]:
        """In a worker thread: the Sent copy, then the queue file, then the event."""
        data, envelope.message_id = complete(data, envelope.message_id, date)
        if not envelope.subject:
            envelope.subject = header_summary(data).subject
        folder = self._sent_folder(envelope.sender)
        self.maildir.ensure_folder(folder)
        sent = self.maildir.deliver(data, folder, flags=["\\Seen"])
        try:
            self.outbox.write_message(envelope, data)
        except BaseException:
            self.maildir.folder(folder).remove(sent.id)  # not queued: no Sent copy either
            raise
        try:
            self.events.log.append(status="submitted", **self._facts(envelope))
        except Exception:  # the message is queued: failing now would have it sent twice
            log.failure("outbound {id}: recording its event failed", id=envelope.id)
        return envelope, sent

    @staticmethod
    def _facts(envelope: OutboxEnvelope) -> dict[str, Any]:
        return {
            "proxy_message_id": envelope.id,
            "internet_message_id": envelope.message_id,
            "subject": envelope.subject,
            "sender": envelope.sender,
            "recipients": list(envelope.recipients),
        }

    def _submitted(self, stored: tuple[OutboxEnvelope, MessageInfo]) -> OutboundItem:
        envelope, sent = stored
        self._entries[envelope.id] = Entry(envelope)
        bisect.insort(self._queued, envelope.id)
        self.events.wake()
        self._tell_stored(sent)
        self._pump()
        return OutboundItem(
            envelope.id,
            envelope.message_id,
            "submitted",
            envelope.sender,
            list(envelope.recipients),
            envelope.subject,
            envelope.source,
        )

    def _tell_stored(self, info: MessageInfo) -> None:
        try:
            self.on_stored(info)
        except Exception:
            log.failure("outbound: telling of a stored message failed")

    # -- relay loop ----------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._pump()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        for timer in (self._retry, self._wake_timer):
            if timer is not None and timer.active():
                timer.cancel()
        self._retry = self._wake_timer = None
        if self.relay is not None:
            return self.relay.close()
        return defer.succeed(None)

    def _pump(self) -> None:
        """Relay the head of the queue unless an attempt runs or waits for its retry."""
        if not self.running or self._busy or self._retry is not None or self.relay is None:
            return
        if not self._queued:
            drained, self._drained = self._drained, []
            for waiter in drained:
                waiter.callback(None)
            return
        now = self.clock.seconds()
        entry = next(
            (e for e in map(self._entries.__getitem__, self._queued) if self._until(e) <= now),
            None,
        )
        if entry is None:  # every sender waits after a refusal: wake for the first
            self._wake_at(min(self._until(self._entries[i]) for i in self._queued))
            return
        self._busy = True
        d = self.run(self.outbox.read_data, entry.envelope.id)
        d.addCallback(self._send, entry)
        d.addCallback(self._answered, entry)
        d.addErrback(self._attempt_failed, entry)
        d.addBoth(self._attempt_done, entry)

    def _until(self, entry: Entry) -> float:
        """When the edge may be asked again for mail of this entry's sender."""
        return self._held.get(entry.envelope.sender.lower(), (0.0, 0))[0]

    def _wake_at(self, when: float) -> None:
        timer = self._wake_timer
        if timer is not None and timer.active():
            if timer.getTime() <= when:
                return
            timer.cancel()
        self._wake_timer = self.clock.callLater(max(0.0, when - self.clock.seconds()), self._woken)

    def _woken(self) -> None:
        self._wake_timer = None
        self._pump()

    def _delay(self, failures: int) -> float:
        return min(self.retry_max, self.retry_initial * 2 ** min(failures, 30))

    def _send(self, data: bytes, entry: Entry) -> Deferred[Any]:
        assert self.relay is not None
        pending = entry.pending
        sending = self.relay.send(entry.envelope.sender, pending, data)
        return sending.addCallback(lambda result: (result, pending, data))

    def _answered(self, answer: tuple[RelayResult, list[str], bytes], entry: Entry) -> Any:
        result, pending, data = answer
        self.attempts += 1
        expired = self.clock.seconds() - entry.envelope.submitted_at >= self.lifetime
        new: dict[str, RecipientState] = {}
        later: list[str] = []
        for rcpt in pending:
            outcome = result.outcomes.get(rcpt) or _NO_REPLY
            if 200 <= outcome.code < 300:
                new[rcpt] = RecipientState("relayed", result.queue_id)
            elif outcome.code >= 500:
                new[rcpt] = RecipientState("bounced", "", f"{outcome.code} {outcome.text}")
            elif expired:
                days, hours = self.lifetime / 86400, self.lifetime / 3600
                span = f"{days:g} days" if days == int(days) else f"{hours:g} hours"
                last = f"{outcome.code} {outcome.text}"
                reply = replies.D554_NOT_RELAYED.format(span=span, last=last)
                new[rcpt] = RecipientState("bounced", "", reply.status)
            else:
                later.append(f"{rcpt}: {outcome.code} {outcome.text}")
        if later:
            log.info(
                "outbound {id}: the edge did not take it yet ({why})",
                id=entry.envelope.id,
                why="; ".join(later),
            )
        verdict = "down" if later and not result.connected else "held" if later else "done"
        if not new:
            return verdict
        states = {**entry.states, **new}
        d = self.run(self._settle, entry.envelope, states, new, data, result.where)
        d.addCallback(self._settled, entry, states, new)
        return d.addCallback(lambda _: verdict)

    def _settle(
        self,
        envelope: OutboxEnvelope,
        states: dict[str, RecipientState],
        new: dict[str, RecipientState],
        data: bytes,
        where: str,
    ) -> MessageInfo | None:
        """In a worker thread: the notice of refused recipients (stored once, whatever
        happens next), the states (durably), then the file once nothing is left to relay."""
        notice = None
        refused = {r: s.detail for r, s in new.items() if s.status == "bounced"}
        if refused:
            body = bounce_notice(
                envelope.id,
                envelope.sender,
                refused,
                data,
                submitted_at=envelope.submitted_at,
                now=self.clock.seconds(),
                hostname=self.hostname,
                relay=where,
            )
            folder = self._notice_folder(envelope.sender)
            self.maildir.ensure_folder(folder)
            notice = self.maildir.deliver(
                body, folder, dedup_key=notice_key(envelope.id, list(refused))
            )
        self.outbox.write_state(envelope, states)
        if all(r in states for r in envelope.recipients):
            self.outbox.remove(envelope.id, ".msg")
            if all(s.final for s in states.values()):
                self.outbox.remove(envelope.id, ".state")
        self._log_events(envelope, new)
        return notice

    def _log_events(self, envelope: OutboxEnvelope, new: dict[str, RecipientState]) -> None:
        """In a worker thread, in order: `relayed` (once), then each recipient `bounced`. A
        failure to record is logged; the states on disk are what counts."""
        facts = self._facts(envelope)
        relayed = [s for s in new.values() if s.status == "relayed"]
        try:
            if relayed:
                qid = relayed[0].queue_id or None
                self.events.log.append(status="relayed", queue_id=qid, **facts)
            for rcpt, state in new.items():
                if state.status == "bounced":
                    self.events.log.append(
                        status="bounced", recipient=rcpt, detail=state.detail, **facts
                    )
        except Exception:
            log.failure("outbound {id}: recording its events failed", id=envelope.id)

    def _settled(
        self,
        notice: MessageInfo | None,
        entry: Entry,
        states: dict[str, RecipientState],
        new: dict[str, RecipientState],
    ) -> None:
        entry.states = states
        envelope = entry.envelope
        if not entry.pending:
            entry.has_data = False
            if envelope.id in self._queued:
                self._queued.remove(envelope.id)
            if not entry.awaiting:
                self._entries.pop(envelope.id, None)
        for rcpt, state in new.items():
            why = state.queue_id if state.status == "relayed" else state.detail
            log.info(
                "outbound {id}: {rcpt} {status}: {why}",
                id=envelope.id,
                rcpt=rcpt,
                status=state.status,
                why=why,
            )
        self.events.wake()
        if notice is not None:
            self._tell_stored(notice)

    def _attempt_failed(self, failure: Failure, entry: Entry) -> str:
        log.failure("outbound {id}: relay attempt failed", failure, id=entry.envelope.id)
        return "down"

    def _attempt_done(self, verdict: Any, entry: Entry) -> None:
        """After an attempt: "done" (nothing left to try now), "held" (the edge answered
        4xx: this sender's mail waits, the others' goes on), "down" (no answer: all wait)."""
        self._busy = False
        sender = entry.envelope.sender.lower()
        if verdict == "done":
            self._failures = 0
            self._held.pop(sender, None)
        elif verdict == "held":
            self._failures = 0
            refusals = self._held.get(sender, (0.0, 0))[1]
            self._held[sender] = (self.clock.seconds() + self._delay(refusals), refusals + 1)
        else:
            self._retry = self.clock.callLater(self._delay(self._failures), self._retry_now)
            self._failures += 1
        self._pump()

    def _retry_now(self) -> None:
        self._retry = None
        self._pump()

    def wake(self) -> None:
        """Try the head of the queue now rather than after its retry delay (the edge's
        address just became known, say)."""
        retry, self._retry = self._retry, None
        if retry is not None and retry.active():
            retry.cancel()
        self._pump()

    # -- outcomes reported by the edge ----------------------------------------------------

    def forget_outcomes(self, submitted_before: float) -> Deferred[list[str]]:
        """Stop waiting for the outcomes of messages relayed and submitted before the time
        `submitted_before` (their edge has long given up on them, or forgot them): their
        state files are removed. Fires with their ids."""
        stale = [
            entry
            for entry in self._entries.values()
            if not entry.pending and entry.envelope.submitted_at < submitted_before
        ]
        if not stale:
            return defer.succeed([])
        for entry in stale:
            self._entries.pop(entry.envelope.id, None)
            log.warn(
                "outbound {id}: no outcome from the edge for {rcpts}; no longer asked for",
                id=entry.envelope.id,
                rcpts=", ".join(entry.awaiting),
            )
        ids = [entry.envelope.id for entry in stale]

        def remove() -> list[str]:
            for item_id in ids:
                self.outbox.remove(item_id, ".state")
            return ids

        return self.run(remove)

    def record_outcome(
        self, item_id: str, recipient: str, status: str, detail: str = ""
    ) -> Deferred[bool]:
        """The edge's word on one relayed recipient: `delivered`, `deferred` or `bounced`.
        Fires with whether it changed anything (an unknown or final recipient: False)."""
        entry = self._entries.get(item_id)
        if status not in ("delivered", "deferred", "bounced"):
            raise ValueError(f"unknown outcome {status!r}")
        current = entry.states.get(recipient) if entry is not None else None
        if entry is None or current is None or current.final:
            return defer.succeed(False)
        if status == "deferred" and current.status == "deferred" and current.detail == detail:
            return defer.succeed(False)
        states = dict(entry.states)
        states[recipient] = RecipientState(status, current.queue_id, detail)
        d = self.run(self._save_outcome, entry.envelope, states, recipient)
        d.addCallback(self._outcome_saved, entry, states, recipient)
        return d

    def _save_outcome(
        self, envelope: OutboxEnvelope, states: dict[str, RecipientState], recipient: str
    ) -> None:
        """In a worker thread: the state (or, all final, its removal), then the event."""
        if all(r in states for r in envelope.recipients) and all(s.final for s in states.values()):
            self.outbox.remove(envelope.id, ".state")
        else:
            self.outbox.write_state(envelope, states)
        state = states[recipient]
        try:
            self.events.log.append(
                status=state.status,
                recipient=recipient,
                queue_id=state.queue_id or None,
                detail=state.detail or None,
                **self._facts(envelope),
            )
        except Exception:
            log.failure("outbound {id}: recording its event failed", id=envelope.id)

    def _outcome_saved(
        self, _: None, entry: Entry, states: dict[str, RecipientState], recipient: str
    ) -> bool:
        entry.states = states
        if not entry.pending and not entry.awaiting:
            self._entries.pop(entry.envelope.id, None)
        self.events.wake()
        return True
