"""Group commit driven from the reactor: no thread waits per message.

`Committer.commit` queues a received message and returns a Deferred that fires once the
message is durable. One batch is written at a time, holding every message that was waiting
when it started; messages that arrive meanwhile form the next batch. So under load one write
and one fdatasync cover many messages, and no pool thread sits blocked waiting for its turn,
which would starve the store lookups and delivery work that share the reactor's pool.

With a `Syncer`, a small batch that fits in the current segment is written from the reactor
thread into the page cache and made durable by the sync process (`edge.spool.syncer`), so no
thread has to win the interpreter lock from a busy reactor on the way. When the current segment
is full, the reactor seals it and goes on in the next one, made ahead. Any other batch (no
next segment made yet, data spilled to disk, a large one) is written and synced in the
committer's own thread. Once the current segment is half full, that thread makes the next
one (`Spool.prepare`) while batches go on through the sync process, so that under steady
load no batch waits for a segment to be made (zero-filled and fsynced, tens of
milliseconds).

When the MX has one session open and no other (`alone`, the usual case of a small MX), the
reactor calls `fdatasync` itself for such a small batch: nobody else waits for it meanwhile,
and the way through the sync process (a pipe write, waking that process, its answer waking
the reactor) costs CPU and time of its own. Measured at one session, side by side: 7% more
messages per second, and about 100 µs less CPU per message. With more sessions, the sync
process lets the reactor serve the others while the disk works, and batches form: syncing
in the reactor there was measured at half the rate with ten sessions. A sync of its own
that takes too long (`SLOW_SYNC`) makes the reactor leave the next ones to the sync process
for a while (`SLOW_PAUSE`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from edge.spool.spool import Envelope, Spool, SpoolWriter, Unsynced
from edge.spool.syncer import Syncer

log = Logger()

SLOW_SYNC = 0.02
"""Seconds an `fdatasync` in the reactor may take before the next ones go elsewhere."""
SLOW_PAUSE = 10.0
"""Seconds the reactor leaves syncing to the sync process after a slow sync of its own."""


class Committer:
    def __init__(
        self,
        spool: Spool,
        reactor: Any,
        syncer: Syncer | None = None,
        while_syncing: Callable[[], None] | None = None,
        alone: Callable[[], bool] | None = None,
        clock: Any = None,
    ) -> None:
        """`while_syncing` is called each time a batch has been handed to the sync: work
        that can wait a moment goes there, into time the reactor would spend waiting.
        `alone` says whether nothing else waits for the reactor (then a small batch is
        synced in the reactor, see above, and `while_syncing` is called in the reactor's
        next turn); `clock` (the reactor's by default) times the pause after a slow one."""
        self.spool = spool
        self.reactor = reactor
        self.syncer = syncer
        self.while_syncing = while_syncing
        self.alone = alone
        self.clock = clock if clock is not None else reactor
        self.synced_here = 0
        self._slow_until = 0.0
        self._waiting: list[tuple[SpoolWriter, Envelope, defer.Deferred[None]]] = []
        self._busy = False
        self._preparing = False
        self._pool: ThreadPool | None = None
        self.batches = 0

    def commit(self, writer: SpoolWriter, envelope: Envelope) -> defer.Deferred[None]:
        d: defer.Deferred[None] = defer.Deferred()
        self._waiting.append((writer, envelope, d))
        self._next()
        return d

    def _thread_pool(self) -> ThreadPool:
        if self._pool is None:
            self._pool = ThreadPool(minthreads=1, maxthreads=1, name="spool-commit")
            self._pool.start()
            self.reactor.addSystemEventTrigger("during", "shutdown", self._pool.stop)
        return self._pool

    def _next(self) -> None:
        if self._busy or not self._waiting:
            return
        batch, self._waiting = self._waiting, []
        self._busy = True
        self.batches += 1
        items = [(writer, envelope) for writer, envelope, _ in batch]
        written = self.spool.write_unsynced(items) if self.syncer is not None else None
        if written is None:
            d = deferToThreadPool(self.reactor, self._thread_pool(), self.spool.commit_batch, items)
        else:
            d = self._sync(written)

        def done(result: Any) -> None:
            self._busy = False
            for _, _, waiter in batch:
                if isinstance(result, Failure):
                    waiter.errback(result)
                else:
                    waiter.callback(None)
            self._next()
            self._prepare()

        d.addBoth(done)
        if self._busy:
            self._meanwhile()

    def _meanwhile(self) -> None:
        """`while_syncing`, whose faults are not the batch's concern (it is written)."""
        if self.while_syncing is not None:
            try:
                self.while_syncing()
            except Exception:
                log.failure("work done while the spool syncs failed")

    def _may_sync_here(self) -> bool:
        return self.alone is not None and self.clock.seconds() >= self._slow_until and self.alone()

    def _sync_here(self, fd: int) -> None:
        """`fdatasync` in the reactor thread. One that takes over `SLOW_SYNC` seconds (a
        disk that stalls) sends the next `SLOW_PAUSE` seconds of batches to the sync
        process, so that a slow disk does not keep the whole edge (its control API, its
        deliveries) waiting on every message."""
        started = time.monotonic()
        try:
            os.fdatasync(fd)
        finally:
            took = time.monotonic() - started
            if took > SLOW_SYNC:
                self._slow_until = self.clock.seconds() + SLOW_PAUSE
                log.info(
                    "spool: a sync took {ms:.0f} ms; syncing through the sync process for "
                    "{pause:.0f} s",
                    ms=took * 1000,
                    pause=SLOW_PAUSE,
                )

    def _sync(self, written: Unsynced) -> defer.Deferred[None]:
        """Make `written` durable through the sync process; undo it if that fails."""
        assert self.syncer is not None
        if written.error is not None:
            d: defer.Deferred[None] = defer.fail(written.error)
        elif self._may_sync_here():
            self.synced_here += 1
            # The work meant for a sync's time goes into the next turn of the reactor: after
            # this batch is answered, while its client reads the answer and writes its next
            # command. So what was handed over is taken in at once and in order, and not
            # with what comes next.
            self.reactor.callLater(0, self._meanwhile)
            d = defer.maybeDeferred(self._sync_here, written.segment.fd)
            d.addCallback(lambda _: self.spool.synced(written))
        else:
            d = self.syncer.sync(written.segment.path)
            d.addCallback(lambda _: self.spool.synced(written))

        def undo(failure: Failure) -> defer.Deferred[None]:
            undone = deferToThreadPool(self.reactor, self._thread_pool(), self.spool.undo, written)
            undone.addErrback(lambda f: log.failure("undoing a failed batch failed", f))
            return undone.addBoth(lambda _: failure)  # type: ignore[return-value]

        d.addErrback(undo)
        return d

    def _prepare(self) -> None:
        if self._preparing or not self.spool.wants_spare():
            return
        self._preparing = True
        d = deferToThreadPool(self.reactor, self._thread_pool(), self.spool.prepare)

        def done(result: Any) -> None:
            self._preparing = False
            if isinstance(result, Failure):  # the batch that needs it tries again
                log.failure("the spool's next segment could not be made", result)

        d.addBoth(done)
