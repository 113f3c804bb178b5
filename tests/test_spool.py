"""The edge spool: group commit, crash recovery, the per-batch outcome log."""

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

import edge.spool
from edge.spool import Envelope, Spool, SpoolWriter, new_queue_id


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


def names(path: Path) -> set[str]:
    return {p.name for p in path.iterdir()}


def batch_files(spool: Spool) -> list[Path]:
    return sorted(spool.queue.glob("*.batch"))


def log_lines(spool: Spool, qid: str) -> list[dict[str, Any]]:
    path = spool.queue / f"{spool.entry(qid).batch}.log"
    return [json.loads(line) for line in path.read_text().splitlines()]


class _PatchedOS(ModuleType):
    """`os` as `edge.spool` sees it, with `fsync` replaced (the rest is the real module)."""

    def __init__(self, fsync: Callable[[int], None]) -> None:
        super().__init__("os")
        self.fsync = fsync

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)


def patch_fsync(monkeypatch: pytest.MonkeyPatch, fsync: Callable[[int], None]) -> None:
    monkeypatch.setattr(edge.spool, "os", _PatchedOS(fsync))


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
    """A first commit whose data fsync blocks until the yielded event is set.

    Commits started meanwhile queue up behind it and go together into the next batch. The
    spool's fsync call number `fail_call` (counting from 1; the leader makes calls 1 and 2)
    raises an I/O error.
    """
    release = threading.Event()
    entered = threading.Event()
    calls = {"n": 0}
    lock = threading.Lock()

    def fsync(fd: int) -> None:
        with lock:
            calls["n"] += 1
            first = calls["n"] == 1
            n = calls["n"]
        if first:
            entered.set()
            assert release.wait(10)
        if n == fail_call:
            raise OSError(5, "Input/output error")
        os.fsync(fd)

    patch_fsync(monkeypatch, fsync)
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
    batches = {spool.entry(e.qid).batch for _w, e in prepared}
    assert len(batches) == 1, "the messages were meant to share one batch"
    return [e for _w, e in prepared]


def test_queue_ids_are_unique_and_sortable() -> None:
    ids = [new_queue_id() for _ in range(200)]
    assert len(set(ids)) == len(ids)
    assert all(i.isalnum() for i in ids)
    # The time prefix sorts in creation order.
    prefixes = [i[:14] for i in ids]
    assert prefixes == sorted(prefixes)


