"""The cyclic collector paused around commands over a whole folder (`connector.collector`)."""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from twisted.internet import defer

from connector import collector
from tests.test_imap import SIMPLE, Server, _ok


@pytest.fixture
def collecting() -> Iterator[None]:
    was = gc.isenabled()
    threshold = gc.get_threshold()
    gc.enable()
    try:
        yield
    finally:
        (gc.enable if was else gc.disable)()
        gc.set_threshold(*threshold)


def test_pauses_nest_and_the_last_release_lets_it_run(collecting: None) -> None:
    pause = collector.WHOLE
    pause.__enter__()
    pause.__enter__()
    assert not gc.isenabled()
    pause.__exit__()
    assert not gc.isenabled()  # one hold still holds
    pause.__exit__()
    assert gc.isenabled()
    pause.__exit__()  # more releases than holds change nothing
    assert gc.isenabled()
    with pause:
        assert not gc.isenabled()
    assert gc.isenabled()


def test_a_collector_that_was_off_stays_off(collecting: None) -> None:
    gc.disable()
    with collector.WHOLE:
        assert not gc.isenabled()
    assert not gc.isenabled()


def test_a_pause_held_until_a_deferred_fires(collecting: None) -> None:
    d: defer.Deferred[str] = defer.Deferred()
    with collector.WHOLE:
        later = collector.WHOLE.until(d)
    assert not gc.isenabled()
    d.callback("result")
    assert gc.isenabled() and later.result == "result"
    failed: defer.Deferred[str] = defer.Deferred()
    errors: list[Any] = []
    collector.WHOLE.until(failed).addErrback(errors.append)
    assert not gc.isenabled()
    failed.errback(ValueError("no"))
    assert gc.isenabled() and errors[0].check(ValueError)


def test_pauses_from_two_threads(collecting: None) -> None:
    started, release = threading.Barrier(3), threading.Event()

    def hold() -> None:
        with collector.WHOLE:
            started.wait()
            release.wait(5)

    workers = [threading.Thread(target=hold) for _ in range(2)]
    for w in workers:
        w.start()
    started.wait()
    assert not gc.isenabled()
    release.set()
    for w in workers:
        w.join(5)
    assert gc.isenabled()


def test_beside_the_mx_only_the_full_passes_are_held_off(collecting: None) -> None:
    young, middle, oldest = gc.get_threshold()
    pause = collector.for_process(with_mx=True)
    assert pause is collector.FULL_PASSES
    with pause:
        with pause:
            assert gc.isenabled()  # the young passes go on, for the MX's garbage too
            assert gc.get_threshold() == (young, middle, collector.OUT_OF_REACH)
        assert gc.get_threshold()[2] == collector.OUT_OF_REACH
    assert gc.isenabled() and gc.get_threshold() == (young, middle, oldest)
    assert collector.for_process(with_mx=False) is collector.WHOLE


def test_commands_over_the_folder_leave_the_collector_running(
    in_reactor: Any, tmp_path: Any, collecting: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[bool] = []
    pause = collector.WHOLE
    real_hold = pause._hold

    def hold() -> None:
        real_hold()
        seen.append(gc.isenabled())

    monkeypatch.setattr(pause, "_hold", hold)
    server = Server(in_reactor, tmp_path / "mail")
    try:
        for _ in range(3):
            server.maildir.deliver(SIMPLE)
        client = server.client()
        _ok(client.select("INBOX"))
        assert len(_ok(client.uid("FETCH", "1:*", "(FLAGS)"))) == 3
        assert _ok(client.uid("SEARCH", "UNSEEN")) == [b"1 2 3"]
        assert _ok(client.uid("SEARCH", "FROM", "alice")) == [b"1 2 3"]  # reads the files
        assert len(seen) == 2
        # The fields of every message are kept now: this one reads no file.
        assert _ok(client.uid("SEARCH", "NOT", "SUBJECT", "nothing")) == [b"1 2 3"]
        assert len(seen) == 3
        assert _ok(client.uid("SEARCH", "BODY", "line")) == [b"1 2 3"]  # reads the files
        client.logout()
    finally:
        server.stop()
    # Paused for the listing FETCH, the flag search and the search the cache answers, not
    # for the two that read files; running again after each.
    assert seen == [False, False, False]
    assert gc.isenabled()
