"""The edge's durable spool: message data and envelopes, crash-consistent, group-committed.

Layout under the spool root:

    tmp/<qid>.data          data being received, beyond 64 KiB (never acknowledged; removed
                            on start); smaller messages wait in memory until committed
    tmp/<batch>.batch.tmp   a batch being written (removed on start)
    queue/<batch>.batch     committed messages: one or more records (envelope + data)
    queue/<batch>.log       append-only state of those messages: recipients finished
                            (delivered, bounced, deleted), held/released, delay warned

Group commit: `commit` may be called from many worker threads at once. The first caller
becomes the leader and writes every message waiting at that moment into one batch file:
one fsync, one rename, one directory fsync for all of them. Callers that arrive meanwhile
wait and form the next batch. A message is acknowledged (250) only after `commit` returned
for it. On start, anything not in a renamed batch file is discarded, and every message with
an unfinished recipient is handed back for delivery. The blocking methods here must run in
a thread pool, never in the reactor thread.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

QUEUE_ID_HEADER = b"X-Tailpost-Queue-ID"
"""The header the edge puts first when it hands a message on, carrying its queue id."""

_MAGIC = b"TPSPOOL1\n"
_RECORD = b"TPREC "


def new_queue_id() -> str:
    """A sortable, unique queue id: microseconds since the epoch plus randomness, in hex."""
    return f"{time.time_ns() // 1000:014X}{secrets.token_hex(4).upper()}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class Envelope:
    qid: str
    sender: str
    recipients: list[str]
    received_at: float
    client_ip: str = ""
    helo: str = ""
    size: int = 0
    kind: str = "inbound"
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Envelope:
        return cls(**json.loads(raw))


@dataclass
class SpoolEntry:
    """Where a committed message lives and what is known of its recipients."""

    envelope: Envelope
    batch: str
    offset: int
    length: int
    outcomes: dict[str, str] = field(default_factory=dict)
    held: bool = False
    warned: bool = False

    @property
    def pending(self) -> list[str]:
        return [r for r in self.envelope.recipients if r not in self.outcomes]

    def to_record(self) -> dict[str, Any]:
        """A just-committed entry as a JSON-able record (`from_record`)."""
        return {
            "envelope": asdict(self.envelope),
            "batch": self.batch,
            "offset": self.offset,
            "length": self.length,
        }

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> SpoolEntry:
        return cls(
            Envelope(**record["envelope"]),
            str(record["batch"]),
            int(record["offset"]),
            int(record["length"]),
        )


class SpoolWriter:
    """Receives one message's data; `Spool.commit` makes it durable.

    Up to `SPILL_SIZE` octets stay in memory (most mail, and no file to create and remove
    per message); beyond that the data goes on to `tmp/<qid>.data`, so a large message never
    sits in memory whole.
    """

    SPILL_SIZE = 64 * 1024

    def __init__(self, spool: Spool, qid: str) -> None:
        self.spool = spool
        self.qid = qid
        self.path = spool.tmp / f"{qid}.data"
        self.size = 0
        self._memory: bytearray | None = bytearray()
        self._fh: BinaryIO | None = None

    @property
    def spilled(self) -> bool:
        return self._memory is None

    def write(self, chunk: bytes) -> None:
        if self._memory is not None:
            if len(self._memory) + len(chunk) <= self.SPILL_SIZE:
                self._memory += chunk
                self.size += len(chunk)
                return
            self._fh = open(self.path, "xb")  # noqa: SIM115
            self._fh.write(self._memory)
            self._memory = None
        assert self._fh is not None
        self._fh.write(chunk)
        self.size += len(chunk)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def copy_into(self, out: BinaryIO) -> None:
        """Write the received data to `out` (after `close`)."""
        if self._memory is not None:
            out.write(self._memory)
            return
        with open(self.path, "rb") as src:
            shutil.copyfileobj(src, out, 1 << 20)

    def abort(self) -> None:
        self.close()
        if self._memory is not None:
            self._memory = bytearray()
        else:
            self.path.unlink(missing_ok=True)


@dataclass
class _Pending:
    writer: SpoolWriter
    envelope: Envelope
    done: bool = False
    error: BaseException | None = None


class Spool:
    """The spool of one edge.

    `on_commit`, when given, is called with each batch's name and entries once the batch
    is durable and before any of its commits returns. An acceptor process (`edge.acceptor`)
    uses it to hand its batches to the process that delivers them, and keeps no index of its
    own (`index=False`); that process takes them in with `adopt`.
    """

    def __init__(
        self,
        root: Path,
        *,
        on_commit: Callable[[str, list[SpoolEntry]], None] | None = None,
        index: bool = True,
    ) -> None:
        self.root = Path(root)
        self.on_commit = on_commit
        self.index = index
        self.tmp = self.root / "tmp"
        self.queue = self.root / "queue"
        for d in (self.root, self.tmp, self.queue):
            d.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._commit_cv = threading.Condition()
        self._pending: list[_Pending] = []
        self._writing = False
        self._entries: dict[str, SpoolEntry] = {}
        self._live: dict[str, set[str]] = {}
        self.batches_written = 0
        self.messages_committed = 0

    def writer(self) -> SpoolWriter:
        return SpoolWriter(self, new_queue_id())

    # -- committing ------------------------------------------------------------------------

    def commit(self, writer: SpoolWriter, envelope: Envelope) -> None:
        """Make the message durable, sharing the fsync with whatever commits alongside."""
        writer.close()
        envelope.size = writer.size
        mine = _Pending(writer, envelope)
        with self._commit_cv:
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

    def commit_batch(self, items: list[tuple[SpoolWriter, Envelope]]) -> None:
        """Make these messages durable as one batch (for `edge.committer`, which gathers
        them without a thread waiting per message). Blocking; never alongside `commit`'s
        own batches."""
        batch = []
        for writer, envelope in items:
            writer.close()
            envelope.size = writer.size
            batch.append(_Pending(writer, envelope))
        with self._commit_cv:
            while self._writing:
                self._commit_cv.wait()
            self._writing = True
        try:
            self._write_batch(batch)
        finally:
            with self._commit_cv:
                self._writing = False
                self._commit_cv.notify_all()

    def _write_batch(self, batch: list[_Pending]) -> None:
        name = f"B{batch[0].envelope.qid}"
        tmp_path = self.tmp / f"{name}.batch.tmp"
        placed: list[SpoolEntry] = []
        final_path = self.queue / f"{name}.batch"
        try:
            with open(tmp_path, "wb") as out:
                out.write(_MAGIC)
                for item in batch:
                    env = item.envelope.to_json()
                    out.write(_RECORD + b"%d %d\n" % (len(env), item.envelope.size))
                    out.write(env)
                    offset = out.tell()
                    item.writer.copy_into(out)
                    placed.append(SpoolEntry(item.envelope, name, offset, item.envelope.size))
                out.flush()
                os.fsync(out.fileno())
            os.rename(tmp_path, final_path)
            _fsync_dir(self.queue)
            if self.on_commit is not None:
                # Handed over, or undone: a batch nobody delivers must not stay behind.
                self.on_commit(name, placed)
        except BaseException:
            # Nothing of a failed batch may stay: none of its messages was acknowledged.
            tmp_path.unlink(missing_ok=True)
            final_path.unlink(missing_ok=True)
            try:
                _fsync_dir(self.queue)
            except OSError:
                pass
            raise
        for item in batch:
            if item.writer.spilled:
                item.writer.path.unlink(missing_ok=True)
        with self._lock:
            if self.index:
                self._register(name, placed)
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

    # -- recovery ----------------------------------------------------------------------------

    def load(self) -> list[Envelope]:
        """Recover after a start: drop what was never acknowledged, return the rest by age."""
        for stray in self.tmp.iterdir():
            stray.unlink(missing_ok=True)
        entries: dict[str, SpoolEntry] = {}
        live: dict[str, set[str]] = {}
        for path in sorted(self.queue.glob("*.batch")):
            name = path.stem
            found = _read_batch(path, name)
            _apply_log(self.queue / f"{name}.log", {e.envelope.qid: e for e in found})
            pending = [e for e in found if e.pending]
            if not pending:
                self._delete_batch(name)
                continue
            live[name] = {e.envelope.qid for e in pending}
            entries.update((e.envelope.qid, e) for e in pending)
        for orphan in self.queue.glob("*.log"):
            if orphan.stem not in live:
                orphan.unlink(missing_ok=True)
        with self._lock:
            # Batches committed (or handed over) while this ran are in the index already,
            # whether or not the scan above saw their files: keep them.
            for qid, entry in entries.items():
                self._entries.setdefault(qid, entry)
            for name, qids in live.items():
                self._live.setdefault(name, set()).update(qids)
        envelopes = [e.envelope for e in entries.values()]
        envelopes.sort(key=lambda e: (e.received_at, e.qid))
        return envelopes

    # -- reading and recording ---------------------------------------------------------------

    def entry(self, qid: str) -> SpoolEntry:
        with self._lock:
            return self._entries[qid]

    def read(self, qid: str) -> bytes:
        entry = self.entry(qid)
        with open(self.queue / f"{entry.batch}.batch", "rb") as fh:
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

    def set_held(self, qid: str, held: bool) -> None:
        self._append(qid, [{"q": qid, "held": held}])
        with self._lock:
            self._entries[qid].held = held

    def set_warned(self, qid: str) -> None:
        self._append(qid, [{"q": qid, "warned": True}])
        with self._lock:
            self._entries[qid].warned = True

    def _append(self, qid: str, records: list[dict[str, Any]]) -> None:
        batch = self.entry(qid).batch
        lines = b"".join(json.dumps(r).encode() + b"\n" for r in records)
        with open(self.queue / f"{batch}.log", "a+b") as fh:
            # A torn last line (a crash mid-append) must not swallow the records after it.
            if fh.seek(0, os.SEEK_END) > 0:
                fh.seek(-1, os.SEEK_END)
                if fh.read(1) != b"\n":
                    lines = b"\n" + lines
            fh.write(lines)
            fh.flush()
            os.fsync(fh.fileno())

    def remove(self, qid: str) -> None:
        """Forget a message whose recipients are all finished; drop its batch when empty."""
        with self._lock:
            entry = self._entries.pop(qid, None)
            if entry is None:
                return
            live = self._live.get(entry.batch, set())
            live.discard(qid)
            empty = not live
            if empty:
                self._live.pop(entry.batch, None)
        if empty:
            self._delete_batch(entry.batch)

    def _delete_batch(self, name: str) -> None:
        (self.queue / f"{name}.batch").unlink(missing_ok=True)
        (self.queue / f"{name}.log").unlink(missing_ok=True)

    def queued_ids(self) -> list[str]:
        with self._lock:
            return sorted(self._entries)

    def entries(self) -> list[SpoolEntry]:
        with self._lock:
            return sorted(self._entries.values(), key=lambda e: e.envelope.qid)


def _read_batch(path: Path, name: str) -> list[SpoolEntry]:
    found: list[SpoolEntry] = []
    with open(path, "rb") as fh:
        if fh.read(len(_MAGIC)) != _MAGIC:
            return found
        while True:
            header = fh.readline()
            if not header.startswith(_RECORD):
                break
            env_len, data_len = (int(x) for x in header[len(_RECORD) :].split())
            envelope = Envelope.from_json(fh.read(env_len))
            offset = fh.tell()
            found.append(SpoolEntry(envelope, name, offset, data_len))
            fh.seek(offset + data_len)
    return found


def _apply_log(path: Path, entries: dict[str, SpoolEntry]) -> None:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return
    for line in raw.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a torn line: that recipient is simply tried again
        entry = entries.get(record.get("q", ""))
        if entry is None:
            continue
        if "r" in record:
            entry.outcomes[record["r"]] = record["o"]
        if "held" in record:
            entry.held = bool(record["held"])
        if record.get("warned"):
            entry.warned = True
