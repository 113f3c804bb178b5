"""How a batch of the spool becomes durable: one object, chosen once when the spool's
committer is built.

`edge.spool.committer.Committer` gathers the messages that wait into batches; each batch is
made durable by its `Durability`, which also answers when it is:

- `InThread`: the batch is written and synced in the committer's own thread
  (`Spool.commit_batch`). No sync process.
- `SyncProcess`: a small batch that fits in the current segment is written from the
  reactor thread into the page cache and made durable by the sync process
  (`edge.spool.syncer`), so no thread has to win the interpreter lock from a busy reactor
  on the way. Any other batch (no next segment made yet, data spilled to disk, a large one)
  goes the way of `InThread`. A failed sync or hand-over undoes the batch.
- `SyncHereWhenQuiet` (the MX's, `for_mx`): as `SyncProcess`, except that while the spool
  is quiet (for the last `QUIET_BATCHES` batches, each was one message, no other message
  was being received, and none had been begun since the batch before: one client sending
  one message after the other), the reactor calls `fdatasync` itself:
  nobody else waits for it meanwhile, and the way through the sync process (a pipe write,
  waking that process, its answer waking the reactor) costs CPU and time of its own.
  Measured at one session, side by side: 7% more messages per second, and about 100 µs
  less CPU per message. When messages come in alongside, the sync process lets the reactor
  serve them while the disk works, and batches form: syncing in the reactor there was
  measured at half the rate with ten sessions. A sync of its own that takes too long
  (`SLOW_SYNC`) makes the reactor leave the next ones to the sync process for a while
  (`SLOW_PAUSE`).

The spool decides this from what it sees itself (its batches and its writers); nothing
outside it (the SMTP layer, its sessions) steers it. Nothing here blocks the reactor
but the quiet case's one `fdatasync` of a small batch.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any, TypeVar

from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from edge.spool.spool import Envelope, Spool, SpoolWriter, Unsynced
from edge.spool.syncer import Syncer

log = Logger()

T = TypeVar("T")

SLOW_SYNC = 0.02
"""Seconds an `fdatasync` in the reactor may take before the next ones go elsewhere."""
SLOW_PAUSE = 10.0
"""Seconds the reactor leaves syncing to the sync process after a slow sync of its own."""
QUIET_BATCHES = 4
"""Lone batches in a row (see `SyncHereWhenQuiet`) before the reactor syncs them itself."""

Batch = list[tuple[SpoolWriter, Envelope]]


class InThread:
    """Every batch written and synced in the committer's own thread (one thread, so the
    batches and the making of the next segment take turns)."""

    def __init__(self, spool: Spool, reactor: Any) -> None:
        self.spool = spool
        self.reactor = reactor
        self._pool: ThreadPool | None = None

    def in_thread(self, fn: Callable[..., T], *args: Any) -> defer.Deferred[T]:
        """`fn(*args)` in the spool's own thread (blocking work: writes, syncs, new segments)."""
        if self._pool is None:
            self._pool = ThreadPool(minthreads=1, maxthreads=1, name="spool-commit")
            self._pool.start()
            self.reactor.addSystemEventTrigger("during", "shutdown", self._pool.stop)
        return deferToThreadPool(self.reactor, self._pool, fn, *args)

    def make_durable(self, batch: Batch) -> defer.Deferred[None]:
        """A Deferred that fires once `batch` is durable (and fails if it could not be)."""
        return self.in_thread(self.spool.commit_batch, batch)


class SyncProcess(InThread):
    """Small batches into the page cache, made durable by the sync process."""

    def __init__(self, spool: Spool, reactor: Any, syncer: Syncer) -> None:
        super().__init__(spool, reactor)
        self.syncer = syncer

    def make_durable(self, batch: Batch) -> defer.Deferred[None]:
        written = self.spool.write_unsynced(batch)
        if written is None:
            return super().make_durable(batch)
        if written.error is not None:
            d: defer.Deferred[None] = defer.fail(written.error)
        else:
            d = self._sync(written)

        def undo(failure: Failure) -> defer.Deferred[None]:
            undone = self.in_thread(self.spool.undo, written)
            undone.addErrback(lambda f: log.failure("undoing a failed batch failed", f))
            return undone.addBoth(lambda _: failure)  # type: ignore[return-value]

        d.addErrback(undo)
        return d

    def _sync(self, written: Unsynced) -> defer.Deferred[None]:
        """`fdatasync` of the batch's segment, then the batch handed over (`Spool.synced`)."""
        d = self.syncer.sync(written.segment.path)
        return d.addCallback(lambda _: self.spool.synced(written))


class SyncHereWhenQuiet(SyncProcess):
    """As `SyncProcess`, but the reactor syncs a lone batch itself while the spool is quiet."""

    def __init__(self, spool: Spool, reactor: Any, syncer: Syncer, clock: Any = None) -> None:
        """`clock` (the reactor's by default) times the pause after a slow sync."""
        super().__init__(spool, reactor, syncer)
        self.clock = clock if clock is not None else reactor
        self.synced_here = 0
        self._slow_until = 0.0
        self._made = spool.writers_made  # the spool's writers made before the last batch
        self._lone = 0  # lone batches in a row

    def make_durable(self, batch: Batch) -> defer.Deferred[None]:
        spool = self.spool
        made = spool.writers_made
        # One message, the only one being received, and the only one begun since the last.
        lone = len(batch) == 1 and spool.receiving() == 1 and made - self._made == 1
        self._lone = self._lone + 1 if lone else 0
        self._made = made
        return super().make_durable(batch)

    def quiet(self, written: Unsynced) -> bool:
        """The last `QUIET_BATCHES` batches (this one too) were lone. (One lone batch as
        the rule was measured too: with ten sessions, which spend most of their time
        outside DATA, a third of the batches were lone, and the reactor's syncs kept the
        other sessions waiting; four in a row came for about one batch in a hundred.)"""
        return self._lone >= QUIET_BATCHES

    def _sync(self, written: Unsynced) -> defer.Deferred[None]:
        if self.clock.seconds() < self._slow_until or not self.quiet(written):
            return super()._sync(written)
        self.synced_here += 1
        d = defer.maybeDeferred(self._sync_here, written.segment.fd)
        return d.addCallback(lambda _: self.spool.synced(written))

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


Durability = InThread
"""What a committer makes its batches durable with (`InThread` or one of its kinds)."""


def for_mx(spool: Spool, reactor: Any) -> SyncHereWhenQuiet:
    """The durability of an MX's spool: its own sync process, and the reactor's own sync
    while the spool is quiet."""
    return SyncHereWhenQuiet(spool, reactor, Syncer(reactor))
