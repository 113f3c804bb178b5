"""The device's event logs: a JSON-lines file with increasing ids, and a wake-up bus.

Both the inbound events (`connector.events`) and the outbound ones
(`connector.outbound.events`) are kept this way. `JsonLinesLog` appends each event to a file
(one object per line, fsynced) and keeps the newest `keep` in memory; ids only ever grow,
across restarts and compactions, so a client resuming with `Last-Event-ID` gets exactly the
events it missed. A torn or foreign line is skipped on load, never fatal. `EventBus` wakes
its subscribers in the reactor thread; they pull `after(last_id)` rather than being handed
one event, so a late wake-up can never reorder, skip or repeat an event.

Appends do file I/O: call them in a worker thread, never in the reactor thread.
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar, Generic, Protocol, Self, TypeVar

from twisted.logger import Logger

from maildir.durable import write_durably

__all__ = ["DEFAULT_KEEP", "EventBus", "JsonLinesLog", "iso_time"]

log = Logger(namespace="tailpost.events")

DEFAULT_KEEP = 1000


def iso_time(seconds: float) -> str:
    """UTC time as `2026-04-03T19:12:24Z`."""
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Event(Protocol):
    """What a log keeps: a dataclass with an `event_id`, read back by `from_dict`."""

    @property
    def event_id(self) -> int: ...

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Self: ...


E = TypeVar("E", bound=Event)


class JsonLinesLog(Generic[E]):
    """Append-only JSON-lines event file plus the newest `keep` events in memory.

    Thread-safe: appends and reads take one lock. A subclass names its `event_type` and
    makes its events in `append` through `_write`.
    """

    event_type: ClassVar[type[Any]]

    def __init__(self, path: Path, clock: Callable[[], float], *, keep: int = DEFAULT_KEEP) -> None:
        if keep < 1:
            raise ValueError("keep must be at least 1")
        self.path = path
        self._clock = clock
        self._keep = keep
        self._lock = threading.Lock()
        self._events: deque[E] = deque(maxlen=keep)
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
                event: E = self.event_type.from_dict(json.loads(line))
            except (ValueError, TypeError):
                continue  # a torn or foreign line: skipped, never fatal
            if event.event_id > self._last_id:
                self._events.append(event)
                self._last_id = event.event_id
                self._kept(event)
            self._lines_on_disk += 1
        if raw and not raw.endswith(b"\n"):
            with open(self.path, "ab") as fh:  # end a torn last line before appending
                fh.write(b"\n")

    def _kept(self, event: E) -> None:
        """Called for each event loaded or appended (under the lock on append)."""

    @property
    def last_id(self) -> int:
        with self._lock:
            return self._last_id

    @property
    def next_id(self) -> int:
        """The id the next event gets (read under the lock, in `append`)."""
        return self._last_id + 1

    def _now(self) -> str:
        return iso_time(self._clock())

    def _write(self, event: E) -> E:
        """Append `event` (made with `next_id`) to the file and keep it (hold the lock)."""
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, _line(event))
            os.fsync(fd)
        finally:
            os.close(fd)
        self._last_id = event.event_id
        self._events.append(event)
        self._kept(event)
        self._lines_on_disk += 1
        if self._lines_on_disk > 2 * self._keep:
            self._compact()
        return event

    def _compact(self) -> None:
        """Rewrite the file with the events kept in memory (caller holds the lock)."""
        tmp = self.path.with_name(self.path.name + ".tmp")
        write_durably(tmp, self.path, [_line(event) for event in self._events])
        self._lines_on_disk = len(self._events)

    def recent(self, limit: int) -> list[E]:
        """The newest `limit` events, newest first."""
        with self._lock:
            events = list(self._events)
        return list(reversed(events[-limit:])) if limit > 0 else []

    def after(self, last_id: int) -> list[E]:
        """Events with an id above `last_id`, oldest first (what a resuming client missed)."""
        with self._lock:
            return [e for e in self._events if e.event_id > last_id]

    def oldest_id(self) -> int | None:
        with self._lock:
            return self._events[0].event_id if self._events else None


def _line(event: Any) -> bytes:
    """What a line of the file holds: every field of the event."""
    return json.dumps(dataclasses.asdict(event), ensure_ascii=False).encode("utf-8") + b"\n"


class EventBus:
    """Subscribers woken in the reactor thread after new events."""

    def __init__(self, what: str) -> None:
        self._what = what
        self._subscribers: list[Callable[[], None]] = []

    def subscribe(self, wake: Callable[[], None]) -> Callable[[], None]:
        """Call `wake()` (in the reactor thread) after new events; returns the unsubscriber."""
        self._subscribers.append(wake)

        def unsubscribe() -> None:
            if wake in self._subscribers:
                self._subscribers.remove(wake)

        return unsubscribe

    def wake(self) -> None:
        for wake in list(self._subscribers):
            try:
                wake()
            except Exception:
                log.failure("a subscriber of the {what} events failed", what=self._what)
