"""What the spool keeps of each message: its envelope, where it lives, and its data on the way in.

`SpoolWriter` takes one message's data as it is received (in memory up to `SPILL_SIZE`,
beyond that in `tmp/<qid>.data`); `Envelope` is what the queue needs to deliver it;
`SpoolEntry` is where a committed message lives in the spool (`edge.spool.spool`) and what is
known of its recipients. Nothing here knows about segments or syncing.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

QUEUE_ID_HEADER = b"X-Tailpost-Queue-ID"
"""The header the edge puts first when it hands a message on, carrying its queue id."""

_ENVELOPE_JSON = json.JSONEncoder(sort_keys=True)
"""One encoder for every envelope: `json.dumps` with options makes a new one per call."""

_ids = random.Random()  # seeded from the system's randomness when this process starts


def new_queue_id() -> str:
    """A sortable, unique queue id: microseconds since the epoch plus 32 random bits, in hex.
    (Unique, not secret: a client never learns one before it exists, and the edge's own
    headers that carry it are removed from incoming mail.)"""
    return f"{time.time_ns() // 1000:014X}{_ids.getrandbits(32):08X}"


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
    smtputf8: bool = False
    """The message came with SMTPUTF8 (RFC 6531): it goes on with it where offered. The
    paths are kept exactly as received, whatever they hold."""

    def to_json(self) -> bytes:
        # The fields by hand: `asdict` copies recursively and costs more than the dump.
        fields = {
            "client_ip": self.client_ip,
            "extra": self.extra,
            "helo": self.helo,
            "kind": self.kind,
            "qid": self.qid,
            "received_at": self.received_at,
            "recipients": self.recipients,
            "sender": self.sender,
            "size": self.size,
            "smtputf8": self.smtputf8,
        }
        return _ENVELOPE_JSON.encode(fields).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Envelope:
        return cls(**json.loads(raw))


@dataclass
class SpoolEntry:
    """Where a committed message lives (`batch`: the name of its segment, and where in it
    its data is) and what is known of its recipients."""

    envelope: Envelope
    batch: str
    offset: int
    length: int
    outcomes: dict[str, str] = field(default_factory=dict)
    held: bool = False
    held_reason: str = ""
    """Why it is held: the operator's word, or the defect that stopped its delivery."""
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
    sits in memory whole. Headers known only once the data is in (the edge's own, after the
    checks) go `put_on_top`, in front of it, without copying the data.
    """

    SPILL_SIZE = 64 * 1024

    def __init__(
        self, tmp: Path, qid: str, on_close: Callable[[SpoolWriter], None] | None = None
    ) -> None:
        """`on_close` is called once, at the first `close` (or `abort`)."""
        self.tmp = tmp
        self.qid = qid
        self._on_close = on_close
        self.size = 0
        self._top = b""
        self._memory: bytearray | None = bytearray()
        self._fh: BinaryIO | None = None

    @property
    def path(self) -> Path:
        """Where the data goes beyond `SPILL_SIZE`."""
        return self.tmp / f"{self.qid}.data"

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

    def put_on_top(self, head: bytes) -> None:
        """Put `head` in front of the data (once, after the last `write`)."""
        self._top = head
        self.size += len(head)

    def data(self) -> bytes:
        """The data written so far, without what went on top (blocking once spilled)."""
        if self._memory is not None:
            return bytes(self._memory)
        assert self._fh is not None
        self._fh.flush()
        return self.path.read_bytes()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        closed, self._on_close = self._on_close, None
        if closed is not None:
            closed(self)

    def chunks(self) -> Iterator[bytes | bytearray]:
        """The message (after `close`): what went on top, then the data, in pieces of at
        most 1 MiB."""
        if self._top:
            yield self._top
        if self._memory is not None:
            yield self._memory
            return
        with open(self.path, "rb") as src:
            while chunk := src.read(1 << 20):
                yield chunk

    def abort(self) -> None:
        self.close()
        if self._memory is not None:
            self._memory = bytearray()
        else:
            self.path.unlink(missing_ok=True)
