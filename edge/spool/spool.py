"""The edge's durable spool: message data and envelopes, crash-consistent, group-committed.

Layout under the spool root:

    tmp/<qid>.data    data being received, beyond 64 KiB (never acknowledged; removed on
                      start); smaller messages wait in memory until committed
    queue/<seg>.seg   a segment: committed messages, appended batch after batch to a file
                      made ahead of need at a fixed size (the format: `edge.spool.segments`)
    queue/<seg>.log   append-only state of the segment's messages: recipients finished
                      (delivered, bounced, deleted), held (and why)/released, delay warned

Group commit: `commit` may be called from many worker threads at once. The first caller
becomes the leader and appends every message waiting at that moment to the current segment
as one batch: one write and one fdatasync for all of them. Callers that arrive meanwhile
wait and form the next batch. A message is acknowledged (250) only after `commit` returned
for it. A batch that does not fit in what is left of the segment seals it (nothing more goes
into it) and goes into the next one, which the committing thread made ahead (`prepare`). A
segment is deleted, with its log, once it is sealed and all its messages are finished.

On start, every segment found is sealed (a process appends only to segments it made), what
is not in a whole, valid batch is discarded, and every message with an unfinished recipient
is handed back for delivery. The blocking methods here must run in a thread pool, never in
the reactor thread; `write_unsynced` and `synced` do not block (a small batch written into
the page cache of the current segment, made durable by the caller: `edge.spool.durability`).
What the spool keeps of each message (`Envelope`, `SpoolEntry`, `SpoolWriter`) is in
`edge.spool.items`; reading a spool directory back (segments and logs) is `edge.spool.scan`.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from twisted.logger import Logger

from edge.runtime.private import private_dir
from edge.spool import segments
from edge.spool.items import QUEUE_ID_HEADER, Envelope, SpoolEntry, SpoolWriter, new_queue_id
from edge.spool.scan import scan_queue, segment_path, segment_paths
from edge.spool.segments import Segment

__all__ = [
    "INLINE_LIMIT",
    "QUEUE_ID_HEADER",
    "Envelope",
    "Spool",
    "SpoolEntry",
    "SpoolWriter",
    "Unsynced",
    "new_queue_id",
]

log = Logger()


_T = TypeVar("_T")


INLINE_LIMIT = 256 * 1024
"""The largest batch (octets) `write_unsynced` writes from the caller's thread."""


@dataclass
class Unsynced:
    """A batch written by `Spool.write_unsynced`, waiting for its segment's `fdatasync`."""

    segment: Segment
    at: int
    placed: list[SpoolEntry]
    error: OSError | None = None
    """The write failed: the batch is to be undone."""


@dataclass
class _Pending:
    writer: SpoolWriter
    envelope: Envelope
    done: bool = False
    error: BaseException | None = None


