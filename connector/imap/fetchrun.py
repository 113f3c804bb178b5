"""Answering a FETCH: messages rendered in worker threads a batch at a time, written in order.

A message's response is rendered whole (`render.render`) before any of it is written, so
a message that cannot be rendered (its file gone, or a failure of ours on odd content)
is left out and the command ends with a tagged NO; the connection never breaks for it.
Large literals of files in CRLF form are streamed from the open file with RangeProducer.
Only rendering blocks, and it runs in a thread: the reactor writes bytes already made.
This module must never write part of a message's response and then give up on it
(short of the connection going away).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer, threads
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from connector.collector import WHOLE, CollectorPause

from .fetch import RangeProducer
from .message import MaildirMessage
from .render import Piece, Stream, close, render

log = Logger()

BATCH_MESSAGES = 64
"""Messages rendered by one worker-thread call, at most."""
BATCH_BYTES = 4 << 20
"""Bytes of rendered responses (not counting streamed files) held at once, about."""

RunBlocking = Callable[..., "defer.Deferred[Any]"]


@dataclass
class FetchOutcome:
    """How a FETCH went: how many messages were left out, and why."""

    failed: int = 0
    """Messages that could not be rendered (logged)."""
    missing: int = 0
    """Messages whose file was gone (expunged by another session meanwhile)."""
    gone: bool = False
    """The connection went away before the end."""


@dataclass
class Batch:
    """Responses rendered by one worker-thread call."""

    pieces: list[Piece] = field(default_factory=list)
    outcome: FetchOutcome = field(default_factory=FetchOutcome)
    failures: list[Failure] = field(default_factory=list)
    last: bool = True
    """No message is left after these."""


def render_batch(
    messages: Iterator[tuple[int, MaildirMessage]],
    query: list[Any],
    uid: bool,
    pause: CollectorPause = WHOLE,
) -> Batch:
    """Render the next messages (in a worker thread) up to the batch limits, with the
    cyclic collector paused (a message's tree is freed by reference counting; see
    `connector.collector`)."""
    with pause:
        return _render_batch(messages, query, uid)


def _render_batch(
    messages: Iterator[tuple[int, MaildirMessage]], query: list[Any], uid: bool
) -> Batch:
    batch = Batch()
    pieces, outcome, failures = batch.pieces, batch.outcome, batch.failures
    size = count = 0
    for seq, msg in messages:
        try:
            rendered = render(seq, msg, query, uid)
        except FileNotFoundError:
            outcome.missing += 1
        except Exception:
            outcome.failed += 1
            failures.append(Failure())
        else:
            pieces.extend(rendered)
            size += sum(len(p) for p in rendered if isinstance(p, bytes))
        count += 1
        if count >= BATCH_MESSAGES or size >= BATCH_BYTES:
            batch.last = False
            break
    return batch


@implementer(IPushProducer)
class FetchRun:
    """One FETCH command's responses, from the messages found to the last byte written.

    It is the connection's producer while it writes rendered bytes (the next batch is
    rendered only when the connection has taken the last one), and hands over to a
    RangeProducer for each streamed literal."""

    paused = False
    _registered = False
    _waiting = False

    def __init__(
        self,
        transport: Any,
        found: list[tuple[int, MaildirMessage]],
        query: list[Any],
        uid: bool,
        gone: Callable[[], bool],
        run_blocking: RunBlocking = threads.deferToThread,
        pause: CollectorPause = WHOLE,
    ) -> None:
        self.transport = transport
        self.pause = pause
        self.messages = iter(found)  # consumed by the renders: nothing holds a done one
        self.query = query
        self.uid = uid
        self.gone = gone
        self.run_blocking = run_blocking
        self.outcome = FetchOutcome()
        self.last = False
        self.pieces: deque[Piece] = deque()
        self.done: defer.Deferred[FetchOutcome] = defer.Deferred()

    def start(self) -> defer.Deferred[FetchOutcome]:
        self._register()
        if not self.done.called:
            self._render()
        return self.done

    def _register(self) -> None:
        if not self._registered:
            self._registered = True
            # Newly registered, it is running as far as the connection knows: a pause from
            # before the streamed literal no longer holds (nothing would lift it).
            self.paused = False
            self.transport.registerProducer(self, True)

    def _unregister(self) -> None:
        if self._registered:
            self._registered = False
            self.transport.unregisterProducer()

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        if self._waiting:
            self._waiting = False
            self._render()

    def stopProducing(self) -> None:
        self._finish(gone=True)

    def _render(self) -> None:
        if self.gone():
            self._finish(gone=True)
            return
        d = self.run_blocking(render_batch, self.messages, self.query, self.uid, self.pause)
        d.addCallbacks(self._rendered, self._broken)

    def _rendered(self, batch: Batch) -> None:
        if self.done.called:  # the connection went away meanwhile
            close(batch.pieces)
            return
        for failure in batch.failures:
            log.failure("FETCH could not render a message", failure)
        self.outcome.failed += batch.outcome.failed
        self.outcome.missing += batch.outcome.missing
        self.last = batch.last
        self.pieces.extend(batch.pieces)
        self._pump()

    def _pump(self) -> None:
        while self.pieces:
            if self.gone():
                self._finish(gone=True)
                return
            piece = self.pieces.popleft()
            if isinstance(piece, Stream):
                self._unregister()
                producer = RangeProducer(piece.f, piece.start, piece.length)
                producer.beginProducing(self.transport).addCallbacks(
                    self._streamed, lambda _: self._finish(gone=True)
                )
                return
            self.transport.write(piece)
        if self.last:
            self._finish()
        elif self.paused:
            self._waiting = True
        else:
            self._render()

    def _streamed(self, _: object) -> None:
        self._register()
        if not self.done.called:
            self._pump()

    def _broken(self, failure: Failure) -> None:
        """A failure outside rendering one message (a bug): nothing of a message is
        written yet, so the command can still be answered."""
        log.failure("FETCH failed", failure)
        self.outcome.failed += 1
        self._finish()

    def _finish(self, gone: bool = False) -> None:
        self._unregister()
        close(list(self.pieces))
        self.pieces.clear()
        self.outcome.gone = self.outcome.gone or gone
        if not self.done.called:
            self.done.callback(self.outcome)
