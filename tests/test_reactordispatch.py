"""The epoll reactor's direct dispatch: ready descriptors handled, faults logged, others kept."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import globalLogPublisher

from edge.runtime.reactordispatch import direct_dispatch

epollreactor = pytest.importorskip("twisted.internet.epollreactor")


class Reader:
    """A read descriptor over one end of a socket pair; `fail` makes its handling fault."""

    def __init__(self, sock: socket.socket, got: list[Any], fail: bool = False) -> None:
        self.sock = sock
        self.got = got
        self.fail = fail

    def fileno(self) -> int:
        return self.sock.fileno()

    def doRead(self) -> None:  # noqa: N802
        self.got.append(self.sock.recv(100))
        if self.fail:
            raise RuntimeError("read fault")

    def connectionLost(self, reason: Any) -> None:  # noqa: N802
        self.got.append("lost")
        if self.fail:
            raise RuntimeError("and a fault while closing")

    def logPrefix(self) -> str:  # noqa: N802
        return "reader"


@pytest.fixture
def reactor() -> Iterator[Any]:
    made = epollreactor.EPollReactor()
    yield made
    made._poller.close()
    for fd in (made.waker.i, made.waker.o):
        os.close(fd)


def test_ready_descriptors_are_handled_and_a_fault_is_logged(reactor: Any) -> None:
    assert direct_dispatch(reactor)
    events: list[dict[str, Any]] = []
    observer = events.append
    globalLogPublisher.addObserver(observer)  # type: ignore[arg-type]
    pairs = [socket.socketpair() for _ in range(2)]
    try:
        bad: list[Any] = []
        good: list[Any] = []
        reactor.addReader(Reader(pairs[0][0], bad, fail=True))
        reactor.addReader(Reader(pairs[1][0], good))
        pairs[0][1].send(b"first")
        pairs[1][1].send(b"second")
        reactor.doIteration(1.0)
        # The faulty reader is closed and its fault logged; the other one is still served.
        assert bad == [b"first", "lost"]
        assert good == [b"second"]
        assert any(e.get("log_namespace") == "edge.runtime.reactordispatch" for e in events)
        pairs[1][1].send(b"third")
        reactor.doIteration(1.0)
        assert good == [b"second", b"third"]
    finally:
        globalLogPublisher.removeObserver(observer)  # type: ignore[arg-type]
        reactor.removeAll()
        for a, b in pairs:
            a.close()
            b.close()


def test_a_reactor_of_another_kind_is_left_alone() -> None:
    other = MemoryReactorClock()
    assert not direct_dispatch(other)
    assert "doIteration" not in vars(other)
