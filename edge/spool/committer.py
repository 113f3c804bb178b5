"""Group commit driven from the reactor: the spool's one commit entry point for received mail.

`Committer.commit` queues a received message and returns a Deferred that fires once the
message is durable. One batch is written at a time, holding every message that was waiting
when it started; messages that arrive meanwhile form the next batch. So under load one write
and one fdatasync cover many messages, and no pool thread sits blocked waiting for its turn,
which would starve the store lookups and delivery work that share the reactor's pool.

How a batch becomes durable (in the committer's thread, through the sync process, or by the
reactor's own `fdatasync`) is the committer's `Durability`, one object chosen when the
committer is built (`edge.spool.durability`). When the current segment is half full, the
committer's thread makes the next one (`Spool.prepare`) while batches go on, so that under
steady load no batch waits for a segment to be made (zero-filled and fsynced, tens of
milliseconds). Work that can wait a moment (`while_syncing`) goes into the time a batch
waits for its sync; a batch made durable at once leaves it for the reactor's next turn.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from edge.spool.durability import (
    SLOW_PAUSE,
    SLOW_SYNC,
    Durability,
    InThread,
    SyncProcess,
    for_mx,
)
from edge.spool.spool import Envelope, Spool, SpoolWriter
from edge.spool.syncer import Syncer

__all__ = ["SLOW_PAUSE", "SLOW_SYNC", "Committer", "mx_committer"]

log = Logger()


class Committer:
    def __init__(
        self,
        spool: Spool,
        reactor: Any,
        syncer: Syncer | None = None,
        while_syncing: Callable[[], None] | None = None,
        *,
        durability: Durability | None = None,
    ) -> None:
        """`durability` makes each batch durable; by default `SyncProcess` with `syncer`,
        or `InThread` without one. `while_syncing` is called each time a batch has been
        handed to its sync: work that can wait a moment goes there, into time the reactor
        would spend waiting (for a batch durable at once, in the reactor's next turn)."""
        self.spool = spool
        self.reactor = reactor
        if durability is None:
            durability = (
                SyncProcess(spool, reactor, syncer)
                if syncer is not None
                else InThread(spool, reactor)
            )
        self.durability = durability
        self.while_syncing = while_syncing
        self._waiting: list[tuple[SpoolWriter, Envelope, defer.Deferred[None]]] = []
        self._busy = False
        self._preparing = False
        self.batches = 0

    def commit(self, writer: SpoolWriter, envelope: Envelope) -> defer.Deferred[None]:
        d: defer.Deferred[None] = defer.Deferred()
        self._waiting.append((writer, envelope, d))
        self._next()
        return d

    def _next(self) -> None:
        if self._busy or not self._waiting:
            return
        batch, self._waiting = self._waiting, []
        self._busy = True
        self.batches += 1
        d = self.durability.make_durable([(writer, envelope) for writer, envelope, _ in batch])
        at_once = d.called
        if at_once:
            # The work meant for a sync's time goes into the next turn of the reactor: after
            # this batch is answered, while its client reads the answer and writes its next
            # command. So what was handed over is taken in at once and in order, and not
            # with what comes next.
            self.reactor.callLater(0, self._meanwhile)

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
        if not at_once:
            self._meanwhile()

    def _meanwhile(self) -> None:
        """`while_syncing`, whose faults are not the batch's concern (it is written)."""
        if self.while_syncing is not None:
            try:
                self.while_syncing()
            except Exception:
                log.failure("work done while the spool syncs failed")

    def _prepare(self) -> None:
        if self._preparing or not self.spool.wants_spare():
            return
        self._preparing = True
        d = self.durability.in_thread(self.spool.prepare)

        def done(result: Any) -> None:
            self._preparing = False
            if isinstance(result, Failure):  # the batch that needs it tries again
                log.failure("the spool's next segment could not be made", result)

        d.addBoth(done)


def mx_committer(
    spool: Spool, reactor: Any, while_syncing: Callable[[], None] | None = None
) -> Committer:
    """The committer of an MX's spool, with the MX's durability (`durability.for_mx`), built
    once with the spool. Once the listener, the committer and the sync process have stopped
    (the sync process is waited for during shutdown), the spool is closed: its current
    segment sealed, the one made ahead removed."""
    committer = Committer(
        spool, reactor, while_syncing=while_syncing, durability=for_mx(spool, reactor)
    )
    reactor.addSystemEventTrigger("after", "shutdown", spool.close)
    return committer
