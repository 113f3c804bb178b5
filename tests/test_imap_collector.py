"""The cyclic collector paused around commands over a whole folder (`connector.imap.collector`)."""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from connector.imap import collector
from tests.test_imap import SIMPLE, Server, _ok


@pytest.fixture
def collecting() -> Iterator[None]:
    was = gc.isenabled()
    gc.enable()
    try:
        yield
    finally:
        (gc.enable if was else gc.disable)()


def test_pauses_nest_and_the_last_resume_lets_it_run(collecting: None) -> None:
    collector.pause()
    collector.pause()
    assert not gc.isenabled()
    collector.resume()
    assert not gc.isenabled()  # one pause still holds
    collector.resume()
    assert gc.isenabled()
    collector.resume()  # more resumes than pauses change nothing
    assert gc.isenabled()
    with collector.paused():
        assert not gc.isenabled()
    assert gc.isenabled()


def test_a_collector_that_was_off_stays_off(collecting: None) -> None:
    gc.disable()
    with collector.paused():
        assert not gc.isenabled()
    assert not gc.isenabled()


def test_pauses_from_two_threads(collecting: None) -> None:
    started, release = threading.Barrier(3), threading.Event()

    def hold() -> None:
        with collector.paused():
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


def test_commands_over_the_folder_leave_the_collector_running(
    in_reactor: Any, tmp_path: Any, collecting: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[bool] = []
    real_pause = collector.pause

    def pause() -> None:
        real_pause()
        seen.append(gc.isenabled())

    monkeypatch.setattr(collector, "pause", pause)
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