def test_commit_writes_data_and_envelope_and_empties_tmp(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    data = b"Subject: hi\r\n\r\nline one\r\nline two\r\n"
    env = commit(spool, data, ["a@example.test", "b@example.test"])

    assert names(spool.tmp) == set()
    [batch] = batch_files(spool)
    assert names(spool.queue) == {batch.name}  # no log until something is recorded
    assert spool.read(env.qid) == data
    assert data in batch.read_bytes()
    entry = spool.entry(env.qid)
    assert entry.envelope == env
    assert entry.batch == batch.stem
    assert entry.envelope.size == len(data)
    assert entry.envelope.recipients == ["a@example.test", "b@example.test"]
    assert entry.pending == ["a@example.test", "b@example.test"]
    assert spool.queued_ids() == [env.qid]
    assert [e.envelope.qid for e in spool.entries()] == [env.qid]
    assert (spool.batches_written, spool.messages_committed) == (1, 1)

    # What a restart reads back is the same envelope and the same bytes.
    again = Spool(tmp_path / "spool")
    [loaded] = again.load()
    assert loaded == env
    assert loaded.size == len(data)
    assert again.read(env.qid) == data


def test_writer_keeps_small_data_in_memory_and_spills_large_data_to_tmp(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    small = spool.writer()
    small.write(b"partial")
    assert names(spool.tmp) == set() and names(spool.queue) == set()
    small.abort()

    large = spool.writer()
    chunk = b"x" * 1000 + b"\r\n"
    for _ in range(SpoolWriter.SPILL_SIZE // len(chunk) + 2):
        large.write(chunk)
    assert large.spilled
    assert names(spool.tmp) == {f"{large.qid}.data"}
    assert names(spool.queue) == set()
    large.abort()
    assert names(spool.tmp) == set()
    assert spool.load() == []


def test_large_message_is_committed_whole(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    data = b"Subject: big\r\n\r\n" + (b"y" * 998 + b"\r\n") * 300
    env = commit(spool, data)
    assert names(spool.tmp) == set()
    assert Spool(tmp_path).load()[0].qid == env.qid
    assert spool.read(env.qid) == data


def test_envelope_json_round_trip() -> None:
    env = Envelope("Q1", "s@x", ["a@y", "b@y"], 12.5, "192.0.2.1", "h", 42, "dsn", {"k": "v"})
    back = Envelope.from_json(env.to_json())
    assert back == env
    assert back.kind == "dsn"
    assert Envelope("Q2", "s@x", ["a@y"], 1.0).kind == "inbound"


def test_load_after_crash_discards_unacknowledged_and_keeps_committed(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    spool = Spool(root)
    kept = commit(spool, b"kept\r\n")
    [kept_batch] = batch_files(spool)

    # Crash states: data still being received, a batch torn while being written (never
    # renamed, so never acknowledged), and a log left over from a batch that is gone.
    receiving = spool.writer()
    receiving.write(b"half a message")
    torn_env = Envelope("0000000000000100AAAAAAAA", "s@x", ["a@example.test"], 1.0).to_json()
    (spool.tmp / "B0000000000000100AAAAAAAA.batch.tmp").write_bytes(
        b"TPSPOOL1\nTPREC %d 100\n" % len(torn_env) + torn_env + b"never ackno"
    )
    (spool.queue / "B0000000000000050CCCCCCCC.log").write_bytes(b'{"q": "x", "r": "y"}\n')

    restarted = Spool(root)
    envelopes = restarted.load()

    assert [e.qid for e in envelopes] == [kept.qid]
    assert envelopes[0] == kept
    assert names(restarted.tmp) == set()
    assert names(restarted.queue) == {kept_batch.name}
    assert restarted.read(kept.qid) == b"kept\r\n"
    assert restarted.queued_ids() == [kept.qid]


def test_load_returns_envelopes_in_arrival_order(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    # Queue ids are created in this order, but the arrival times say otherwise.
    late = commit(spool, b"late\r\n", received_at=300.0)
    early = commit(spool, b"early\r\n", received_at=100.0)
    middle = commit(spool, b"middle\r\n", received_at=200.0)
    # Same arrival time: the (time-sortable) queue id decides.
    tie_first = commit(spool, b"tie1\r\n", received_at=400.0)
    tie_second = commit(spool, b"tie2\r\n", received_at=400.0)

    order = [e.qid for e in Spool(tmp_path).load()]
    assert order == [early.qid, middle.qid, late.qid, tie_first.qid, tie_second.qid]


def test_mark_finished_and_finished_round_trip(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    env = commit(spool, recipients=["a@x.test", "b@x.test", "c@x.test"])
    assert spool.finished(env.qid) == set()

    spool.mark_finished(env.qid, {"a@x.test": "delivered"})
    spool.mark_finished(env.qid, {"b@x.test": "bounced: 550 5.1.1 no such user"})

    assert spool.finished(env.qid) == {"a@x.test", "b@x.test"}
    assert spool.entry(env.qid).pending == ["c@x.test"]
    assert [(x["q"], x["r"], x["o"]) for x in log_lines(spool, env.qid)] == [
        (env.qid, "a@x.test", "delivered"),
        (env.qid, "b@x.test", "bounced: 550 5.1.1 no such user"),
    ]
    # Not all finished: still handed back on start, with what is finished remembered.
    restarted = Spool(tmp_path)
    assert [e.qid for e in restarted.load()] == [env.qid]
    assert restarted.entry(env.qid).outcomes == {
        "a@x.test": "delivered",
        "b@x.test": "bounced: 550 5.1.1 no such user",
    }
    assert restarted.finished(env.qid) == {"a@x.test", "b@x.test"}


def test_held_and_warned_flags_survive_a_restart(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    env = commit(spool, recipients=["a@x.test"])
    other = commit(spool, recipients=["a@x.test"])
    spool.set_held(env.qid, True)
    spool.set_warned(env.qid)

    restarted = Spool(tmp_path)
    restarted.load()
    assert (restarted.entry(env.qid).held, restarted.entry(env.qid).warned) == (True, True)
    assert (restarted.entry(other.qid).held, restarted.entry(other.qid).warned) == (False, False)

    restarted.set_held(env.qid, False)  # released
    again = Spool(tmp_path)
    again.load()
    assert (again.entry(env.qid).held, again.entry(env.qid).warned) == (False, True)


def test_torn_last_line_of_the_log_is_ignored(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    env = commit(spool, recipients=["a@x.test", "b@x.test"])
    spool.mark_finished(env.qid, {"a@x.test": "delivered"})
    with open(spool.queue / f"{spool.entry(env.qid).batch}.log", "a") as fh:
        fh.write(f'{{"q": "{env.qid}", "r": "b@x.test", "o": "deliv')  # crash mid-append

    assert spool.finished(env.qid) == {"a@x.test"}
    restarted = Spool(tmp_path)
    loaded = restarted.load()
    assert [e.qid for e in loaded] == [env.qid]  # b@x.test is retried
    assert restarted.finished(env.qid) == {"a@x.test"}
    assert restarted.entry(env.qid).pending == ["b@x.test"]


def test_record_appended_after_a_torn_line_is_not_lost(tmp_path: Path) -> None:
    """The next append must not be glued to a torn last line (and lost with it)."""
    spool = Spool(tmp_path)
    env = commit(spool, recipients=["a@x.test", "b@x.test", "c@x.test"])
    spool.mark_finished(env.qid, {"a@x.test": "delivered"})
    with open(spool.queue / f"{spool.entry(env.qid).batch}.log", "a") as fh:
        fh.write(f'{{"q": "{env.qid}", "r": "b@x.test", "o": "deliv')  # crash mid-append

    # After the restart, the delivery of c@x.test is recorded.
    restarted = Spool(tmp_path)
    restarted.load()
    restarted.mark_finished(env.qid, {"c@x.test": "delivered"})

    final = Spool(tmp_path)
    assert [e.qid for e in final.load()] == [env.qid]
    assert final.finished(env.qid) == {"a@x.test", "c@x.test"}


def test_load_drops_finished_messages_and_deletes_an_empty_batch(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    done = commit(spool, recipients=["a@x.test", "b@x.test"])
    pending = commit(spool, recipients=["a@x.test"])
    done_batch, pending_batch = spool.entry(done.qid).batch, spool.entry(pending.qid).batch
    assert done_batch != pending_batch
    spool.mark_finished(done.qid, {"a@x.test": "delivered"})
    spool.mark_finished(done.qid, {"b@x.test": "bounced: 550 gone"})
    assert (spool.queue / f"{done_batch}.log").exists()

    restarted = Spool(tmp_path)
    loaded = restarted.load()

    assert [e.qid for e in loaded] == [pending.qid]
    assert restarted.queued_ids() == [pending.qid]
    assert names(spool.queue) == {f"{pending_batch}.batch"}


def test_load_keeps_a_batch_with_one_unfinished_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = Spool(tmp_path)
    done, pending = commit_together(
        spool, monkeypatch, [(b"done\r\n", ["a@x.test"]), (b"pending\r\n", ["a@x.test"])]
    )
    batch = spool.entry(done.qid).batch
    spool.mark_finished(done.qid, {"a@x.test": "delivered"})

    restarted = Spool(tmp_path)
    loaded = restarted.load()

    assert pending.qid in [e.qid for e in loaded]
    assert done.qid not in [e.qid for e in loaded]
    assert done.qid not in restarted.queued_ids()
    assert {f"{batch}.batch", f"{batch}.log"} <= names(spool.queue)
    assert restarted.read(pending.qid) == b"pending\r\n"


def test_remove_deletes_the_batch_only_when_all_its_messages_are_gone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = Spool(tmp_path)
    first, second = commit_together(
        spool, monkeypatch, [(b"one\r\n", ["a@x.test"]), (b"two\r\n", ["a@x.test"])]
    )
    batch = spool.entry(first.qid).batch
    leader_qids = [q for q in spool.queued_ids() if q not in (first.qid, second.qid)]
    spool.mark_finished(first.qid, {"a@x.test": "delivered"})

    spool.remove(first.qid)

    assert spool.queued_ids() == sorted([*leader_qids, second.qid])
    assert spool.finished(first.qid) == set()
    assert {f"{batch}.batch", f"{batch}.log"} <= names(spool.queue)
    assert spool.read(second.qid) == b"two\r\n"  # the batch is still readable
    spool.remove(first.qid)  # idempotent
    assert (spool.queue / f"{batch}.batch").exists()

    spool.mark_finished(second.qid, {"a@x.test": "delivered"})
    spool.remove(second.qid)

    assert not (spool.queue / f"{batch}.batch").exists()
    assert not (spool.queue / f"{batch}.log").exists()
    assert sorted(e.qid for e in Spool(tmp_path).load()) == leader_qids


def test_remove_of_a_single_message_deletes_its_files(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    gone = commit(spool, recipients=["a@x.test"])
    other = commit(spool, recipients=["a@x.test"])
    other_batch = spool.entry(other.qid).batch
    spool.mark_finished(gone.qid, {"a@x.test": "delivered"})

    spool.remove(gone.qid)

    assert spool.queued_ids() == [other.qid]
    assert names(spool.queue) == {f"{other_batch}.batch"}
    assert spool.finished(gone.qid) == set()
    spool.remove(gone.qid)  # idempotent
    assert [e.qid for e in Spool(tmp_path).load()] == [other.qid]


def test_group_commit_shares_batches_between_threads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A disk whose fsync takes a while (as real disks do): commits arriving meanwhile wait
    # for the next batch instead of each paying for an fsync of their own.
    def slow_fsync(fd: int) -> None:
        time.sleep(0.02)
        os.fsync(fd)

    patch_fsync(monkeypatch, slow_fsync)
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
    assert len(batch_files(spool)) == spool.batches_written
    assert names(spool.tmp) == set()
    assert sorted(spool.queued_ids()) == sorted(e.qid for _w, e in prepared)

    restarted = Spool(tmp_path)
    loaded = {e.qid: e for e in restarted.load()}
    assert set(loaded) == {e.qid for _w, e in prepared}
    for (_w, env), data in zip(prepared, payloads, strict=True):
        assert loaded[env.qid] == env
        assert restarted.read(env.qid) == data


@pytest.mark.parametrize(
    "fail_call",
    [
        pytest.param(3, id="batch-data-fsync"),
        pytest.param(
            4,
            id="queue-dir-fsync",
        ),
    ],
)
def test_failed_batch_fails_every_commit_in_it_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fail_call: int
) -> None:
    spool = Spool(tmp_path)
    prepared = [prepare(spool, b"doomed %d\r\n" % i, ["a@x.test"]) for i in range(3)]
    committers = [Committer(spool, w, e) for w, e in prepared]
    # The leader's own batch goes through; the one after it (all three messages) fails.
    with leader_held(spool, monkeypatch, fail_call):
        for c in committers:
            c.start()
        wait_until(lambda: len(spool._pending) == len(committers))
    for c in committers:
        c.join(10)

    assert all(isinstance(c.error, OSError) for c in committers), [c.error for c in committers]
    [leader_qid] = spool.queued_ids()
    assert spool.batches_written == 1
    assert [p.name for p in batch_files(spool)] == [f"{spool.entry(leader_qid).batch}.batch"]
    assert not list(spool.tmp.glob("*.batch.tmp"))
    assert not list(spool.queue.glob("*.tmp"))

    # The spool goes on working, and a restart knows nothing of the failed messages.
    monkeypatch.undo()
    after = commit(spool, b"after\r\n")
    restarted = Spool(tmp_path)
    assert sorted(e.qid for e in restarted.load()) == sorted([leader_qid, after.qid])
    assert restarted.read(leader_qid) == b"leader\r\n"
    assert restarted.read(after.qid) == b"after\r\n"
