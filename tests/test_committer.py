"""Group commit from the reactor (`edge.spool.committer`): many messages, few batches, no loss."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.internet import defer

from edge.spool.committer import Committer
from edge.spool.segments import BLOCK
from edge.spool.spool import Envelope, Spool
from tests.spoolkit import wait_until


def _queue(spool: Spool, committer: Committer, n: int) -> defer.Deferred[Any]:
    waits = []
    for i in range(n):
        writer = spool.writer()
        writer.write(b"Subject: %d\r\n\r\nbody %d\r\n" % (i, i))
        waits.append(committer.commit(writer, Envelope(writer.qid, "a@b.test", ["c@d.test"], i)))
    return defer.DeferredList(waits, consumeErrors=True)


def test_messages_committed_together_share_batches(tmp_path: Path, in_reactor: Any) -> None:
    spool = Spool(tmp_path)
    committer = Committer(spool, in_reactor.reactor)
    results = in_reactor(_queue, spool, committer, 50)
    assert all(ok for ok, _ in results)
    # The first message starts a batch alone; the other 49 wait and go in one more.
    assert committer.batches == 2
    assert spool.batches_written == 2
    assert len(spool.queued_ids()) == 50
    recovered = Spool(tmp_path).load()
    assert sorted(e.received_at for e in recovered) == list(range(50))


def test_a_failed_batch_fails_every_message_in_it(tmp_path: Path, in_reactor: Any) -> None:
    spool = Spool(tmp_path)
    committer = Committer(spool, in_reactor.reactor)
    (tmp_path / "queue").rmdir()  # no segment can be made
    results = in_reactor(_queue, spool, committer, 5)
    assert [ok for ok, _ in results] == [False] * 5
    assert all(failure.check(FileNotFoundError) for _, failure in results)
    (tmp_path / "queue").mkdir()
    assert Spool(tmp_path).load() == []
    in_reactor(_queue, spool, committer, 3)  # and the committer carries on
    assert len(spool.queued_ids()) == 3


def test_the_next_segment_is_made_in_the_committers_thread_once_half_full(
    tmp_path: Path, in_reactor: Any
) -> None:
    spool = Spool(tmp_path, segment_size=4 * BLOCK)  # four batches of one message each
    committer = Committer(spool, in_reactor.reactor)
    in_reactor(_queue, spool, committer, 1)
    assert len(list(spool.queue.glob("*.seg"))) == 1
    in_reactor(_queue, spool, committer, 1)  # half full
    wait_until(lambda: not spool.wants_spare())
    made = {p.stem for p in spool.queue.glob("*.seg")}
    assert len(made) == 2
    assert committer.batches == 2
    for _ in range(3):  # the last of them goes into the segment made ahead
        in_reactor(_queue, spool, committer, 1)
    assert committer.batches == 5
    assert {e.batch for e in spool.entries()} == made
    assert len(Spool(tmp_path).load()) == 5
