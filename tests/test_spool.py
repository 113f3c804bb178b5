"""The edge spool: commits into segments, crash recovery, the per-segment outcome log."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from edge.spool.scan import recoverable
from edge.spool.segments import BLOCK, HEADER, read_segment
from edge.spool.spool import Envelope, Spool, SpoolWriter, new_queue_id
from tests.spoolkit import (
    Calls,
    batch_start,
    commit,
    commit_together,
    finish,
    log_lines,
    names,
    prepare,
    segment_files,
    segment_of,
    small,
)


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
    [segment] = segment_files(spool)
    assert names(spool.queue) == {segment.name}  # no log until something is recorded
    assert segment.stat().st_size == spool.segment_size  # made whole, ahead of the data
    assert spool.read(env.qid) == data
    assert data in segment.read_bytes()
    entry = spool.entry(env.qid)
    assert entry.envelope == env
    assert entry.batch == segment.stem
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
    small_writer = spool.writer()
    small_writer.write(b"partial")
    assert names(spool.tmp) == set() and names(spool.queue) == set()
    small_writer.abort()

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
    [kept_segment] = segment_files(spool)

    # Crash states: data still being received, a stray file in tmp, a segment that was
    # being made (half its zeros), and a log left over from a segment that is gone.
    receiving = spool.writer()
    receiving.write(b"half a message")
    (spool.tmp / "0000000000000100AAAAAAAA.data").write_bytes(b"never ackno")
    (spool.queue / "S0000000000000100BBBBBBBB.seg").write_bytes(bytes(1000))
    (spool.queue / "S0000000000000050CCCCCCCC.log").write_bytes(b'{"q": "x", "r": "y"}\n')

    restarted = Spool(root)
    envelopes = restarted.load()

    assert [e.qid for e in envelopes] == [kept.qid]
    assert envelopes[0] == kept
    assert names(restarted.tmp) == set()
    assert names(restarted.queue) == {kept_segment.name}
    assert restarted.read(kept.qid) == b"kept\r\n"
    assert restarted.queued_ids() == [kept.qid]


@pytest.mark.parametrize("damage", ["truncated", "garbled", "half-written", "header-only"])
def test_a_torn_last_batch_is_dropped_and_earlier_ones_kept(tmp_path: Path, damage: str) -> None:
    spool = Spool(tmp_path)
    kept = [commit(spool, b"kept %d\r\n" % i) for i in range(2)]
    torn = commit(spool, b"Subject: torn\r\n\r\n" + b"t" * 9000)
    segment = segment_of(spool, torn.qid)
    entry = spool.entry(torn.qid)
    raw = bytearray(segment.read_bytes())
    # What a crash can leave of a write whose fdatasync never returned:
    if damage == "truncated":  # not all of it reached the file
        del raw[entry.offset + entry.length // 2 :]
    elif damage == "garbled":  # other bytes than were written
        raw[entry.offset + 5000] ^= 0x20
    elif damage == "half-written":  # its last blocks still zeros
        raw[entry.offset + 4096 : entry.offset + entry.length] = bytes(entry.length - 4096)
    else:  # only the first block, with the header, was written
        raw[batch_start(spool, torn) + BLOCK :] = bytes(len(raw) - batch_start(spool, torn) - BLOCK)
    segment.write_bytes(raw)

    restarted = Spool(tmp_path)
    assert [e.qid for e in restarted.load()] == [e.qid for e in kept]
    assert [restarted.read(e.qid) for e in kept] == [b"kept 0\r\n", b"kept 1\r\n"]
    assert [e.envelope.qid for e in recoverable(tmp_path)] == [e.qid for e in kept]


def test_a_checksum_mismatch_stops_the_scan(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    first, second, third = (commit(spool, b"message %d\r\n" % i) for i in range(3))
    segment = segment_of(spool, second.qid)
    raw = bytearray(segment.read_bytes())
    raw[spool.entry(second.qid).offset + 3] ^= 0x01  # "message" -> "messafe": lengths intact
    segment.write_bytes(raw)

    scan = read_segment(segment)
    assert scan.damaged_at == batch_start(spool, second)
    restarted = Spool(tmp_path)
    # Nothing after the first record that is not valid is read, not even whole batches.
    assert [e.qid for e in restarted.load()] == [first.qid]
    assert restarted.read(first.qid) == b"message 0\r\n"


def test_a_batch_counts_only_whole(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    before = commit(spool, b"before\r\n")
    items = [prepare(spool, b"together %d\r\n" % i) for i in range(3)]
    spool.commit_batch(items)
    together = [env for _w, env in items]
    starts = [batch_start(spool, e) for e in together]
    assert starts[0] == BLOCK and BLOCK < starts[1] < starts[2] < 2 * BLOCK
    # The batch's last record torn: its first two, though intact, were never acknowledged.
    segment = segment_of(spool, together[2].qid)
    raw = bytearray(segment.read_bytes())
    raw[spool.entry(together[2].qid).offset] ^= 0xFF
    segment.write_bytes(raw)

    restarted = Spool(tmp_path)
    assert [e.qid for e in restarted.load()] == [before.qid]


def test_a_batch_larger_than_a_segment_gets_a_segment_of_its_own(tmp_path: Path) -> None:
    spool = small(tmp_path, 4)
    before = commit(spool, b"small\r\n")
    data = b"Subject: big\r\n\r\n" + (b"z" * 998 + b"\r\n") * 100  # spilled to tmp, too
    big = commit(spool, data)
    after = commit(spool, b"small again\r\n")

    own = segment_of(spool, big.qid)
    assert spool.entry(before.qid).batch == spool.entry(after.qid).batch != own.stem
    assert own.stat().st_size == HEADER.size + len(big.to_json()) + len(data)  # sized to fit
    assert spool.read(big.qid) == data
    assert names(spool.tmp) == set()
    assert sorted(e.envelope.qid for e in recoverable(tmp_path)) == sorted(
        [before.qid, big.qid, after.qid]
    )
    # Nothing more goes into it, so it goes as soon as its message is finished.
    finish(spool, big)
    assert not own.exists()
    finish(spool, before)
    assert segment_of(spool, after.qid).exists()

    restarted = Spool(tmp_path)
    assert [e.qid for e in restarted.load()] == [after.qid]
    assert restarted.read(after.qid) == b"small again\r\n"


def test_a_segment_is_deleted_only_once_sealed_and_finished(tmp_path: Path) -> None:
    spool = small(tmp_path, 3)  # three one-message batches to a segment
    a = commit(spool, b"a\r\n")
    first = segment_of(spool, a.qid)
    finish(spool, a)
    assert first.exists()  # not sealed: the next batches go into it
    b, c = commit(spool, b"b\r\n"), commit(spool, b"c\r\n")
    assert segment_of(spool, b.qid) == segment_of(spool, c.qid) == first
    d = commit(spool, b"d\r\n")  # does not fit: the first segment is sealed
    second = segment_of(spool, d.qid)
    assert second != first
    finish(spool, b)
    assert first.exists() and (spool.queue / f"{first.stem}.log").exists()  # c is not finished
    finish(spool, c)
    assert not first.exists() and not (spool.queue / f"{first.stem}.log").exists()

    # A segment whose messages are all finished goes when it is sealed.
    e, f = commit(spool, b"e\r\n"), commit(spool, b"f\r\n")
    assert segment_of(spool, e.qid) == segment_of(spool, f.qid) == second
    for env in (d, e, f):
        finish(spool, env)
    assert second.exists()
    g = commit(spool, b"g\r\n")
    assert not second.exists()
    assert [p.name for p in segment_files(spool)] == [segment_of(spool, g.qid).name]
    assert [e.qid for e in Spool(tmp_path).load()] == [g.qid]


def test_the_next_segment_is_made_ahead_once_half_the_current_is_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = small(tmp_path, 4)
    items = [prepare(spool, b"%d\r\n" % i) for i in range(5)]
    spool.commit_batch(items[:1])
    assert not spool.wants_spare()
    spool.commit_batch(items[1:2])
    assert spool.wants_spare() and len(segment_files(spool)) == 1  # left to the committer
    spool.prepare()
    assert not spool.wants_spare() and len(segment_files(spool)) == 2
    spool.prepare()  # made already
    assert len(segment_files(spool)) == 2
    spool.commit_batch(items[2:3])
    spool.commit_batch(items[3:4])  # the first segment is full
    calls = Calls(monkeypatch, "pwrite", "fdatasync", "fsync", "open")
    spool.commit_batch(items[4:5])  # goes into the one made ahead: no file made now
    assert calls.taken() == {"pwrite": 1, "fdatasync": 1, "fsync": 0, "open": 0}
    assert spool.entry(items[4][1].qid).batch != spool.entry(items[3][1].qid).batch

    # `commit`, with no committer behind it, makes the next one itself after its batch.
    threaded = small(tmp_path / "threaded", 4)
    commit(threaded, b"one\r\n")
    assert len(segment_files(threaded)) == 1
    commit(threaded, b"two\r\n")
    assert len(segment_files(threaded)) == 2 and not threaded.wants_spare()


def test_recovery_seals_segments_and_removes_an_unused_one_made_ahead(tmp_path: Path) -> None:
    spool = small(tmp_path, 4)
    first, second = commit(spool, b"first\r\n"), commit(spool, b"second\r\n")
    old = segment_of(spool, first.qid)
    assert len(segment_files(spool)) == 2  # and the next one is ready
    before = old.read_bytes()
    # The process dies here, with nothing closed.

    restarted = small(tmp_path, 4)
    assert sorted(e.qid for e in restarted.load()) == sorted([first.qid, second.qid])
    assert segment_files(restarted) == [old]  # the unused one is gone
    third = commit(restarted, b"third\r\n")
    assert segment_of(restarted, third.qid) != old  # an old segment is never appended to
    assert old.read_bytes() == before
    finish(restarted, first)
    finish(restarted, second)
    assert not old.exists()  # sealed at the start, now finished

    again = Spool(tmp_path)
    assert [e.qid for e in again.load()] == [third.qid]
    assert again.read(third.qid) == b"third\r\n"


def test_load_leaves_the_segments_this_process_writes_alone(tmp_path: Path) -> None:
    """Mail may be committed before the recovery at start has run, or while it runs."""
    before = commit(Spool(tmp_path), b"before\r\n")  # a past run's
    spool = Spool(tmp_path)
    done = commit(spool, b"done\r\n")
    current = segment_of(spool, done.qid)
    finish(spool, done)  # nothing unfinished in it, but it is not sealed

    assert [e.qid for e in spool.load()] == [before.qid]
    assert current.exists() and current.with_suffix(".log").exists()
    after = commit(spool, b"after\r\n")
    assert segment_of(spool, after.qid) == current
    finish(spool, after)
    assert current.exists()  # not sealed: this process appends to it still
    assert [e.qid for e in Spool(tmp_path).load()] == [before.qid]


def test_close_seals_the_current_segment_and_removes_the_next(tmp_path: Path) -> None:
    sealed: list[str] = []
    spool = small(tmp_path, 4, on_seal=sealed.append, on_commit=lambda b, e: None, index=False)
    first, _second = commit(spool, b"first\r\n"), commit(spool, b"second\r\n")
    assert len(segment_files(spool)) == 2
    spool.close()
    with pytest.raises(RuntimeError):
        commit(spool, b"too late\r\n")
    [segment] = segment_files(spool)
    assert sealed == [segment.stem]
    assert [e.envelope.qid for e in recoverable(tmp_path)][0] == first.qid


def test_close_with_a_batch_never_answered_gives_up_after_its_wait(tmp_path: Path) -> None:
    """A batch written for the sync process that never answered must not hang a stopping
    edge: close waits, then leaves the batch to the next start."""
    spool = Spool(tmp_path)
    commit(spool, b"first\r\n")  # the segment exists now
    writer = spool.writer()
    writer.write(b"in flight\r\n")
    unsynced = spool.write_unsynced([(writer, Envelope(writer.qid, "a@b.test", ["c@d.test"], 1))])
    assert unsynced is not None
    started = time.monotonic()
    spool.close(wait=0.2)
    assert 0.2 <= time.monotonic() - started < 5
    with pytest.raises(RuntimeError):
        commit(spool, b"too late\r\n")
    spool.synced(unsynced)  # the answer, late: still taken
    assert writer.qid in spool.queued_ids()


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


def test_load_drops_finished_messages_and_deletes_a_finished_segment(tmp_path: Path) -> None:
    spool = small(tmp_path, 1)  # one batch to a segment
    done = commit(spool, recipients=["a@x.test", "b@x.test"])
    pending = commit(spool, recipients=["a@x.test"])
    done_segment, pending_segment = segment_of(spool, done.qid), segment_of(spool, pending.qid)
    assert done_segment != pending_segment
    spool.mark_finished(done.qid, {"a@x.test": "delivered"})
    spool.mark_finished(done.qid, {"b@x.test": "bounced: 550 gone"})
    assert (spool.queue / f"{done_segment.stem}.log").exists()

    restarted = small(tmp_path, 1)
    loaded = restarted.load()

    assert [e.qid for e in loaded] == [pending.qid]
    assert restarted.queued_ids() == [pending.qid]
    assert names(spool.queue) == {pending_segment.name}


def test_load_keeps_a_segment_with_one_unfinished_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = Spool(tmp_path)
    done, pending = commit_together(
        spool, monkeypatch, [(b"done\r\n", ["a@x.test"]), (b"pending\r\n", ["a@x.test"])]
    )
    segment = spool.entry(done.qid).batch
    spool.mark_finished(done.qid, {"a@x.test": "delivered"})

    restarted = Spool(tmp_path)
    loaded = restarted.load()

    assert pending.qid in [e.qid for e in loaded]
    assert done.qid not in [e.qid for e in loaded]
    assert done.qid not in restarted.queued_ids()
    assert {f"{segment}.seg", f"{segment}.log"} <= names(spool.queue)
    assert restarted.read(pending.qid) == b"pending\r\n"


def test_remove_forgets_the_message_and_keeps_the_segment_for_the_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = Spool(tmp_path)
    first, second = commit_together(
        spool, monkeypatch, [(b"one\r\n", ["a@x.test"]), (b"two\r\n", ["a@x.test"])]
    )
    segment = segment_of(spool, first.qid)
    leader_qids = [q for q in spool.queued_ids() if q not in (first.qid, second.qid)]
    spool.mark_finished(first.qid, {"a@x.test": "delivered"})

    spool.remove(first.qid)

    assert spool.queued_ids() == sorted([*leader_qids, second.qid])
    assert spool.finished(first.qid) == set()
    assert spool.read(second.qid) == b"two\r\n"  # the segment is still readable
    spool.remove(first.qid)  # idempotent
    assert segment.exists()
    assert sorted(e.qid for e in Spool(tmp_path).load()) == sorted([*leader_qids, second.qid])


def test_recoverable_reads_without_changing_anything(tmp_path: Path) -> None:
    spool = small(tmp_path, 1)
    done, pending = commit(spool, b"done\r\n"), commit(spool, b"pending\r\n")
    spool.mark_finished(done.qid, {"a@example.test": "delivered"})
    (spool.tmp / "stray.data").write_bytes(b"x")
    before = names(spool.queue) | names(spool.tmp)
    assert [e.envelope.qid for e in recoverable(tmp_path)] == [pending.qid]
    assert names(spool.queue) | names(spool.tmp) == before


def test_envelope_json_has_every_field_as_asdict_would() -> None:
    import dataclasses

    env = Envelope("Q1", "a@b.test", ["c@d.test", "e@f.test"], 12.5, "192.0.2.1", "h.test", 42)
    env.extra["verdict"] = "accept"
    assert env.to_json() == json.dumps(dataclasses.asdict(env), sort_keys=True).encode()
    assert Envelope.from_json(env.to_json()) == env
