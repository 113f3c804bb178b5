"""Operator actions on the delivery queue: list, show, retry now, hold, release, delete, bounce.

Used by the `/v1/queue` control API (and through it by `tailpost queue`). Every action
records its effect in the spool before it answers, so it survives a restart (a hold with its
reason: the operator's, or the defect the queue held the message for); nothing here
deletes a message without recording an outcome for each of its unfinished recipients.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from edge.delivery.dsn import RecipientStatus
from edge.delivery.queue import DeliveryQueue
from edge.smtp import replies

STATES = ("active", "held", "deferred", "queued")


class QueueError(Exception):
    """An action that cannot be done: `code` is a machine code, `status` an HTTP status."""

    def __init__(self, message: str, code: str, status: int) -> None:
        super().__init__(message)
        self.code = code
        self.status = status


@dataclass(frozen=True)
class Filters:
    state: str | None = None
    device: str | None = None
    domain: str | None = None
    min_age: float | None = None


class QueueControl:
    def __init__(self, queue: DeliveryQueue) -> None:
        self.queue = queue

    def _state_of(self, qid: str) -> str:
        q = self.queue
        if q.is_running(qid):
            return "active"
        if q.spool.entry(qid).held:
            return "held"
        return "deferred" if q.states.get(qid) and q.states[qid].attempts else "queued"

    def describe(self, qid: str) -> dict[str, Any]:
        q = self.queue
        env = q.envelopes.get(qid)
        if env is None:
            raise QueueError(f"no queued message {qid}", "message_not_found", 404)
        entry = q.spool.entry(qid)
        state = q.states.get(qid)
        now = q.clock.seconds()
        return {
            "id": qid,
            "state": self._state_of(qid),
            "kind": env.kind,
            "sender": env.sender,
            "recipients": env.recipients,
            "pending": entry.pending,
            "outcomes": dict(entry.outcomes),
            "size_bytes": env.size,
            "received_at": env.received_at,
            "age_seconds": round(now - env.received_at, 3),
            "attempts": state.attempts if state else 0,
            "next_attempt_at": state.next_attempt if state else None,
            "last_errors": dict(state.last_errors) if state else {},
            "devices": dict(state.devices) if state else {},
            "client_ip": env.client_ip,
            "held": entry.held,
            "held_reason": entry.held_reason,
            "delay_warned": entry.warned,
            "expires_at": env.received_at + q.lifetime,
        }

    def list(self, filters: Filters = Filters()) -> list[dict[str, Any]]:
        if filters.state is not None and filters.state not in STATES:
            raise QueueError(f"state must be one of {', '.join(STATES)}", "invalid_parameter", 400)
        out = []
        for qid in sorted(self.queue.envelopes):
            item = self.describe(qid)
            if filters.state and item["state"] != filters.state:
                continue
            if filters.device and filters.device not in item["devices"].values():
                continue
            if filters.domain:
                domain = filters.domain.lower()
                if not any(r.lower().endswith("@" + domain) for r in item["pending"]):
                    continue
            if filters.min_age is not None and item["age_seconds"] < filters.min_age:
                continue
            out.append(item)
        return out

    def _known(self, qid: str) -> None:
        if qid not in self.queue.envelopes:
            raise QueueError(f"no queued message {qid}", "message_not_found", 404)

    def retry_now(self, qid: str) -> dict[str, Any]:
        self._known(qid)
        if self.queue.spool.entry(qid).held:
            raise QueueError(f"{qid} is held; release it first", "message_held", 409)
        self.queue.schedule(qid, 0.0)
        return self.describe(qid)

    async def hold(self, qid: str) -> dict[str, Any]:
        self._known(qid)
        spool = self.queue.spool
        await self.queue.run_blocking(spool.set_held, qid, True, "held by the operator")
        self.queue.unschedule(qid)
        return self.describe(qid)

    async def release(self, qid: str) -> dict[str, Any]:
        self._known(qid)
        await self.queue.run_blocking(self.queue.spool.set_held, qid, False)
        self.queue.schedule(qid, 0.0)
        return self.describe(qid)

    async def delete(self, qid: str) -> dict[str, Any]:
        """Drop the message for every unfinished recipient, without telling the sender."""
        self._known(qid)
        pending = self.queue.spool.entry(qid).pending
        await self._finish(qid, dict.fromkeys(pending, "deleted: by the operator"), "deleted")
        return {"id": qid, "status": "deleted", "recipients": pending}

    async def bounce(self, qid: str) -> dict[str, Any]:
        """Give up on every unfinished recipient now and send the sender a failure DSN."""
        self._known(qid)
        q = self.queue
        env = q.envelopes[qid]
        pending = q.spool.entry(qid).pending
        reply = replies.D550_RETURNED.status
        raw = await q.run_blocking(q.spool.read, qid)
        await self._finish(qid, dict.fromkeys(pending, f"bounced: {reply}"), "bounced")
        await q.report(env, raw, [RecipientStatus(r, reply) for r in pending], "failed")
        return {"id": qid, "status": "bounced", "recipients": pending}

    async def _finish(self, qid: str, outcomes: dict[str, str], event: str) -> None:
        q = self.queue
        if q.is_running(qid):
            raise QueueError(f"{qid} is being delivered right now; try again", "message_busy", 409)
        q.unschedule(qid)
        await q.run_blocking(q.spool.mark_finished, qid, outcomes)
        for rcpt, detail in outcomes.items():
            q.record_event(qid, rcpt, event, detail)
        await q.run_blocking(q.spool.remove, qid)
        q.forget(qid)
