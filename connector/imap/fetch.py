"""Pieces of FETCH responses: INTERNALDATE formatting and streaming file ranges.

RangeProducer announces a literal length taken from the open file (Maildir files are
never rewritten in place) and must never read outside the requested range. If the
connection stops it, its Deferred fails with ConnectionDone, so that whoever waits on it
can let go of what it holds.
"""

from __future__ import annotations

import os
import time
from typing import IO, Any

from twisted.internet import defer, interfaces
from twisted.internet.error import ConnectionDone
from zope.interface import implementer

_MONTHS = [b"Jan", b"Feb", b"Mar", b"Apr", b"May", b"Jun"]
_MONTHS += [b"Jul", b"Aug", b"Sep", b"Oct", b"Nov", b"Dec"]
_CHUNK = 65536


def format_internaldate(ts: float) -> bytes:
    t = time.gmtime(ts)
    return b'"%02d-%s-%04d %02d:%02d:%02d +0000"' % (
        t.tm_mday,
        _MONTHS[t.tm_mon - 1],
        t.tm_year,
        t.tm_hour,
        t.tm_min,
        t.tm_sec,
    )


@implementer(interfaces.IPullProducer)
class RangeProducer:
    """Writes `{n}\\r\\n` and n bytes of a file from an offset to a consumer."""

    def __init__(self, f: IO[bytes], start: int, length: int | None) -> None:
        size = os.fstat(f.fileno()).st_size
        start = min(max(start, 0), size)
        self.remaining = size - start if length is None else max(0, min(length, size - start))
        self.f: IO[bytes] | None = f
        f.seek(start)
        self.head: bytes | None = b"{%d}\r\n" % self.remaining
        self.done: defer.Deferred[None] = defer.Deferred()

    def beginProducing(self, consumer: Any) -> defer.Deferred[None]:
        self.consumer = consumer
        consumer.registerProducer(self, False)
        return self.done

    def resumeProducing(self) -> None:
        if self.f is None:
            return
        chunk = self.f.read(min(_CHUNK, self.remaining)) if self.remaining else b""
        self.remaining -= len(chunk)
        if self.head is not None:
            chunk, self.head = self.head + chunk, None
        if chunk:
            self.consumer.write(chunk)
        if self.remaining <= 0 or not chunk:
            self._finish()

    def _finish(self) -> None:
        if self.f is not None:
            self.f.close()
            self.f = None
            self.consumer.unregisterProducer()
            self.done.callback(None)

    def stopProducing(self) -> None:
        if self.f is not None:
            self.f.close()
            self.f = None
            self.done.errback(ConnectionDone("the connection stopped the literal"))
