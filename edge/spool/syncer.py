"""Durability without the interpreter lock: `fdatasync` of spool segments in a child process.

A thread that calls `fdatasync` for the reactor needs the interpreter lock before the call
and again after it, and while the reactor thread is busy (a loaded MX) each of those waits
for the interpreter's switch interval: measured, 16 ms for a sync that takes 0.25 ms. So the
reactor writes a batch into the segment itself (a `pwrite` into the page cache of a file
made ahead, which changes no metadata) and asks `edge.spool.synchild`, a small process with an
interpreter of its own, to `fdatasync` the file. Its answer arrives on a pipe like any other
input. `fdatasync` works on the file, whichever descriptor it is called on.

Requests are answered in order. If the child ends, every sync still waiting fails (those
messages are not acknowledged) and the next request starts a new child.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys
from collections import deque
from pathlib import Path
from typing import Any

from twisted.internet import defer, error, protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger()

CHILD = Path(__file__).with_name("synchild.py")
STOP_WAIT = 10.0
"""Seconds a stopping edge waits for the sync process to answer what it was asked."""


class _ChildProtocol(protocol.ProcessProtocol):
    def __init__(self, syncer: Syncer) -> None:
        self.syncer = syncer
        self.waiting: deque[defer.Deferred[None]] = deque()
        self.pending = b""
        self.ended = False
        self.requests = -1
        """Our end of the child's standard input (non-blocking; written with `os.write`)."""

    def outReceived(self, data: bytes) -> None:  # noqa: N802
        self.pending += data
        *answers, self.pending = self.pending.split(b"\n")
        for answer in answers:
            if not self.waiting:
                log.error("sync process: an answer nobody asked for: {a!r}", a=answer)
                continue
            d = self.waiting.popleft()
            code = int(answer) if answer.strip().isdigit() else errno.EIO
            if code == 0:
                d.callback(None)
            else:
                d.errback(OSError(code, f"fdatasync failed: {os.strerror(code)}"))

    def outConnectionLost(self) -> None:  # noqa: N802
        """The child can answer nothing more (it ended, or is ending)."""
        self._end()

    def processEnded(self, reason: Failure) -> None:  # noqa: N802
        self._end()
        if not reason.check(error.ProcessDone):
            log.warn("sync process ended: {why}", why=reason.getErrorMessage())

    def _end(self) -> None:
        self.ended = True
        self.close_requests()
        waiting, self.waiting = self.waiting, deque()
        for d in waiting:
            d.errback(OSError(errno.EIO, "the sync process ended before answering"))
        self.syncer._ended(self)

    def close_requests(self) -> None:
        if self.requests >= 0:
            os.close(self.requests)
            self.requests = -1


class Syncer:
    """`sync(path)`: a Deferred that fires once the file's data is durable."""

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self._child: _ChildProtocol | None = None
        self._stopping = False
        self._stopped: list[defer.Deferred[None]] = []
        self.started = 0
        reactor.addSystemEventTrigger("during", "shutdown", self.stop)

    def sync(self, path: Path) -> defer.Deferred[None]:
        try:
            child = self._running()
        except OSError:
            return defer.fail()
        line = os.fsencode(path) + b"\n"
        try:
            # One short line (under PIPE_BUF) goes into the pipe whole or not at all; the
            # child reads it at once, so a full pipe means the child is stuck.
            if os.write(child.requests, line) != len(line):
                raise OSError(errno.EIO, "a request to the sync process was cut short")
        except OSError:
            return defer.fail()
        d: defer.Deferred[None] = defer.Deferred()
        child.waiting.append(d)
        return d

    def _running(self) -> _ChildProtocol:
        if self._stopping:
            raise OSError(errno.ESHUTDOWN, "the edge is stopping")
        if self._child is None or self._child.ended:
            child = _ChildProtocol(self)
            theirs, ours = os.pipe()
            try:
                self.reactor.spawnProcess(
                    child,
                    sys.executable,
                    [sys.executable, "-S", "-E", str(CHILD)],
                    env={},
                    childFDs={0: theirs, 1: "r", 2: 2},
                )
            except BaseException:
                os.close(ours)
                raise
            finally:
                os.close(theirs)
            os.set_blocking(ours, False)
            child.requests = ours
            self._child = child
            self.started += 1
        return self._child

    def _ended(self, child: _ChildProtocol) -> None:
        if self._child is child:
            self._child = None
        stopped, self._stopped = self._stopped, []
        for d in stopped:
            d.callback(None)

    def stop(self) -> defer.Deferred[None]:
        """Let the child end after answering what it was asked: a Deferred that fires once
        it has (so a shutdown waits for the batches in flight to be answered, and the spool
        is not closed under them), or after `STOP_WAIT` seconds, when the child is killed
        and what still waits fails (those messages were never answered 250)."""
        self._stopping = True
        child = self._child
        if child is None or child.ended:
            return defer.succeed(None)
        child.close_requests()
        d: defer.Deferred[None] = defer.Deferred()
        self._stopped.append(d)
        timer = self.reactor.callLater(STOP_WAIT, self._kill, child)

        def answered(result: Any) -> Any:
            if timer.active():
                timer.cancel()
            return result

        return d.addBoth(answered)

    def _kill(self, child: _ChildProtocol) -> None:
        log.warn("sync process: no answer within {s} s of the stop; killing it", s=STOP_WAIT)
        if child.transport is not None:
            with contextlib.suppress(error.ProcessExitedAlready, OSError):
                child.transport.signalProcess("KILL")
        child._end()
