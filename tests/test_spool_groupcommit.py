"""The spool's group commit: one write and one fdatasync per batch, shared between the
threads that commit together, and a failed batch failing every commit in it."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from edge.spool.segments import BLOCK
from edge.spool.spool import Envelope, Spool, SpoolWriter
from tests.spoolkit import (
    Calls,
    Committer,
    batch_start,
    commit,
    half_a_write,
    leader_held,
    names,
    patch_os,
    prepare,
    segment_files,
    wait_until,
)


def test_each_batch_is_one_write_and_one_fdatasync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = Calls(monkeypatch, "pwrite", "fdatasync", "fsync", "rename", "open")
    spool = Spool(tmp_path)
    first = commit(spool, b"first\r\n")
    made = calls.taken()
    assert made["open"] == 2 and made["fsync"] == 2  # the segment and its directory, once
    envs = [commit(spool, b"message %d\r\n" % i + b"x" * 4000) for i in range(10)]
    assert calls.taken() == {"pwrite": 10, "fdatasync": 10, "fsync": 0, "rename": 0, "open": 0}
    assert {spool.entry(e.qid).batch for e in [first, *envs]} == {segment_files(spool)[0].stem}
    # Each batch starts on a block of its own: none rewrites an earlier batch's blocks.
    starts = [batch_start(spool, e) for e in [first, *envs]]
    assert all(s % BLOCK == 0 for s in starts) and len(set(starts)) == 11


def test_group_commit_shares_batches_between_threads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A disk whose fdatasync takes a while (as real disks do): commits arriving meanwhile
    # wait for the next batch instead of each paying for an fdatasync of their own.
    syncs = {"n": 0}

    def slow_fdatasync(fd: int) -> None:
        syncs["n"] += 1
        time.sleep(0.02)
        os.fdatasync(fd)

    patch_os(monkeypatch, fdatasync=slow_fdatasync)
    spool = Spool(tmp_path)
    n = 20
    payloads = [
        b"Subject: %d\r\n\r\n" % i + (b"line %d of message\r\n" % i) * (i * 50 + 1) + b".\r\n"
        for i in range(n)
    ]
    prepared = [prepare(spool, data, [f"r{i}@x.test"]) for i, data in enumerate(payloads)]
    barrier = threading.Barrier(n)
    errors: list[BaseException] = []

    def run(writer: SpoolWriter, env: Envelope) -> None:
        barrier.wait()
        try:
            spool.commit(writer, env)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=p) for p in prepared]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)

    assert errors == []
    assert spool.messages_committed == n
    assert 1 <= spool.batches_written < n, spool.batches_written
    assert syncs["n"] == spool.batches_written
    assert len(segment_files(spool)) == 1
    assert names(spool.tmp) == set()
    assert sorted(spool.queued_ids()) == sorted(e.qid for _w, e in prepared)

    restarted = Spool(tmp_path)
    loaded = {e.qid: e for e in restarted.load()}
    assert set(loaded) == {e.qid for _w, e in prepared}
    for (_w, env), data in zip(prepared, payloads, strict=True):
        assert loaded[env.qid] == env
        assert restarted.read(env.qid) == data


@pytest.mark.parametrize("failure", ["fdatasync", "write", "hand-over"])
def test_failed_batch_fails_every_commit_in_it_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: str
) -> None:
    def hand_over(segment: str, entries: list[Any]) -> None:
        if any(e.envelope.qid in doomed for e in entries):
            raise BrokenPipeError("the edge process is gone")

    spool = Spool(tmp_path, on_commit=hand_over if failure == "hand-over" else None)
    prepared = [prepare(spool, b"doomed %d\r\n" % i, ["a@x.test"]) for i in range(3)]
    doomed = {e.qid for _w, e in prepared}
    committers = [Committer(spool, w, e) for w, e in prepared]
    # The leader's own batch goes through; the one after it (all three messages) fails.
    with leader_held(spool, monkeypatch, 2 if failure == "fdatasync" else None):
        if failure == "write":
            patch_os(monkeypatch, fdatasync=os.fdatasync, pwrite=half_a_write())
        for c in committers:
            c.start()
        wait_until(lambda: len(spool._pending) == len(committers))
    for c in committers:
        c.join(10)

    assert all(isinstance(c.error, OSError) for c in committers), [c.error for c in committers]
    [leader_qid] = spool.queued_ids()
    assert spool.batches_written == 1
    assert [p.stem for p in segment_files(spool)] == [spool.entry(leader_qid).batch]
    assert names(spool.tmp) == set()

    # The spool goes on working, in a segment of its own, and a restart knows nothing of
    # the failed messages (written whole in all but one case).
    monkeypatch.undo()
    after = commit(spool, b"after\r\n")
    assert spool.entry(after.qid).batch != spool.entry(leader_qid).batch
    restarted = Spool(tmp_path)
    assert sorted(e.qid for e in restarted.load()) == sorted([leader_qid, after.qid])
    assert restarted.read(leader_qid) == b"leader\r\n"
    assert restarted.read(after.qid) == b"after\r\n"
