"""Helpers of the spool's tests: commits, small spools, a patched `os`, threads that commit."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

import edge.spool.segments
import maildir.durable
from edge.spool.segments import BLOCK, HEADER
from edge.spool.spool import Envelope, Spool, SpoolWriter


def commit(
    spool: Spool,
    data: bytes = b"Subject: hi\r\n\r\nbody\r\n",
    recipients: list[str] | None = None,
    received_at: float = 1000.0,
) -> Envelope:
    writer, env = prepare(spool, data, recipients, received_at)
    spool.commit(writer, env)
    return env


def prepare(
    spool: Spool,
    data: bytes = b"Subject: hi\r\n\r\nbody\r\n",
    recipients: list[str] | None = None,
    received_at: float = 1000.0,
) -> tuple[SpoolWriter, Envelope]:
    writer = spool.writer()
    for i in range(0, len(data), 7):  # several chunks
        writer.write(data[i : i + 7])
    env = Envelope(
        qid=writer.qid,
        sender="sender@example.net",
        recipients=recipients if recipients is not None else ["a@example.test"],
        received_at=received_at,
        client_ip="192.0.2.7",
        helo="client.example.net",
    )
    return writer, env


def small(root: Path, blocks: int, **kwargs: Any) -> Spool:
    """A spool whose segments hold `blocks` batches of one small message each."""
    return Spool(root, segment_size=blocks * BLOCK, **kwargs)


def names(path: Path) -> set[str]:
    return {p.name for p in path.iterdir()}


def segment_files(spool: Spool) -> list[Path]:
    return sorted(spool.queue.glob("*.seg"))


def segment_of(spool: Spool, qid: str) -> Path:
    return spool.queue / f"{spool.entry(qid).batch}.seg"


def finish(spool: Spool, env: Envelope) -> None:
    """What delivery does with a message whose recipients are all done."""
    spool.mark_finished(env.qid, dict.fromkeys(env.recipients, "delivered"))
    spool.remove(env.qid)


def log_lines(spool: Spool, qid: str) -> list[dict[str, Any]]:
    path = spool.queue / f"{spool.entry(qid).batch}.log"
    return [json.loads(line) for line in path.read_text().splitlines()]


def batch_start(spool: Spool, env: Envelope) -> int:
    """Where the record of the message `env` begins in its segment."""
    return spool.entry(env.qid).offset - len(env.to_json()) - HEADER.size


class _PatchedOS(ModuleType):
    """`os` as `edge.spool.segments` sees it, with some functions replaced (the rest is the real
    module)."""

    def __init__(self, **replaced: Callable[..., Any]) -> None:
        super().__init__("os")
        self.__dict__.update(replaced)

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)


def patch_os(monkeypatch: pytest.MonkeyPatch, **replaced: Callable[..., Any]) -> None:
    patched = _PatchedOS(**replaced)
    monkeypatch.setattr(edge.spool.segments, "os", patched)
    monkeypatch.setattr(maildir.durable, "os", patched)  # the segment directory's fsync


class Calls:
    """Counts the calls of the `os` functions the spool's segments make (their directory's
    fsync included), passing them on."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, *functions: str) -> None:
        self.counts = dict.fromkeys(functions, 0)

        def counting(name: str) -> Callable[..., Any]:
            def call(*args: Any) -> Any:
                self.counts[name] += 1
                return getattr(os, name)(*args)

            return call

        patch_os(monkeypatch, **{name: counting(name) for name in functions})

    def taken(self) -> dict[str, int]:
        counts, self.counts = self.counts, dict.fromkeys(self.counts, 0)
        return counts


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.005)


class Committer(threading.Thread):
    """Commits one prepared message in its own thread, keeping the error if any."""

    def __init__(self, spool: Spool, writer: SpoolWriter, env: Envelope) -> None:
        super().__init__(daemon=True)
        self.spool, self.writer, self.env = spool, writer, env
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.spool.commit(self.writer, self.env)
        except BaseException as exc:
            self.error = exc


@contextmanager
def leader_held(
    spool: Spool, monkeypatch: pytest.MonkeyPatch, fail_call: int | None = None
) -> Iterator[threading.Event]:
    """A first commit whose fdatasync blocks until the yielded event is set.

    Commits started meanwhile queue up behind it and go together into the next batch. The
    spool's fdatasync call number `fail_call` (counting from 1; the leader makes call 1)
    raises an I/O error.
    """
    release = threading.Event()
    entered = threading.Event()
    calls = {"n": 0}
    lock = threading.Lock()

    def fdatasync(fd: int) -> None:
        with lock:
            calls["n"] += 1
            n = calls["n"]
        if n == 1:
            entered.set()
            assert release.wait(10)
        if n == fail_call:
            raise OSError(5, "Input/output error")
        os.fdatasync(fd)

    patch_os(monkeypatch, fdatasync=fdatasync)
    leader = Committer(spool, *prepare(spool, b"leader\r\n"))
    leader.start()
    assert entered.wait(10)
    try:
        yield release
    finally:
        release.set()
        leader.join(10)
    assert leader.error is None


def commit_together(
    spool: Spool, monkeypatch: pytest.MonkeyPatch, messages: list[tuple[bytes, list[str]]]
) -> list[Envelope]:
    """Commit `messages` so that they all land in one batch (after a leader's batch)."""
    prepared = [prepare(spool, data, rcpts) for data, rcpts in messages]
    committers = [Committer(spool, w, e) for w, e in prepared]
    with leader_held(spool, monkeypatch):
        for c in committers:
            c.start()
        wait_until(lambda: len(spool._pending) == len(committers))
    for c in committers:
        c.join(10)
        assert c.error is None
    monkeypatch.undo()
    starts = {batch_start(spool, e) for _w, e in prepared}
    assert spool.batches_written == 2, "the messages were meant to share one batch"
    assert len(starts) == len(prepared)
    return [e for _w, e in prepared]


def half_a_write() -> Callable[[int, Any, int], int]:
    """`os.pwrite` that, on its first call, writes half and then fails (a full disk)."""
    calls = {"n": 0}

    def pwrite(fd: int, data: Any, offset: int) -> int:
        calls["n"] += 1
        if calls["n"] == 1:
            os.pwrite(fd, bytes(data)[: len(data) // 2], offset)
            raise OSError(28, "No space left on device")
        return os.pwrite(fd, data, offset)

    return pwrite
