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

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from connector.eventlog import DEFAULT_KEEP, EventBus, JsonLinesLog

__all__ = ["STATUSES", "OutboundEvent", "OutboundEventLog", "OutboundEvents"]

log = Logger(namespace="tailpost.outbound.events")

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


class OutboundEventLog(JsonLinesLog[OutboundEvent]):
    """The outbound events' log (`connector.eventlog.JsonLinesLog`)."""

    event_type = OutboundEvent

    def __init__(self, path: Path, clock: Callable[[], float], *, keep: int = DEFAULT_KEEP) -> None:
        self.last_item_id = ""
        """The greatest message id any event names (new ids are made above it)."""
        super().__init__(path, clock, keep=keep)

    def _kept(self, event: OutboundEvent) -> None:
        self.last_item_id = max(self.last_item_id, event.proxy_message_id)

    def append(self, **fields: Any) -> OutboundEvent:
        """Record one event (its id and `created_at` are assigned here)."""
        with self._lock:
            fields.setdefault("created_at", self._now())
            event = OutboundEvent(event_id=self.next_id, **fields)
            if event.status not in STATUSES:
                raise ValueError(f"unknown outbound status {event.status!r}")
            return self._write(event)

    def of_message(self, proxy_message_id: str) -> list[OutboundEvent]:
        """The kept events of one message, oldest first."""
        with self._lock:
            return [e for e in self._events if e.proxy_message_id == proxy_message_id]


class OutboundEvents(EventBus):
    """The log plus the bus: `record(**fields)` appends an event and wakes the subscribers."""

    def __init__(self, event_log: OutboundEventLog, run_blocking: Callable[..., Deferred[Any]]):
        super().__init__("outbound")
        self.log = event_log
        self._run = run_blocking

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
