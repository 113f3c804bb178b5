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

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from connector.eventlog import EventBus, JsonLinesLog, iso_time
from maildir import Maildir, MaildirError, MessageInfo
from maildir.message import header_summary

__all__ = ["EventLog", "InboundEvent", "InboundEvents", "iso_time"]

log = Logger(namespace="tailpost.events")


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


class EventLog(JsonLinesLog[InboundEvent]):
    """The inbound events' log (`connector.eventlog.JsonLinesLog`), one event per stored
    message."""

    event_type = InboundEvent

    def append(self, **fields: Any) -> InboundEvent | None:
        """Record one event (id and received_at assigned here); None if the message already
        has an event (a redelivery the Maildir deduplicated)."""
        with self._lock:
            mailbox_id = fields.get("mailbox_id")
            if any(e.mailbox_id == mailbox_id for e in self._events):
                return None
            fields.setdefault("received_at", self._now())
            return self._write(InboundEvent(event_id=self.next_id, **fields))


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


class InboundEvents(EventBus):
    """The log plus the bus: `delivered(info)` records an event and wakes the subscribers."""

    def __init__(
        self,
        event_log: EventLog,
        maildir: Maildir,
        run_blocking: Callable[..., Deferred[Any]],
    ) -> None:
        super().__init__("inbound")
        self.log = event_log
        self._maildir = maildir
        self._run = run_blocking

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
