"""The device's inbound mail events: a persistent log with increasing ids, and a wake-up bus.

Every message the connector stores becomes one event (`/localapi/v0/mail/recent` and
`/stream`). `EventLog` appends events to a JSON-lines file (one object per line, fsynced) and
keeps the newest `keep` of them in memory; ids only ever grow, across restarts and
compactions, so a client resuming with `Last-Event-ID` gets exactly the events it missed.
`InboundEvents` records a delivery in a worker thread and then wakes the subscribers in the
reactor thread; subscribers pull `after(last_id)` rather than being handed one event, so a
late wake-up can never reorder, skip or repeat an event. This module must never block the
reactor thread (file and Maildir work goes through `run_blocking`) and never put anything
but header facts of a message (never its body) into the log.
"""

from __future__ import annotations

import json
import os
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from maildir import Maildir, MaildirError, MessageInfo
from maildir.message import header_summary

__all__ = ["EventLog", "InboundEvent", "InboundEvents", "iso_time"]

log = Logger(namespace="tailpost.events")

DEFAULT_KEEP = 1000


def iso_time(seconds: float) -> str:
    """UTC time as `2026-04-03T19:12:24Z`."""
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class InboundEvent:
    """One stored inbound message, as the event stream reports it (URLs are added later)."""

    event_id: int
    mailbox_id: str
    mailbox: str
    proxy_message_id: str = ""
    internet_message_id: str = ""
    subject: str = ""
    sender: str = ""
    recipients: list[str] = field(default_factory=list)
    received_at: str = ""
    direction: str = "inbound"
    status: str = "accepted"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> InboundEvent:
        known = {k: raw[k] for k in cls.__dataclass_fields__ if k in raw}
        event = cls(**known)
        eid = event.event_id
        if not isinstance(eid, int) or isinstance(eid, bool) or eid < 1:
            raise ValueError("bad event id")
        if not isinstance(event.mailbox_id, str) or not isinstance(event.recipients, list):
            raise ValueError("bad event")
        return event


class EventLog:
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
        self._events: deque[InboundEvent] = deque(maxlen=keep)
        self._lines_on_disk = 0
        self._last_id = 0
        self._load()

    def _load(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return
        for line in raw.splitlines():
            try:
                event = InboundEvent.from_dict(json.loads(line))
            except (ValueError, TypeError):
                continue  # a torn or foreign line: skipped, never fatal
            if event.event_id > self._last_id:
                self._events.append(event)
                self._last_id = event.event_id
            self._lines_on_disk += 1
        if raw and not raw.endswith(b"\n"):
            with open(self.path, "ab") as fh:  # end a torn last line before appending
                fh.write(b"\n")

    @property
    def last_id(self) -> int:
        with self._lock:
            return self._last_id

    def append(self, **fields: Any) -> InboundEvent | None:
        """Record one event (id and received_at assigned here); None if the message already
        has an event (a redelivery the Maildir deduplicated)."""
        with self._lock:
            mailbox_id = fields.get("mailbox_id")
            if any(e.mailbox_id == mailbox_id for e in self._events):
                return None
            fields.setdefault("received_at", iso_time(self._clock()))
            event = InboundEvent(event_id=self._last_id + 1, **fields)
            line = json.dumps(event.to_dict(), ensure_ascii=False).encode("utf-8") + b"\n"
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)
            self._last_id = event.event_id
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
                fh.write(json.dumps(event.to_dict(), ensure_ascii=False).encode("utf-8") + b"\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)
        self._lines_on_disk = len(self._events)

    def recent(self, limit: int) -> list[InboundEvent]:
        """The newest `limit` events, newest first."""
        with self._lock:
            events = list(self._events)
        return list(reversed(events[-limit:])) if limit > 0 else []

    def after(self, last_id: int) -> list[InboundEvent]:
        """Events with an id above `last_id`, oldest first (what a resuming client missed)."""
        with self._lock:
            return [e for e in self._events if e.event_id > last_id]

    def oldest_id(self) -> int | None:
        with self._lock:
            return self._events[0].event_id if self._events else None


def _event_fields(maildir: Maildir, info: MessageInfo) -> dict[str, Any]:
    data = maildir.folder(info.folder).read(info.id)
    summary = header_summary(data)
    return {
        "mailbox_id": info.id,
        "mailbox": info.folder,
        "proxy_message_id": summary.queue_id,
        "internet_message_id": summary.message_id,
        "subject": summary.subject,
        "sender": summary.from_,
        "recipients": [*summary.to, *summary.cc],
    }


class InboundEvents:
    """The log plus the bus: `delivered(info)` records an event and wakes the subscribers."""

    def __init__(
        self,
        event_log: EventLog,
        maildir: Maildir,
        run_blocking: Callable[..., Deferred[Any]],
    ) -> None:
        self.log = event_log
        self._maildir = maildir
        self._run = run_blocking
        self._subscribers: list[Callable[[], None]] = []

    def subscribe(self, wake: Callable[[], None]) -> Callable[[], None]:
        """Call `wake()` (in the reactor thread) after new events; returns the unsubscriber."""
        self._subscribers.append(wake)

        def unsubscribe() -> None:
            if wake in self._subscribers:
                self._subscribers.remove(wake)

        return unsubscribe

    def _record(self, info: MessageInfo) -> InboundEvent | None:
        try:
            fields = _event_fields(self._maildir, info)
        except MaildirError:  # moved or deleted before we could read it: still an event
            fields = {"mailbox_id": info.id, "mailbox": info.folder}
        return self.log.append(**fields)

    def delivered(self, info: MessageInfo) -> Deferred[InboundEvent | None]:
        """Record the stored message `info` (call in the reactor thread)."""
        d = self._run(self._record, info)
        d.addCallback(self._published)
        d.addErrback(self._failed)
        return d

    def _published(self, event: InboundEvent | None) -> InboundEvent | None:
        if event is not None:
            self.wake()
        return event

    def _failed(self, failure: Any) -> None:
        log.failure("recording an inbound event failed", failure)

    def wake(self) -> None:
        for wake in list(self._subscribers):
            try:
                wake()
            except Exception:
                log.failure("an event subscriber failed")
