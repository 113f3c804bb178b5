"""Shared fixtures: a Twisted reactor running in a background thread.

Blocking clients (smtplib, imaplib, urllib) talk to servers listening inside the test
process; `in_reactor(fn, *args)` runs `fn` in the reactor thread and waits for its result
(a Deferred is waited on too).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from twisted.internet import reactor as _reactor
from twisted.internet.interfaces import IReactorCore
from twisted.internet.threads import blockingCallFromThread

_thread: threading.Thread | None = None


def _start_reactor() -> None:
    global _thread
    if _thread is not None:
        return
    core: Any = _reactor
    _thread = threading.Thread(
        target=core.run, kwargs={"installSignalHandlers": False}, daemon=True, name="reactor"
    )
    _thread.start()


class ReactorRunner:
    """Runs callables in the reactor thread from test code."""

    def __init__(self) -> None:
        self.reactor = _reactor

    def __call__(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        reactor: Any = _reactor
        return blockingCallFromThread(reactor, fn, *args, **kwargs)


@pytest.fixture(scope="session")
def in_reactor() -> Iterator[ReactorRunner]:
    _start_reactor()
    yield ReactorRunner()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _thread is not None:
        core: IReactorCore = _reactor  # type: ignore[assignment]
        _reactor.callFromThread(core.stop)  # type: ignore[attr-defined]
        _thread.join(timeout=5)


@pytest.fixture
def dns_server(in_reactor: ReactorRunner) -> Iterator[Any]:
    """A local DNS server (see tests/dnsserver.py); `.zone.set(name, type, values)`."""
    from tests.dnsserver import LocalDNSServer

    server = in_reactor(LocalDNSServer, in_reactor.reactor)
    yield server
    in_reactor(server.stop)
