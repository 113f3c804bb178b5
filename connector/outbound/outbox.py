"""The outbound queue's directory: each message and its envelope in one file, its relay
state in another, every write durable before it counts.

Layout under `<data_dir>/device/outbound/`: `tmp/` holds files being written; `queue/`
holds `<id>.msg` (one line of JSON envelope, then the message exactly as it goes to the
edge) and, once anything happened to its recipients, `<id>.state` (JSON: per recipient,
relayed with the edge's queue id, bounced with the reply, or what the edge later reported).
Every file is written in `tmp/`, fsynced, renamed into `queue/`, and `queue/` is fsynced
before the write returns; a removal is fsynced the same way. A message whose recipients all
have a state no longer needs its `.msg`; a message whose recipients are all final
(delivered or bounced) no longer needs its `.state` either.

This module does file work only (call it in a worker thread), never builds a path from a
name it has not checked against `ITEM_ID`, and never holds more than one message's data.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from maildir.durable import fsync_dir, write_durably

__all__ = ["ITEM_ID", "Outbox", "OutboxEnvelope", "RecipientState", "Stored"]

ITEM_ID = re.compile(r"out_[0-9A-HJKMNP-TV-Z]{26}")
"""An outbound message's id: `out_` and 26 Crockford base-32 digits, increasing."""

FINAL = frozenset({"delivered", "bounced"})


@dataclass
class OutboxEnvelope:
    """What the queue knows of a message besides its data."""

    id: str
    sender: str
    recipients: list[str]
    source: str
    message_id: str = ""
    subject: str = ""
    submitted_at: float = 0.0

    def to_json(self) -> bytes:
        fields = {
            "id": self.id,
            "sender": self.sender,
            "recipients": self.recipients,
            "source": self.source,
            "message_id": self.message_id,
            "subject": self.subject,
            "submitted_at": self.submitted_at,
        }
        return json.dumps(fields, ensure_ascii=False).encode("utf-8")

    @classmethod
    def from_json(cls, raw: bytes) -> OutboxEnvelope:
        fields = json.loads(raw)
        envelope = cls(**{k: fields[k] for k in cls.__dataclass_fields__ if k in fields})
        if not ITEM_ID.fullmatch(str(envelope.id)) or not isinstance(envelope.recipients, list):
            raise ValueError("not an outbound envelope")
        return envelope


@dataclass
class RecipientState:
    status: str  # relayed | bounced | delivered | deferred
    queue_id: str = ""
    detail: str = ""

    @property
    def final(self) -> bool:
        return self.status in FINAL


@dataclass
class Stored:
    """One message as loaded at start: its envelope, its recipients' states, and whether
    its data is still queued (some recipient not relayed yet)."""

    envelope: OutboxEnvelope
    states: dict[str, RecipientState] = field(default_factory=dict)
    has_data: bool = True


class Outbox:
    """The queue directory. Every method does blocking file work."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.tmp = root / "tmp"
        self.queue = root / "queue"
        for directory in (root, self.tmp, self.queue):
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)

    def _path(self, item_id: str, suffix: str) -> Path:
        if not ITEM_ID.fullmatch(item_id):
            raise ValueError(f"invalid outbound id {item_id!r}")
        return self.queue / f"{item_id}{suffix}"

    def write_message(self, envelope: OutboxEnvelope, data: bytes) -> None:
        """The envelope and the data in `<id>.msg`, durably (file and directory fsynced)."""
        dest = self._path(envelope.id, ".msg")
        write_durably(self.tmp / f"{envelope.id}.msg", dest, [envelope.to_json(), b"\n", data])

    def read_data(self, item_id: str) -> bytes:
        raw = self._path(item_id, ".msg").read_bytes()
        return raw[raw.index(b"\n") + 1 :]

    def write_state(self, envelope: OutboxEnvelope, states: dict[str, RecipientState]) -> None:
        """The recipients' states (with the envelope, which outlives `<id>.msg`), durably."""
        body = {
            rcpt: {"status": s.status, "queue_id": s.queue_id, "detail": s.detail}
            for rcpt, s in states.items()
        }
        dest = self._path(envelope.id, ".state")
        head = json.loads(envelope.to_json())
        data = json.dumps({"envelope": head, "recipients": body}, ensure_ascii=False)
        write_durably(self.tmp / f"{envelope.id}.state", dest, [data.encode("utf-8")])

    def remove(self, item_id: str, suffix: str) -> None:
        """Remove `<id><suffix>` durably (nothing if it is gone already)."""
        try:
            os.unlink(self._path(item_id, suffix))
        except FileNotFoundError:
            return
        fsync_dir(self.queue)

    def load(self) -> tuple[list[Stored], list[str]]:
        """Every message in the queue, by id, and the names of files that could not be read.

        Files left in `tmp/` by a crash are removed: their message never got its answer."""
        for leftover in self.tmp.iterdir():
            leftover.unlink(missing_ok=True)
        found: dict[str, Stored] = {}
        bad: list[str] = []
        names = sorted(os.listdir(self.queue))
        for name in names:
            item_id, _, suffix = name.partition(".")
            if suffix != "msg" or not ITEM_ID.fullmatch(item_id):
                continue
            try:
                with open(self.queue / name, "rb") as fh:
                    envelope = OutboxEnvelope.from_json(fh.readline())
                if envelope.id != item_id:
                    raise ValueError("envelope of another message")
            except (OSError, ValueError, TypeError, KeyError):
                bad.append(name)
                continue
            found[item_id] = Stored(envelope)
        for name in names:
            item_id, _, suffix = name.partition(".")
            if suffix != "state" or not ITEM_ID.fullmatch(item_id):
                continue
            try:
                states, envelope = self._read_state(item_id)
            except (OSError, ValueError, TypeError, KeyError):
                bad.append(name)
                continue
            stored = found.get(item_id)
            if stored is None:
                stored = found[item_id] = Stored(envelope, has_data=False)
            stored.states = states
        return [found[k] for k in sorted(found)], bad

    def _read_state(self, item_id: str) -> tuple[dict[str, RecipientState], OutboxEnvelope]:
        raw: Any = json.loads(self._path(item_id, ".state").read_bytes())
        states = {
            str(rcpt): RecipientState(
                str(s["status"]), str(s.get("queue_id", "")), str(s.get("detail", ""))
            )
            for rcpt, s in raw["recipients"].items()
        }
        envelope = OutboxEnvelope.from_json(json.dumps(raw["envelope"]).encode())
        if envelope.id != item_id:
            raise ValueError("state of another message")
        return states, envelope
