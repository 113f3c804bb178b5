"""The sync process (`edge.spool.syncer`, `edge.spool.synchild`) and commits made durable through
it."""

from __future__ import annotations

import errno
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import defer, task

from edge.spool import synchild
from edge.spool.committer import Committer
from edge.spool.durability import QUIET_BATCHES, SyncHereWhenQuiet
from edge.spool.scan import recoverable
from edge.spool.segments import BLOCK
from edge.spool.spool import Envelope, Spool, SpoolWriter
from edge.spool.syncer import Syncer
from tests.spoolkit import wait_until


def before_fdatasync(monkeypatch: pytest.MonkeyPatch, first: Callable[[int], None]) -> None:
    """Every `os.fdatasync(fd)` calls `first(fd)` (which may record, wait or raise), then
    the real one."""
    real = os.fdatasync

    def fdatasync(fd: int) -> None:
        first(fd)
        real(fd)

    monkeypatch.setattr(os, "fdatasync", fdatasync)


def _serve(requests: bytes, monkeypatch: pytest.MonkeyPatch) -> tuple[bytes, list[int]]:
    synced: list[int] = []
    before_fdatasync(monkeypatch, synced.append)
    req_r, req_w = os.pipe()
    ans_r, ans_w = os.pipe()
    os.write(req_w, requests)
    os.close(req_w)
    synchild.serve(req_r, ans_w)
    os.close(req_r)
    os.close(ans_w)
    with os.fdopen(ans_r, "rb") as answers:
        return answers.read(), synced


def test_the_child_answers_each_request_in_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = tmp_path / "a.seg", tmp_path / "b.seg"
    a.write_bytes(b"x")
    b.write_bytes(b"y")
    missing = tmp_path / "missing.seg"
    lines = b"".join(os.fsencode(p) + b"\n" for p in (a, a, missing, b, a))
    answers, synced = _serve(lines, monkeypatch)
    assert answers.split(b"\n")[:-1] == [b"0", b"0", b"%d" % errno.ENOENT, b"0", b"0"]
    assert len(synced) == 4  # the missing file was never synced, every other request was


