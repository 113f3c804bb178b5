"""The edge spool: commit point, crash recovery, finished-recipient log."""

from __future__ import annotations

import json
from pathlib import Path

from edge.spool import Envelope, Spool, new_queue_id


def commit(
    spool: Spool,
    data: bytes = b"Subject: hi\r\n\r\nbody\r\n",
    recipients: list[str] | None = None,
    received_at: float = 1000.0,
) -> Envelope:
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
    spool.commit(writer, env)
    return env


def names(path: Path) -> set[str]:
    return {p.name for p in path.iterdir()}


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
    assert names(spool.queue) == {f"{env.qid}.data", f"{env.qid}.env"}
    assert spool.read(env.qid) == data
    assert spool.data_path(env.qid).read_bytes() == data
    stored = Envelope.from_json((spool.queue / f"{env.qid}.env").read_bytes())
    assert stored == env
    assert stored.size == len(data)
    assert stored.recipients == ["a@example.test", "b@example.test"]
    assert spool.queued_ids() == [env.qid]


def test_writer_data_lives_in_tmp_until_commit(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    writer = spool.writer()
    writer.write(b"partial")
    assert names(spool.tmp) == {f"{writer.qid}.data"}
    assert names(spool.queue) == set()
    writer.abort()
    assert names(spool.tmp) == set()
    assert spool.load() == []


def test_envelope_json_round_trip() -> None:
    env = Envelope("Q1", "s@x", ["a@y", "b@y"], 12.5, "192.0.2.1", "h", 42, {"k": "v"})
    assert Envelope.from_json(env.to_json()) == env


def test_load_after_crash_discards_unacknowledged_and_keeps_committed(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    spool = Spool(root)
    kept = commit(spool, b"kept\r\n")

    # Crash states: data still being received, an envelope written but not yet renamed,
    # a data file renamed without its envelope, and an envelope whose data is gone.
    receiving = spool.writer()
    receiving.write(b"half a message")
    (spool.tmp / "00000000000000DEADBEEF.env").write_bytes(b'{"half": ')
    orphan_data = "0000000000000100AAAAAAAA"
    (spool.queue / f"{orphan_data}.data").write_bytes(b"never acknowledged\r\n")
    orphan_env = Envelope(
        qid="0000000000000200BBBBBBBB",
        sender="s@x",
        recipients=["a@example.test"],
        received_at=1.0,
    )
    (spool.queue / f"{orphan_env.qid}.env").write_bytes(orphan_env.to_json())

    restarted = Spool(root)
    envelopes = restarted.load()

    assert [e.qid for e in envelopes] == [kept.qid]
    assert envelopes[0] == kept
    assert names(restarted.tmp) == set()
    assert names(restarted.queue) == {f"{kept.qid}.data", f"{kept.qid}.env"}
    assert restarted.read(kept.qid) == b"kept\r\n"


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
    lines = [json.loads(x) for x in (spool.queue / f"{env.qid}.done").read_text().splitlines()]
    assert [(x["rcpt"], x["outcome"]) for x in lines] == [
        ("a@x.test", "delivered"),
        ("b@x.test", "bounced: 550 5.1.1 no such user"),
    ]
    # Not all finished: still handed back on start.
    assert [e.qid for e in Spool(tmp_path).load()] == [env.qid]


def test_torn_last_line_of_done_file_is_ignored(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    env = commit(spool, recipients=["a@x.test", "b@x.test"])
    spool.mark_finished(env.qid, {"a@x.test": "delivered"})
    with open(spool.queue / f"{env.qid}.done", "a") as fh:
        fh.write('{"rcpt": "b@x.test", "outc')  # crash in the middle of the append

    assert spool.finished(env.qid) == {"a@x.test"}
    loaded = Spool(tmp_path).load()
    assert [e.qid for e in loaded] == [env.qid]  # b@x.test is retried


def test_record_appended_after_a_torn_line_is_not_lost(tmp_path: Path) -> None:
    """The next append must not be glued to a torn last line (and lost with it)."""
    spool = Spool(tmp_path)
    env = commit(spool, recipients=["a@x.test", "b@x.test", "c@x.test"])
    spool.mark_finished(env.qid, {"a@x.test": "delivered"})
    with open(spool.queue / f"{env.qid}.done", "a") as fh:
        fh.write('{"rcpt": "b@x.test", "outc')  # crash in the middle of the append

    # After the restart, the delivery of c@x.test is recorded.
    Spool(tmp_path).mark_finished(env.qid, {"c@x.test": "delivered"})

    assert spool.finished(env.qid) == {"a@x.test", "c@x.test"}


def test_load_removes_message_whose_recipients_are_all_finished(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    done = commit(spool, recipients=["a@x.test", "b@x.test"])
    pending = commit(spool, recipients=["a@x.test"])
    spool.mark_finished(done.qid, {"a@x.test": "delivered"})
    spool.mark_finished(done.qid, {"b@x.test": "bounced: 550 gone"})
    assert (spool.queue / f"{done.qid}.done").exists()

    loaded = Spool(tmp_path).load()

    assert [e.qid for e in loaded] == [pending.qid]
    assert names(spool.queue) == {f"{pending.qid}.data", f"{pending.qid}.env"}


def test_remove_deletes_every_file_of_the_message(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    gone = commit(spool, recipients=["a@x.test"])
    other = commit(spool, recipients=["a@x.test"])
    spool.mark_finished(gone.qid, {"a@x.test": "delivered"})

    spool.remove(gone.qid)

    assert spool.queued_ids() == [other.qid]
    assert names(spool.queue) == {f"{other.qid}.data", f"{other.qid}.env"}
    assert spool.finished(gone.qid) == set()
    spool.remove(gone.qid)  # idempotent
    assert [e.qid for e in Spool(tmp_path).load()] == [other.qid]