class Spool:
    """The spool of one edge.

    `on_commit`, when given, is called with each batch's segment name and entries once the
    batch is durable and before any of its commits returns; `on_seal` with a segment's name
    once no more batches will go into it. An acceptor process (`edge.inbound.acceptor`) uses them to
    hand its batches to the process that delivers them, and keeps no index of its own
    (`index=False`); that process takes them in with `adopt` and `seal`.
    """

    def __init__(
        self,
        root: Path,
        *,
        on_commit: Callable[[str, list[SpoolEntry]], None] | None = None,
        on_seal: Callable[[str], None] | None = None,
        index: bool = True,
        segment_size: int = segments.SEGMENT_SIZE,
    ) -> None:
        self.root = Path(root)
        self.on_commit = on_commit
        self.on_seal = on_seal
        self.index = index
        self.segment_size = segment_size
        self.tmp = self.root / "tmp"
        self.queue = self.root / "queue"
        # Mail is private: the spool's directories are the service user's alone (0700).
        for d in (self.root, self.tmp, self.queue):
            private_dir(d)
        self._lock = threading.Lock()
        self._commit_cv = threading.Condition()
        self._pending: list[_Pending] = []
        self._writing = False
        self._closed = False
        self._current: Segment | None = None  # used by the batch writer only
        self._spare: Segment | None = None  # the next one, made ahead (under _prepare_lock)
        self._prepare_lock = threading.Lock()
        self._own: set[str] = set()  # this process's segments, not sealed yet
        self._sealed: set[str] = set()  # sealed, but holding unfinished messages
        self._entries: dict[str, SpoolEntry] = {}
        self._live: dict[str, set[str]] = {}
        self.batches_written = 0
        self.messages_committed = 0
        # The writers made and not closed yet (committed or aborted); weakly, so that one
        # dropped unclosed does not count for ever.
        self._receiving: weakref.WeakSet[SpoolWriter] = weakref.WeakSet()
        self.writers_made = 0

    def writer(self) -> SpoolWriter:
        writer = SpoolWriter(self.tmp, new_queue_id(), self._receiving.discard)
        self._receiving.add(writer)
        self.writers_made += 1
        return writer

    def receiving(self) -> int:
        """How many messages are being received: writers made, neither committed nor aborted."""
        return len(self._receiving)

    # -- committing ------------------------------------------------------------------------

    def commit(self, writer: SpoolWriter, envelope: Envelope) -> None:
        """Make the message durable, sharing the fdatasync with whatever commits alongside."""
        (mine,) = _pending([(writer, envelope)])
        with self._commit_cv:
            self._refuse_if_closed()
            self._pending.append(mine)
            while not mine.done and self._writing:
                self._commit_cv.wait()
            if mine.done:
                if mine.error is not None:
                    raise mine.error
                return
            batch, self._pending = self._pending, []
            self._writing = True
        error: BaseException | None = None
        try:
            self._write_batch(batch)
        except BaseException as exc:  # every message of the batch gets the same answer
            error = exc
        with self._commit_cv:
            for item in batch:
                item.done = True
                item.error = error
            self._writing = False
            self._commit_cv.notify_all()
        if error is not None:
            raise error
        if self.wants_spare():
            with contextlib.suppress(OSError):  # then the batch that needs it makes it
                self.prepare()

    def commit_batch(self, items: list[tuple[SpoolWriter, Envelope]]) -> None:
        """Make these messages durable as one batch (for `edge.spool.committer`, which gathers
        them without a thread waiting per message). Blocking; never alongside `commit`'s
        own batches."""
        batch = _pending(items)
        with self._commit_cv:
            self._refuse_if_closed()
            while self._writing:
                self._commit_cv.wait()
            self._writing = True
        try:
            self._write_batch(batch)
        finally:
            self._done_writing()

    def write_unsynced(self, items: list[tuple[SpoolWriter, Envelope]]) -> Unsynced | None:
        """Write a small batch into the current segment without waiting for the disk, for a
        caller that makes the segment durable itself (`edge.spool.syncer`) and then calls
        `synced`, or `undo` (blocking) if that failed. Until then no other batch is
        written. None, with nothing done, when the batch must take the blocking way
        (`commit_batch`): no current segment with room, data spilled to disk, or more than
        `INLINE_LIMIT` octets. Does not block on the disk: it writes to the page cache of
        a file made ahead."""
        segment = self._current
        if self._closed or segment is None or any(writer.spilled for writer, _ in items):
            return None
        with self._commit_cv:
            if self._writing:
                return None
            self._writing = True
        batch = _pending(items)
        records, need = _records(batch)
        if need <= INLINE_LIMIT and segment.free < need:
            segment = self._roll_over_now(segment)
        if segment is None or need > INLINE_LIMIT or segment.free < need:
            self._done_writing()
            return None
        at = segment.end
        try:
            at, starts = segment.write(records)
        except OSError as exc:
            return Unsynced(segment, at, [], exc)
        return Unsynced(segment, at, _placed(batch, segment.name, starts))

    def _roll_over_now(self, full: Segment) -> Segment | None:
        """Seal the full current segment and go on in the one made ahead, if it is made and
        can be taken without waiting (`prepare` may be making it): else None, and the batch
        takes the blocking way, which makes one if need be. A full segment has no batch in
        flight, so nothing waits on it."""
        if not self._prepare_lock.acquire(blocking=False):
            return None
        try:
            spare, self._spare = self._spare, None
        finally:
            self._prepare_lock.release()
        if spare is None:
            return None
        with contextlib.suppress(Exception):  # a start seals it anyway
            self._retire(full)
        self._current = spare
        return spare

    def synced(self, batch: Unsynced) -> None:
        """`write_unsynced`'s batch is durable: hand it over (`on_commit`) and index it. If
        the hand-over fails, this raises and the batch is to be undone."""
        if self.on_commit is not None:
            self.on_commit(batch.segment.name, batch.placed)
        self._committed(batch.segment, batch.placed)
        self._done_writing()

    def undo(self, batch: Unsynced) -> None:
        """`write_unsynced`'s batch is not to be kept (its sync or hand-over failed): make it
        unreadable, as far as the disk allows, and append nothing more to its segment.
        Blocking."""
        try:
            batch.segment.erase(batch.at)
            with contextlib.suppress(Exception):
                self._retire(batch.segment)
        finally:
            self._done_writing()

    def _done_writing(self) -> None:
        with self._commit_cv:
            self._writing = False
            self._commit_cv.notify_all()

    def wants_spare(self) -> bool:
        """Whether `prepare` has work: the current segment is half full, the next not made."""
        current = self._current
        if current is None or self._spare is not None or self._closed:
            return False
        return current.end * 2 >= current.size

    def prepare(self) -> None:
        """Make the next segment now, so that the batch that fills the current one need not.
        Blocking: for the committing thread, when no batch waits."""
        with self._prepare_lock:
            if self._spare is None and not self._closed:
                self._spare = self._make(Segment.create, self.segment_size)

    def _refuse_if_closed(self) -> None:
        """(Lock held.) A closed spool takes nothing, and nothing waits for its last batch."""
        if self._closed:
            raise RuntimeError("the spool is closed")

    def close(self, wait: float = 5.0) -> None:
        """Commit no more: seal the current segment, remove the unused next one. Blocking:
        it waits for a batch being written, `wait` seconds at most; a batch still out then
        (a sync that never answered) is left as it is, for the next start to recover."""
        with self._commit_cv:
            if not self._commit_cv.wait_for(lambda: not self._writing, timeout=wait):
                self._closed = True
                log.warn("spool: closed with a batch unanswered; the next start recovers it")
                return
            self._writing = self._closed = True
        try:
            with self._prepare_lock:
                spare, self._spare = self._spare, None
            for segment in (spare, self._current):
                if segment is not None:
                    with contextlib.suppress(Exception):  # a start seals it anyway
                        self._retire(segment)
        finally:
            self._done_writing()

    def _write_batch(self, batch: list[_Pending]) -> None:
        if self._closed:
            raise RuntimeError("the spool is closed")
        records, need = _records(batch)
        whole = need > self.segment_size
        segment: Segment | None = None
        at = 0
        try:
            if whole:
                segment, starts = self._make(segments.write_whole, records)
            else:
                segment = self._segment_for(need)
                at = segment.end
                at, starts = segment.append(records)
            placed = _placed(batch, segment.name, starts)
            if self.on_commit is not None:
                # Handed over, or undone: a batch nobody delivers must not stay behind.
                self.on_commit(segment.name, placed)
        except BaseException:
            # Nothing of a failed batch may stay: none of its messages was acknowledged. After
            # a failed write the segment's state is not known: nothing more goes into it.
            if segment is not None:
                segment.erase(at)
                with contextlib.suppress(Exception):
                    self._retire(segment)
            raise
        for item in batch:
            if item.writer.spilled:
                item.writer.path.unlink(missing_ok=True)
        self._committed(segment, placed)
        if whole:
            # The batch is acknowledged whatever this says; a start seals the segment anyway.
            with contextlib.suppress(Exception):
                self._retire(segment)

    def _segment_for(self, need: int) -> Segment:
        """The segment the next batch (`need` octets) goes into, sealing a full one."""
        current = self._current
        if current is not None and current.free >= need:
            return current
        if current is not None:
            self._retire(current)
        with self._prepare_lock:
            spare, self._spare = self._spare, None
            if spare is None:
                spare = self._make(Segment.create, self.segment_size)
        self._current = spare
        return spare

    def _make(self, make: Callable[..., _T], *args: Any) -> _T:
        """Make a segment of this process: `make(queue, name, *args)`, with a new name."""
        name = f"S{new_queue_id()}"
        with self._lock:
            self._own.add(name)  # before the file exists: `load` must not take it
        try:
            return make(self.queue, name, *args)
        except BaseException:
            with self._lock:
                self._own.discard(name)
            raise

    def _retire(self, segment: Segment) -> None:
        """Seal one of this process's segments: nothing more goes into it."""
        if segment is self._current:
            self._current = None
        segment.close()
        with self._lock:
            self._own.discard(segment.name)
        if not segment.committed:
            self._delete_segment(segment.name)  # no message in it was acknowledged
        elif self.index:
            self.seal(segment.name)
        elif self.on_seal is not None:
            self.on_seal(segment.name)

    def _committed(self, segment: Segment, placed: list[SpoolEntry]) -> None:
        """A batch of `segment` is acknowledged: count it, and index it (unless handed over)."""
        segment.committed += 1
        with self._lock:
            if self.index:
                self._register(segment.name, placed)
            self.batches_written += 1
            self.messages_committed += len(placed)

    def _register(self, name: str, placed: list[SpoolEntry]) -> None:
        for entry in placed:
            self._entries[entry.envelope.qid] = entry
        self._live.setdefault(name, set()).update(e.envelope.qid for e in placed)

    def adopt(self, name: str, placed: list[SpoolEntry]) -> None:
        """Take in a batch another process of this edge committed into this spool."""
        with self._lock:
            self._register(name, placed)

    def seal(self, name: str) -> None:
        """Nothing more goes into segment `name` (another process's, once it says so or is
        gone): delete it as soon as all its messages are finished."""
        with self._lock:
            if self._live.get(name):
                self._sealed.add(name)
                return
            self._live.pop(name, None)
        self._delete_segment(name)

    # -- recovery ----------------------------------------------------------------------------

    def load(self) -> list[Envelope]:
        """Recover after a start: drop what was never acknowledged, return the rest by age.

        Not while another process commits into this spool (acceptors start after it)."""
        for stray in self.tmp.iterdir():
            stray.unlink(missing_ok=True)
        paths, logs = segment_paths(self.queue), list(self.queue.glob("*.log"))
        with self._lock:
            # This process's segments (named before they are made, so after the listing),
            # and batches committed here while this runs: not the past's to recover.
            known = self._own | self._sealed | set(self._live)
        entries: dict[str, SpoolEntry] = {}
        live: dict[str, set[str]] = {}
        for name, found in scan_queue(paths, known, warn=True).items():
            pending = [e for e in found if e.pending]
            if not pending:
                self._delete_segment(name)
                continue
            live[name] = {e.envelope.qid for e in pending}
            entries.update((e.envelope.qid, e) for e in pending)
        for orphan in logs:
            if orphan.stem not in live and orphan.stem not in known:
                orphan.unlink(missing_ok=True)
        with self._lock:
            # Batches committed (or handed over) while this ran are in the index already,
            # whether or not the scan above saw their segments: keep them.
            for qid, entry in entries.items():
                self._entries.setdefault(qid, entry)
            for name, qids in live.items():
                self._live.setdefault(name, set()).update(qids)
                self._sealed.add(name)
        envelopes = [e.envelope for e in entries.values()]
        envelopes.sort(key=lambda e: (e.received_at, e.qid))
        return envelopes

    # -- reading and recording ---------------------------------------------------------------

    def entry(self, qid: str) -> SpoolEntry:
        with self._lock:
            return self._entries[qid]

    def read(self, qid: str) -> bytes:
        entry = self.entry(qid)
        with open(segment_path(self.queue, entry.batch), "rb") as fh:
            fh.seek(entry.offset)
            return fh.read(entry.length)

    def finished(self, qid: str) -> set[str]:
        """Recipients already delivered, bounced or deleted."""
        with self._lock:
            entry = self._entries.get(qid)
            return set(entry.outcomes) if entry else set()

    def mark_finished(self, qid: str, outcomes: dict[str, str]) -> None:
        """Record final outcomes ("delivered", "bounced: ...") per recipient. Blocking."""
        at = time.time()
        self._append(qid, [{"q": qid, "r": r, "o": o, "t": at} for r, o in outcomes.items()])
        with self._lock:
            self._entries[qid].outcomes.update(outcomes)

    def set_held(self, qid: str, held: bool, reason: str = "") -> None:
        """Hold (with the reason why) or release a message. Blocking."""
        record: dict[str, Any] = {"q": qid, "held": held}
        if held and reason:
            record["reason"] = reason
        self._append(qid, [record])
        with self._lock:
            entry = self._entries[qid]
            entry.held = held
            entry.held_reason = reason if held else ""

    def set_warned(self, qid: str) -> None:
        self._append(qid, [{"q": qid, "warned": True}])
        with self._lock:
            self._entries[qid].warned = True

    def _append(self, qid: str, records: list[dict[str, Any]]) -> None:
        segment = self.entry(qid).batch
        lines = b"".join(json.dumps(r).encode() + b"\n" for r in records)
        with open(self.queue / f"{segment}.log", "a+b") as fh:
            # A torn last line (a crash mid-append) must not swallow the records after it.
            if fh.seek(0, os.SEEK_END) > 0:
                fh.seek(-1, os.SEEK_END)
                if fh.read(1) != b"\n":
                    lines = b"\n" + lines
            fh.write(lines)
            fh.flush()
            os.fsync(fh.fileno())

    def remove(self, qid: str) -> None:
        """Forget a message whose recipients are all finished; delete its segment once that
        is sealed and holds no other unfinished message."""
        with self._lock:
            entry = self._entries.pop(qid, None)
            if entry is None:
                return
            live = self._live.get(entry.batch, set())
            live.discard(qid)
            empty = not live
            if empty:
                self._live.pop(entry.batch, None)
                empty = entry.batch in self._sealed
                self._sealed.discard(entry.batch)
        if empty:
            self._delete_segment(entry.batch)

    def _delete_segment(self, name: str) -> None:
        # The segment first: a log without its segment is dropped on start, while a segment
        # without its log would be delivered again.
        segment_path(self.queue, name).unlink(missing_ok=True)
        (self.queue / f"{name}.log").unlink(missing_ok=True)

    def queued_ids(self) -> list[str]:
        with self._lock:
            return sorted(self._entries)

    def entries(self) -> list[SpoolEntry]:
        with self._lock:
            return sorted(self._entries.values(), key=lambda e: e.envelope.qid)


def _pending(items: list[tuple[SpoolWriter, Envelope]]) -> list[_Pending]:
    batch = []
    for writer, envelope in items:
        writer.close()
        envelope.size = writer.size
        batch.append(_Pending(writer, envelope))
    return batch


def _records(batch: list[_Pending]) -> tuple[list[segments.Record], int]:
    """The batch's records for a segment, and the octets they take."""
    records: list[segments.Record] = [
        (item.envelope.to_json(), item.envelope.size, item.writer.chunks()) for item in batch
    ]
    return records, segments.batch_size((env, size) for env, size, _ in records)


def _placed(batch: list[_Pending], name: str, starts: list[int]) -> list[SpoolEntry]:
    return [
        SpoolEntry(item.envelope, name, start, item.envelope.size)
        for item, start in zip(batch, starts, strict=True)
    ]