def test_the_child_ends_with_its_input(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    answers, synced = _serve(b"", monkeypatch)
    assert answers == b"" and synced == []


def test_sync_through_a_real_child(tmp_path: Path, in_reactor: Any) -> None:
    syncer = Syncer(in_reactor.reactor)
    seg = tmp_path / "s.seg"
    seg.write_bytes(b"data")
    assert in_reactor(lambda: syncer.sync(seg)) is None
    with pytest.raises(FileNotFoundError):
        in_reactor(lambda: syncer.sync(tmp_path / "nothing.seg"))
    assert syncer.started == 1
    in_reactor(syncer.stop)


def _running(tmp_path: Path, in_reactor: Any) -> tuple[Syncer, Path, int]:
    """A syncer whose child runs (it has synced a file once): the syncer, the file, its pid."""
    syncer = Syncer(in_reactor.reactor)
    seg = tmp_path / "s.seg"
    seg.write_bytes(b"data")
    in_reactor(lambda: syncer.sync(seg))
    child = syncer._child
    assert child is not None and child.transport is not None
    return syncer, seg, child.transport.pid


def test_a_child_that_dies_fails_what_waits_and_is_replaced(
    tmp_path: Path, in_reactor: Any
) -> None:
    syncer, seg, pid = _running(tmp_path, in_reactor)

    def kill_then_ask() -> defer.Deferred[None]:
        os.kill(pid, signal.SIGSTOP)  # it cannot answer what comes now
        waiting = syncer.sync(seg)
        os.kill(pid, signal.SIGKILL)
        return waiting

    with pytest.raises(OSError, match="ended before answering"):
        in_reactor(kill_then_ask)
    wait_until(lambda: syncer._child is None)
    assert in_reactor(lambda: syncer.sync(seg)) is None
    assert syncer.started == 2
    in_reactor(syncer.stop)


class CountingSyncer(Syncer):
    def __init__(self, reactor: Any, fail: bool = False) -> None:
        super().__init__(reactor)
        self.paths: list[Path] = []
        self.fail = fail

    def sync(self, path: Path) -> defer.Deferred[None]:
        self.paths.append(path)
        if self.fail:
            return defer.fail(OSError(errno.EIO, "fdatasync failed"))
        return super().sync(path)


def _commit(spool: Spool, committer: Committer, data: bytes, n: int = 1) -> Any:
    waits = []
    for i in range(n):
        writer = spool.writer()
        writer.write(data)
        waits.append(committer.commit(writer, Envelope(writer.qid, "a@b.test", ["c@d.test"], i)))
    return defer.DeferredList(waits, consumeErrors=True)


def test_small_batches_after_the_first_go_through_the_sync_process(
    tmp_path: Path, in_reactor: Any
) -> None:
    spool = Spool(tmp_path)
    syncer = CountingSyncer(in_reactor.reactor)
    committer = Committer(spool, in_reactor.reactor, syncer)
    message = b"Subject: x\r\n\r\nbody\r\n"
    for _ in range(3):
        results = in_reactor(_commit, spool, committer, message)
        assert all(ok for ok, _ in results)
    # The first batch starts the segment in the committer's thread; the next two are
    # written from the reactor and synced by the child.
    assert len(syncer.paths) == 2 and len(set(syncer.paths)) == 1
    assert syncer.paths[0].suffix == ".seg"
    assert len(spool.queued_ids()) == 3
    assert len(recoverable(tmp_path)) == 3
    assert [spool.read(q) for q in spool.queued_ids()] == [message] * 3
    in_reactor(syncer.stop)


def test_a_full_segment_gives_way_to_the_next_one_from_the_reactor(
    tmp_path: Path, in_reactor: Any
) -> None:
    spool = Spool(tmp_path, segment_size=4 * BLOCK)  # four one-message batches per segment
    syncer = CountingSyncer(in_reactor.reactor)
    committer = Committer(spool, in_reactor.reactor, syncer)
    message = b"Subject: x\r\n\r\nbody\r\n"
    for _ in range(12):
        results = in_reactor(_commit, spool, committer, message)
        assert all(ok for ok, _ in results)
        wait_until(lambda: not spool.wants_spare())  # the next segment, made in the thread
    # Only the very first batch took the committer's thread (no segment yet); each later
    # one, the first of every new segment too, went through the sync process.
    assert len(syncer.paths) == 11
    segments_used = {p.name for p in syncer.paths}
    assert len(segments_used) == 3
    assert {e.batch for e in spool.entries()} == {p.stem for p in syncer.paths}
    assert [spool.read(q) for q in spool.queued_ids()] == [message] * 12
    assert len(recoverable(tmp_path)) == 12
    in_reactor(syncer.stop)


def test_spilled_data_takes_the_committers_thread(tmp_path: Path, in_reactor: Any) -> None:
    spool = Spool(tmp_path)
    syncer = CountingSyncer(in_reactor.reactor)
    committer = Committer(spool, in_reactor.reactor, syncer)
    in_reactor(_commit, spool, committer, b"first\r\n")
    big = b"x" * (SpoolWriter.SPILL_SIZE + 10) + b"\r\n"
    results = in_reactor(_commit, spool, committer, big)
    assert all(ok for ok, _ in results)
    assert syncer.paths == []
    assert sorted(len(spool.read(q)) for q in spool.queued_ids()) == [7, len(big)]
    in_reactor(syncer.stop)


def test_a_failed_sync_fails_the_batch_and_leaves_nothing(tmp_path: Path, in_reactor: Any) -> None:
    spool = Spool(tmp_path)
    syncer = CountingSyncer(in_reactor.reactor, fail=True)
    committer = Committer(spool, in_reactor.reactor, syncer)
    in_reactor(_commit, spool, committer, b"kept\r\n")
    results = in_reactor(_commit, spool, committer, b"lost\r\n")
    assert len(syncer.paths) == 1 and [ok for ok, _ in results] == [False]
    assert results[0][1].check(OSError)
    # Nothing of the failed batch can come back; the one before it is untouched.
    assert [spool.read(e.envelope.qid) for e in recoverable(tmp_path)] == [b"kept\r\n"]
    # Its segment takes nothing more: the next batch starts another, in the thread.
    syncer.fail = False
    results = in_reactor(_commit, spool, committer, b"later\r\n")
    assert all(ok for ok, _ in results) and len(syncer.paths) == 1
    segments = {e.batch for e in recoverable(tmp_path)}
    assert len(segments) == 2
    assert len(spool.queued_ids()) == 2
    in_reactor(syncer.stop)


def test_a_failed_hand_over_undoes_a_synced_batch(tmp_path: Path, in_reactor: Any) -> None:
    handed: list[str] = []

    def hand_over(name: str, placed: list[Any]) -> None:
        if len(handed) >= 1:
            raise OSError(errno.EPIPE, "the edge is gone")
        handed.append(name)

    spool = Spool(tmp_path, index=False, on_commit=hand_over)
    syncer = CountingSyncer(in_reactor.reactor)
    committer = Committer(spool, in_reactor.reactor, syncer)
    assert all(ok for ok, _ in in_reactor(_commit, spool, committer, b"one\r\n"))
    results = in_reactor(_commit, spool, committer, b"two\r\n")
    assert syncer.paths and [ok for ok, _ in results] == [False]
    assert [e.envelope.received_at for e in recoverable(tmp_path)] == [0]
    in_reactor(syncer.stop)


def test_work_while_syncing_runs_once_per_batch_and_its_faults_stay_its_own(
    tmp_path: Path, in_reactor: Any
) -> None:
    spool = Spool(tmp_path)
    syncer = CountingSyncer(in_reactor.reactor)
    seen: list[int] = []

    def work() -> None:
        seen.append(len(syncer.paths))
        raise RuntimeError("a fault in the work done meanwhile")

    committer = Committer(spool, in_reactor.reactor, syncer, work)
    message = b"Subject: x\r\n\r\nbody\r\n"
    for _ in range(3):
        results = in_reactor(_commit, spool, committer, message)
        assert all(ok for ok, _ in results)
    # Called once per batch, after the batch went to its sync: the first to the
    # committer's thread, the next two to the sync process (already asked each time).
    assert seen == [0, 1, 2]
    assert len(recoverable(tmp_path)) == 3
    in_reactor(syncer.stop)


def _quiet(in_reactor: Any, spool: Spool, committer: Committer, data: bytes) -> None:
    """Commit lone messages, one after the other, until the next one finds the spool quiet:
    the first makes the segment (in the thread), the others go through the sync process."""
    for _ in range(QUIET_BATCHES - 1):
        assert all(ok for ok, _ in in_reactor(_commit, spool, committer, data))


def test_while_the_spool_is_quiet_the_reactor_syncs_small_batches_itself(
    tmp_path: Path, in_reactor: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = Spool(tmp_path)
    syncer = CountingSyncer(in_reactor.reactor)
    events: list[str] = []
    before_fdatasync(monkeypatch, lambda fd: events.append("sync"))

    def work() -> None:  # the work meant for the time of a sync
        events.append("work")

    durability = SyncHereWhenQuiet(spool, in_reactor.reactor, syncer)
    committer = Committer(spool, in_reactor.reactor, while_syncing=work, durability=durability)
    message = b"Subject: x\r\n\r\nbody\r\n"
    _quiet(in_reactor, spool, committer, message)
    before = len(syncer.paths)
    assert durability.synced_here == 0 and before == QUIET_BATCHES - 2
    writer = spool.writer()
    writer.write(message)
    events.clear()

    def commit() -> defer.Deferred[tuple[bool, list[str]]]:
        d = committer.commit(writer, Envelope(writer.qid, "a@b.test", ["c@d.test"], 1))
        return defer.succeed((d.called, list(events)))

    # Durable before `commit` returned: no sync process asked, no turn of the reactor; the
    # work meant for a sync's time is left for the next turn, once.
    assert in_reactor(commit) == (True, ["sync"])
    assert durability.synced_here == 1 and len(syncer.paths) == before
    in_reactor(lambda: task.deferLater(in_reactor.reactor, 0, lambda: None))
    assert events == ["sync", "work"]
    assert len(recoverable(tmp_path)) == QUIET_BATCHES
    other = spool.writer()  # another message is being received: the sync process again
    events.clear()
    assert all(ok for ok, _ in in_reactor(_commit, spool, committer, message))
    assert durability.synced_here == 1 and len(syncer.paths) == before + 1
    assert events == ["work"]  # (the sync is the child's, in another process)
    other.abort()  # quiet again, once it has been so for long enough
    _quiet(in_reactor, spool, committer, message)
    assert durability.synced_here == 1 and len(syncer.paths) == before + QUIET_BATCHES
    assert all(ok for ok, _ in in_reactor(_commit, spool, committer, message))
    assert durability.synced_here == 2 and len(syncer.paths) == before + QUIET_BATCHES

    def two_at_once() -> defer.Deferred[Any]:
        writers = [spool.writer(), spool.writer()]
        for w in writers:
            w.write(message)
        envelopes = [Envelope(w.qid, "a@b.test", ["c@d.test"], 1) for w in writers]
        waits = [committer.commit(w, e) for w, e in zip(writers, envelopes, strict=True)]
        return defer.DeferredList(waits, consumeErrors=True)

    assert all(ok for ok, _ in in_reactor(two_at_once))  # two received at once: not quiet
    assert durability.synced_here == 2 and len(syncer.paths) == before + QUIET_BATCHES + 2
    assert [spool.read(q) for q in spool.queued_ids()] == [message] * (2 * QUIET_BATCHES + 3)
    in_reactor(syncer.stop)


def test_a_slow_sync_in_the_reactor_sends_the_next_ones_to_the_sync_process(
    tmp_path: Path, in_reactor: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from edge.spool import committer as committing

    spool = Spool(tmp_path)
    syncer = CountingSyncer(in_reactor.reactor)
    clock = task.Clock()
    durability = SyncHereWhenQuiet(spool, in_reactor.reactor, syncer, clock=clock)
    committer = Committer(spool, in_reactor.reactor, durability=durability)
    message = b"Subject: x\r\n\r\nbody\r\n"
    _quiet(in_reactor, spool, committer, message)
    before = len(syncer.paths)
    slow = [True]

    def stall(fd: int) -> None:
        if slow:
            slow.pop()
            time.sleep(committing.SLOW_SYNC * 2)  # a disk that stalls, once

    before_fdatasync(monkeypatch, stall)
    for _ in range(3):
        assert all(ok for ok, _ in in_reactor(_commit, spool, committer, message))
    # The slow one was still the reactor's; the two after it went to the sync process.
    assert durability.synced_here == 1 and len(syncer.paths) == before + 2
    clock.advance(committing.SLOW_PAUSE - 0.1)
    assert all(ok for ok, _ in in_reactor(_commit, spool, committer, message))
    assert durability.synced_here == 1 and len(syncer.paths) == before + 3
    clock.advance(0.2)  # the pause is over
    assert all(ok for ok, _ in in_reactor(_commit, spool, committer, message))
    assert durability.synced_here == 2 and len(syncer.paths) == before + 3
    assert len(recoverable(tmp_path)) == QUIET_BATCHES + 4
    in_reactor(syncer.stop)


def test_a_failed_sync_in_the_reactor_fails_the_batch_and_leaves_nothing(
    tmp_path: Path, in_reactor: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = Spool(tmp_path)
    durability = SyncHereWhenQuiet(spool, in_reactor.reactor, CountingSyncer(in_reactor.reactor))
    committer = Committer(spool, in_reactor.reactor, durability=durability)
    _quiet(in_reactor, spool, committer, b"kept\r\n")
    failures = [OSError(errno.EIO, "the disk said no")]

    def fail_once(fd: int) -> None:
        if failures:
            raise failures.pop()

    before_fdatasync(monkeypatch, fail_once)
    results = in_reactor(_commit, spool, committer, b"lost\r\n")
    assert [ok for ok, _ in results] == [False] and results[0][1].check(OSError)
    assert durability.synced_here == 1
    kept = [spool.read(e.envelope.qid) for e in recoverable(tmp_path)]
    assert kept == [b"kept\r\n"] * (QUIET_BATCHES - 1)
    assert all(ok for ok, _ in in_reactor(_commit, spool, committer, b"later\r\n"))
    assert len({e.batch for e in recoverable(tmp_path)}) == 2  # the failed segment is done
    assert len(spool.queued_ids()) == QUIET_BATCHES


def test_stop_waits_for_what_the_child_was_asked(tmp_path: Path, in_reactor: Any) -> None:
    syncer, seg, _pid = _running(tmp_path, in_reactor)
    order: list[str] = []

    def ask_then_stop() -> defer.Deferred[None]:
        syncer.sync(seg).addCallback(lambda _: order.append("synced"))
        return syncer.stop().addCallback(lambda _: order.append("stopped"))

    in_reactor(ask_then_stop)
    assert order == ["synced", "stopped"]
    assert syncer._child is None
    assert in_reactor(syncer.stop) is None  # nothing runs: at once


def test_stop_kills_a_child_that_does_not_answer(
    tmp_path: Path, in_reactor: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("edge.spool.syncer.STOP_WAIT", 0.3)
    syncer, seg, pid = _running(tmp_path, in_reactor)
    os.kill(pid, signal.SIGSTOP)  # a child stuck in the kernel, say
    failed: list[str] = []

    def ask_then_stop() -> defer.Deferred[None]:
        syncer.sync(seg).addErrback(lambda f: failed.append(f.getErrorMessage()))
        return syncer.stop()

    in_reactor(ask_then_stop)
    assert failed == ["[Errno 5] the sync process ended before answering"]
    wait_until(lambda: not os.path.exists(f"/proc/{pid}") or _zombie(pid))


def _zombie(pid: int) -> bool:
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
