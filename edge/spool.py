"""The edge's durable spool: message data and envelope, crash-consistent on local disk.

Layout under the spool root:

    tmp/<qid>.data     data being received (never acknowledged; removed on start)
    queue/<qid>.data   message data, fsynced before the envelope appears
    queue/<qid>.env    the envelope (JSON); its rename into queue/ is the commit point
    queue/<qid>.done   append-only log of recipients already delivered or bounced

A message is acknowledged (250) only after `commit` returned: data fsynced, envelope
fsynced, both renamed, directory fsynced. On start, anything without an envelope is
discarded and everything with one is handed back for delivery. The blocking methods here
must run in a thread pool, never in the reactor thread.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import BinaryIO

QUEUE_ID_HEADER = b"X-Tailpost-Queue-ID"
"""The header the edge puts first when it hands a message on, carrying its queue id."""


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
    extra: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Envelope:
        data = json.loads(raw)
        return cls(**data)


class SpoolWriter:
    """Receives one message's data into tmp/; `Spool.commit` makes it durable."""

    def __init__(self, spool: Spool, qid: str) -> None:
        self.spool = spool
        self.qid = qid
        self.path = spool.tmp / f"{qid}.data"
        self.size = 0
        self._fh: BinaryIO | None = open(self.path, "xb")  # noqa: SIM115

    def write(self, chunk: bytes) -> None:
        assert self._fh is not None
        self._fh.write(chunk)
        self.size += len(chunk)

    def abort(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        self.path.unlink(missing_ok=True)

    def close_and_sync(self) -> None:
        assert self._fh is not None
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        self._fh = None


class Spool:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.tmp = self.root / "tmp"
        self.queue = self.root / "queue"
        for d in (self.root, self.tmp, self.queue):
            d.mkdir(parents=True, exist_ok=True)

    def writer(self) -> SpoolWriter:
        return SpoolWriter(self, new_queue_id())

    def commit(self, writer: SpoolWriter, envelope: Envelope) -> None:
        """Make the message durable. Blocking: data fsync, envelope fsync, renames, dir fsync."""
        writer.close_and_sync()
        envelope.size = writer.size
        env_tmp = self.tmp / f"{writer.qid}.env"
        with open(env_tmp, "wb") as fh:
            fh.write(envelope.to_json())
            fh.flush()
            os.fsync(fh.fileno())
        os.rename(writer.path, self.queue / f"{writer.qid}.data")
        os.rename(env_tmp, self.queue / f"{writer.qid}.env")
        _fsync_dir(self.queue)

    def load(self) -> list[Envelope]:
        """Recover after a start: drop what was never acknowledged, return the rest by age."""
        for stray in self.tmp.iterdir():
            stray.unlink(missing_ok=True)
        envelopes: list[Envelope] = []
        names = {p.name for p in self.queue.iterdir()}
        for name in sorted(names):
            qid, _, kind = name.partition(".")
            if kind == "data" and f"{qid}.env" not in names:
                (self.queue / name).unlink(missing_ok=True)
            elif kind == "env":
                if f"{qid}.data" not in names:
                    (self.queue / name).unlink(missing_ok=True)
                    continue
                env = Envelope.from_json((self.queue / name).read_bytes())
                if set(env.recipients) <= self.finished(qid):
                    self.remove(qid)
                    continue
                envelopes.append(env)
        envelopes.sort(key=lambda e: (e.received_at, e.qid))
        return envelopes

    def data_path(self, qid: str) -> Path:
        return self.queue / f"{qid}.data"

    def read(self, qid: str) -> bytes:
        return self.data_path(qid).read_bytes()

    def finished(self, qid: str) -> set[str]:
        """Recipients already delivered or bounced."""
        try:
            raw = (self.queue / f"{qid}.done").read_text()
        except FileNotFoundError:
            return set()
        done = set()
        for line in raw.splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue  # a torn last line: that recipient is simply tried again
            done.add(entry["rcpt"])
        return done

    def mark_finished(self, qid: str, outcomes: dict[str, str]) -> None:
        """Record final outcomes ("delivered", "bounced: ...") per recipient. Blocking."""
        lines = "".join(
            json.dumps({"rcpt": rcpt, "outcome": outcome, "at": time.time()}) + "\n"
            for rcpt, outcome in outcomes.items()
        ).encode()
        with open(self.queue / f"{qid}.done", "a+b") as fh:
            # A torn last line (a crash mid-append) must not swallow the records after it.
            if fh.seek(0, os.SEEK_END) > 0:
                fh.seek(-1, os.SEEK_END)
                if fh.read(1) != b"\n":
                    lines = b"\n" + lines
            fh.write(lines)
            fh.flush()
            os.fsync(fh.fileno())

    def remove(self, qid: str) -> None:
        """Forget a message whose recipients are all finished (envelope first)."""
        for suffix in ("env", "data", "done"):
            (self.queue / f"{qid}.{suffix}").unlink(missing_ok=True)
        _fsync_dir(self.queue)

    def queued_ids(self) -> list[str]:
        return sorted(p.stem for p in self.queue.glob("*.env"))
