"""The device's outbound mail events: a persistent log with increasing ids, and a wake-up bus.

Each submitted message gets a `submitted` event, then `relayed` once its edge took it (with
the edge's queue id), then `delivered`, `deferred` or `bounced` per recipient as the edge
reports them (`connector.outbound.poller`), or `bounced` at once for a recipient the edge
refused. Events are the items of `/localapi/v0/mail/outbound/recent` and `/stream`.
`OutboundEventLog` appends them to a JSON-lines file (one object per line, fsynced) and
keeps the newest `keep` in memory; ids only ever grow, across restarts and compactions.
`OutboundEvents` wakes its subscribers in the reactor thread after an event is recorded;
subscribers pull `after(last_id)`, so a late wake-up never reorders, skips or repeats one.

It must never block the reactor thread (appends are file work: call them in a worker
thread) and never hold a message's body: only its envelope and header facts.
"""

from __future__ import annotations

import json
import os
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from connector.events import iso_time

__all__ = ["STATUSES", "OutboundEvent", "OutboundEventLog", "OutboundEvents"]

log = Logger(namespace="tailpost.outbound.events")

DEFAULT_KEEP = 1000
STATUSES = ("submitted", "relayed", "delivered", "deferred", "bounced")


@dataclass(frozen=True)
class OutboundEvent:
    """One step of one outbound message (for one recipient, where `recipient` is set)."""

    event_id: int
    proxy_message_id: str
    status: str
    internet_message_id: str = ""
    subject: str = ""
    sender: str = ""
    recipients: list[str] = field(default_factory=list)
    recipient: str | None = None
    queue_id: str | None = None
    detail: str | None = None
    created_at: str = ""
    direction: str = "outbound"

    def to_dict(self) -> dict[str, Any]:
        """The API's shape: optional fields only when set; `received_at` repeats
        `created_at` (the name the inbound events use)."""
        body: dict[str, Any] = {
            "event_id": self.event_id,
            "direction": self.direction,
            "proxy_message_id": self.proxy_message_id,
            "internet_message_id": self.internet_message_id,
            "subject": self.subject,
            "sender": self.sender,
            "recipients": list(self.recipients),
            "status": self.status,
            "created_at": self.created_at,
            "received_at": self.created_at,
        }
        for name in ("recipient", "queue_id", "detail"):
            value = getattr(self, name)
            if value is not None:
                body[name] = value
        return body

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> OutboundEvent:
        known = {k: raw[k] for k in cls.__dataclass_fields__ if k in raw}
        event = cls(**known)
        eid = event.event_id
        if not isinstance(eid, int) or isinstance(eid, bool) or eid < 1:
            raise ValueError("bad event id")
        if not isinstance(event.proxy_message_id, str) or event.status not in STATUSES:
            raise ValueError("bad event")
        if not isinstance(event.recipients, list):
            raise ValueError("bad event")
        return event


class OutboundEventLog:
    """Append-only JSON-lines event file plus the newest `keep` events in memory.

    Thread-safe: appends and reads take one lock. Appends do file I/O, so call them from a
    worker thread.
    """

    def __init__(self, path: Path, clock: Callable[[], float], *, keep: int = DEFAULT_KEEP) -> None:
        if keep < 1:
            raise ValueError("keep must be at least 1")
        self.path = path
        self._clock = clock
        self._keep = keep
        self._lock = threading.Lock()
        self._events: deque[OutboundEvent] = deque(maxlen=keep)
        self._lines_on_disk = 0
        self._last_id = 0
        self.last_item_id = ""
        """The greatest message id any event names (new ids are made above it)."""
        self._load()

    def _load(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return
        for line in raw.splitlines():
            try:
                event = OutboundEvent.from_dict(json.loads(line))
            except (ValueError, TypeError):
                continue  # a torn or foreign line: skipped, never fatal
            if event.event_id > self._last_id:
                self._events.append(event)
                self._last_id = event.event_id
                self.last_item_id = max(self.last_item_id, event.proxy_message_id)
            self._lines_on_disk += 1
        if raw and not raw.endswith(b"\n"):
            with open(self.path, "ab") as fh:  # end a torn last line before appending
                fh.write(b"\n")

    @property
    def last_id(self) -> int:
        with self._lock:
            return self._last_id

    def append(self, **fields: Any) -> OutboundEvent:
        """Record one event (its id and `created_at` are assigned here)."""
        with self._lock:
            fields.setdefault("created_at", iso_time(self._clock()))
            event = OutboundEvent(event_id=self._last_id + 1, **fields)
            if event.status not in STATUSES:
                raise ValueError(f"unknown outbound status {event.status!r}")
            line = json.dumps(asdict_event(event), ensure_ascii=False).encode("utf-8") + b"\n"
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)
            self._last_id = event.event_id
            self.last_item_id = max(self.last_item_id, event.proxy_message_id)
            self._events.append(event)
            self._lines_on_disk += 1
            if self._lines_on_disk > 2 * self._keep:
                self._compact()
            return event

    def _compact(self) -> None:
        """Rewrite the file with the events kept in memory (caller holds the lock)."""
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            for event in self._events:
                fh.write(json.dumps(asdict_event(event), ensure_ascii=False).encode() + b"\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)
        self._lines_on_disk = len(self._events)

    def recent(self, limit: int) -> list[OutboundEvent]:
        """The newest `limit` events, newest first."""
        with self._lock:
            events = list(self._events)
        return list(reversed(events[-limit:])) if limit > 0 else []

    def after(self, last_id: int) -> list[OutboundEvent]:
        """Events with an id above `last_id`, oldest first (what a resuming client missed)."""
        with self._lock:
            return [e for e in self._events if e.event_id > last_id]

    def oldest_id(self) -> int | None:
        with self._lock:
            return self._events[0].event_id if self._events else None

    def of_message(self, proxy_message_id: str) -> list[OutboundEvent]:
        """The kept events of one message, oldest first."""
        with self._lock:
            return [e for e in self._events if e.proxy_message_id == proxy_message_id]


def asdict_event(event: OutboundEvent) -> dict[str, Any]:
    """What a line of the file holds: every field (the API's shape is `to_dict`)."""
    return {name: getattr(event, name) for name in OutboundEvent.__dataclass_fields__}


class OutboundEvents:
    """The log plus the bus: `record(**fields)` appends an event and wakes the subscribers."""

    def __init__(self, event_log: OutboundEventLog, run_blocking: Callable[..., Deferred[Any]]):
        self.log = event_log
        self._run = run_blocking
        self._subscribers: list[Callable[[], None]] = []

    def subscribe(self, wake: Callable[[], None]) -> Callable[[], None]:
        """Call `wake()` (in the reactor thread) after new events; returns the unsubscriber."""
        self._subscribers.append(wake)

        def unsubscribe() -> None:
            if wake in self._subscribers:
                self._subscribers.remove(wake)

        return unsubscribe

    def record(self, **fields: Any) -> Deferred[OutboundEvent | None]:
        """Append one event in a worker thread, then wake (call in the reactor thread). A
        failure to record is logged, never raised: the mail itself is safe elsewhere."""
        d: Deferred[Any] = self._run(self.log.append, **fields)
        d.addCallback(self._published)
        d.addErrback(self._failed)
        return d

    def _published(self, event: OutboundEvent) -> OutboundEvent:
        self.wake()
        return event

    def _failed(self, failure: Any) -> None:
        log.failure("recording an outbound event failed", failure)

    def wake(self) -> None:
        for wake in list(self._subscribers):
            try:
                wake()
            except Exception:
                log.failure("an outbound event subscriber failed")
