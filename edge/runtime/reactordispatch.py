"""The epoll reactor's dispatch of ready descriptors, without a legacy log context per event.

Twisted's epoll reactor runs the handling of every ready descriptor inside
`twisted.python.log.callWithLogger`: it asks the connection for its log prefix and pushes a
legacy logging context (a dict) for the call, which only the legacy `log.msg` API reads.
Every read and write of every session pays for it, four Python calls and a dict each time,
several times per message on a busy MX. tailpost logs through `twisted.logger`, whose lines
name their module, not the connection, so the context is never read.

`direct_dispatch(reactor)` gives an epoll reactor a poll step that calls the handler
directly and logs whatever escapes it, as the wrapper did. A reactor of any other kind is
left as it is. Call it once per process, before the reactor runs.
"""

from __future__ import annotations

import errno
import types
from typing import Any

from twisted.logger import Logger

log = Logger()


def direct_dispatch(reactor: Any) -> bool:
    """Whether `reactor` (an epoll reactor) now dispatches without the legacy context."""
    try:
        from twisted.internet.epollreactor import EPollReactor
    except ImportError:  # no epoll on this platform
        return False
    if type(reactor) is not EPollReactor:
        return False
    poll = types.MethodType(_do_poll, reactor)
    reactor.doPoll = poll  # type: ignore[method-assign]
    reactor.doIteration = poll  # type: ignore[method-assign]
    return True


def _do_poll(self: Any, timeout: float | None) -> None:
    """One wait for ready descriptors, then each one's read or write handled in turn."""
    try:
        ready = self._poller.poll(-1 if timeout is None else timeout, len(self._selectables))
    except OSError as exc:
        if exc.errno == errno.EINTR:
            return
        raise
    handle = self._doReadOrWrite
    selectables = self._selectables
    for fd, event in ready:
        selectable = selectables.get(fd)
        if selectable is None:
            continue  # removed by an earlier handler in this round
        try:
            handle(selectable, fd, event)
        except Exception:
            log.failure("handling a ready descriptor failed")
