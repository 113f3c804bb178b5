"""What became of relayed mail: the device asks its edge, and records each recipient's outcome.

While the outbound queue has recipients relayed but not yet delivered or bounced, every
`interval` seconds this asks `GET /v1/outbound/events?after=<cursor>&limit=<n>` of the edge
(with the device key, through `connector.edgeclient`): the edge answers the delivery events
of the messages this device relayed, by id, ascending, and the `next_after` to ask from. An
event for a queue id and recipient the queue waits on becomes that recipient's outcome
(`OutboundQueue.record_outcome`): `delivered`; `deferred` (not final, the edge retries);
`bounced`, `expired` and `deleted` (final, as bounced). The cursor is kept in a small file,
written durably, after the outcomes of a page are recorded: a crash in between asks for the
page again, and an outcome already recorded changes nothing.

No poll is made while nothing waits, nor while the queue is relaying (the message being
relayed could have events before its queue id is recorded). An edge that cannot be reached
or answers an error is asked again later, the wait doubling up to `max_interval`. Outcomes
not known `outcome_wait` seconds (7 days) after submission are no longer waited for. This module never blocks the
reactor thread and never sends the device key anywhere but the edge (the client's job).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from connector.edgeclient import EdgeClient, EdgeUnavailable
from connector.outbound.queue import OutboundQueue
from maildir.durable import write_durably

__all__ = ["EDGE_OUTCOMES", "OutcomePoller"]

log = Logger(namespace="tailpost.outbound.poller")

DEFAULT_OUTCOME_WAIT = 7 * 86400.0
"""How long outcomes are waited for: past the edge's 5 days of retries, with room to spare."""

EDGE_OUTCOMES = {
    "delivered": "delivered",
    "deferred": "deferred",
    "bounced": "bounced",
    "expired": "bounced",
    "deleted": "bounced",
}
"""The edge's event names (`edge.store.events`) and the outcome each is for the device."""


def read_cursor(path: Path) -> int:
    try:
        value = json.loads(path.read_text()).get("after", 0)
    except (OSError, ValueError, AttributeError):
        return 0
    return value if isinstance(value, int) and value >= 0 else 0


def write_cursor(path: Path, after: int) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write_durably(tmp, path, [json.dumps({"after": after}).encode()])


class OutcomePoller(Service):
    """Polls the edge for the outcomes of relayed mail while any are awaited."""

    def __init__(
        self,
        queue: OutboundQueue,
        client: EdgeClient,
        cursor_path: Path,
        *,
        clock: IReactorTime,
        run_blocking: Callable[..., Deferred[Any]],
        interval: float = 5.0,
        limit: int = 100,
        max_interval: float = 300.0,
        outcome_wait: float = DEFAULT_OUTCOME_WAIT,
    ) -> None:
        """`interval` seconds between polls, doubled after each failed one up to
        `max_interval`; outcomes are waited for at most `outcome_wait` seconds after the
        message was submitted."""
        self.setName("outbound-outcomes")
        self.queue = queue
        self.client = client
        self.cursor_path = cursor_path
        self.clock = clock
        self.run = run_blocking
        self.interval = interval
        self.max_interval = max(interval, max_interval)
        self.limit = limit
        self.outcome_wait = outcome_wait
        self._failures = 0
        self.after = read_cursor(cursor_path)
        self.polls = 0
        """Requests made to the edge (for tests and metrics)."""
        self._timer: IDelayedCall | None = None
        self._polling: Deferred[None] | None = None
        self.last_failed = False
        """Whether the last poll got no usable answer."""

    def startService(self) -> None:
        super().startService()
        self._schedule()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()
        polling = self._polling
        if polling is None:
            return defer.succeed(None)
        done: Deferred[None] = Deferred()
        polling.addBoth(lambda _: done.callback(None))
        return done

    def _schedule(self) -> None:
        if self.running and self._timer is None:
            wait = min(self.max_interval, self.interval * 2 ** min(self._failures, 30))
            self._timer = self.clock.callLater(wait, self._tick)

    def _tick(self) -> None:
        self._timer = None
        self.queue.forget_outcomes(self.clock.seconds() - self.outcome_wait)
        if not self.queue.awaiting() or self.queue.relaying:
            self._schedule()
            return
        self._polling = defer.ensureDeferred(self._poll_pages())
        self._polling.addErrback(lambda f: log.failure("polling the edge's outcomes failed", f))
        self._polling.addBoth(self._polled)

    async def _poll_pages(self) -> None:
        """Page after page while full pages come (and the service runs); a failed poll
        makes the next wait longer."""
        self._failures += 1
        while True:
            more = await self.poll()
            if self.last_failed or not more or not self.running:
                break
        if not self.last_failed:
            self._failures = 0

    def _polled(self, _: object) -> None:
        self._polling = None
        self._schedule()

    async def poll(self) -> bool:
        """Ask for one page of events and record the outcomes in it; True if there may be
        more to ask for at once."""
        self.polls += 1
        self.last_failed = True
        path = f"/v1/outbound/events?after={self.after}&limit={self.limit}".encode("ascii")
        try:
            reply = await self.client.request(b"GET", path)
        except EdgeUnavailable as exc:
            log.info("outbound outcomes: {error}", error=exc)
            return False
        try:
            body: Any = reply.json() if reply.code == 200 else None
            if not isinstance(body, dict) or not isinstance(body.get("events"), list):
                raise ValueError("no events list")
            events: list[Any] = body["events"]
            next_after = int(body.get("next_after", self.after))
        except (ValueError, TypeError, KeyError):
            log.warn(
                "outbound outcomes: the edge answered {code} to {path}",
                code=reply.code,
                path=path.decode(),
            )
            return False
        self.last_failed = False
        awaited = self.queue.awaiting()
        for event in events:
            if isinstance(event, dict):
                await self._record(event, awaited)
        newest = max((e.get("id", 0) for e in events if isinstance(e, dict)), default=0)
        after = max(self.after, next_after, newest if isinstance(newest, int) else 0)
        if after != self.after:
            await self.run(write_cursor, self.cursor_path, after)
            self.after = after
        return len(events) >= self.limit

    async def _record(
        self, event: dict[str, Any], awaited: dict[str, list[tuple[str, str]]]
    ) -> None:
        status = EDGE_OUTCOMES.get(str(event.get("event", "")))
        waiting = awaited.get(str(event.get("queue_id", "")))
        if status is None or not waiting:
            return
        recipient = str(event.get("recipient", "")).lower()
        detail = str(event.get("detail") or "")
        if event.get("event") in ("expired", "deleted") and not detail:
            detail = f"{event['event']} on the edge"
        for item_id, rcpt in waiting:
            if rcpt.lower() == recipient:
                await self.queue.record_outcome(item_id, rcpt, status, detail)
