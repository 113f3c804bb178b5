"""Delivery events from the queue into the store, in batches, and counters for /metrics.

The queue calls `EventRecorder.add` on the reactor thread for each event; a timer writes
what gathered to the store in one transaction on a worker thread, so recording never slows
delivery. Events gathered in the last interval before a crash can be lost (the spool, not
this log, is what keeps mail safe). Counters are kept in memory from the process's start.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer, task, threads
from twisted.logger import Logger

from edge.store.events import DeliveryEvents

log = Logger()


class EventRecorder(Service):
    def __init__(self, events: DeliveryEvents, clock: Any, interval: float = 1.0) -> None:
        self.setName("delivery-events")
        self.events = events
        self.clock = clock
        self.interval = interval
        self.pending: list[tuple[str, str, str, str, float]] = []
        self.counts: Counter[str] = Counter()
        self._loop: task.LoopingCall | None = None

    def add(self, qid: str, rcpt: str, event: str, detail: str) -> None:
        self.pending.append((qid, rcpt, event, detail, self.clock.seconds()))
        self.counts[event] += 1

    def flush(self) -> defer.Deferred[None]:
        batch, self.pending = self.pending, []
        if not batch:
            return defer.succeed(None)
        d: defer.Deferred[None] = threads.deferToThread(self.events.record, batch)
        d.addErrback(lambda f: log.failure("recording {n} delivery events failed", f, n=len(batch)))
        return d

    def startService(self) -> None:
        super().startService()
        self._loop = task.LoopingCall(self.flush)
        self._loop.clock = self.clock
        self._loop.start(self.interval, now=False)

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        return self.flush()
