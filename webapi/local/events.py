"""Mail events for API clients: `recent` items and the server-sent events stream.

The same code serves the inbound log (`connector.events`: `/mail/recent`, `/mail/stream`)
and the outbound one (`connector.outbound.events`: `/mail/outbound/recent`, `/stream`):
anything shaped like `EventSource` (a log with increasing event ids plus a wake-up bus)
and a function that renders one event as clients see it. Each stream connection keeps the id of the last event it sent; when the event bus wakes it,
it asks the log for everything after that id, so events arrive in order, once, with no
gaps, including after a reconnect with `Last-Event-ID`. A `: ping` comment every 15 seconds
keeps proxies and clients from timing out. This module must never block the reactor thread
(the log is in memory) and never hold a closed connection's subscription.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from connector.events import InboundEvent
from webapi.errors import bad_parameter, set_common_headers
from webapi.local.mail import Links

__all__ = [
    "EventSource",
    "EventStream",
    "event_item",
    "last_event_id",
    "outbound_item",
    "recent_items",
]

PING_SECONDS = 15.0
_EVENT_ID = re.compile(rb"[0-9]{1,18}")


class LoggedEvent(Protocol):
    @property
    def event_id(self) -> int: ...


class EventLogView(Protocol):
    """What the API reads of an event log (`connector.events.EventLog` and the like)."""

    @property
    def last_id(self) -> int: ...
    def recent(self, limit: int) -> Sequence[Any]: ...
    def after(self, last_id: int) -> Sequence[Any]: ...
    def oldest_id(self) -> int | None: ...


class EventSource(Protocol):
    """An event log and its bus: `subscribe(wake)` calls `wake()` after new events."""

    @property
    def log(self) -> EventLogView: ...
    def subscribe(self, wake: Callable[[], None]) -> Callable[[], None]: ...


Render = Callable[[Any], dict[str, Any]]


def recent_items(
    source: EventSource, limit: int, after: int | None, render: Render
) -> list[dict[str, Any]]:
    """The newest `limit` events, newest first; with `after`, the first `limit` events
    with a larger id, oldest first (a cursor to poll with)."""
    if after is None:
        return [render(e) for e in source.log.recent(limit)]
    return [render(e) for e in list(source.log.after(after))[:limit]]


def event_item(event: InboundEvent, links: Links) -> dict[str, Any]:
    """The event as clients see it, with follow-up URLs for the current API address."""
    body = event.to_dict()
    body["from"] = body.pop("sender")
    msg, mailbox = event.mailbox_id, event.mailbox
    body.update(
        message_url=links.message(msg, mailbox),
        reply_url=links.message(msg, mailbox, "/reply"),
        delete_url=links.message(msg, mailbox),
        mark_url=links.message(msg, mailbox, "/mark"),
    )
    return body


def outbound_item(event: Any) -> dict[str, Any]:
    """An outbound event as clients see it (`sender` named `from`, as inbound)."""
    body: dict[str, Any] = event.to_dict()
    if "sender" in body:
        body["from"] = body.pop("sender")
    return body


def last_event_id(request: IRequest, from_query: int | None) -> int | None:
    """The id to resume after: the `Last-Event-ID` header, else `?last_event_id=`."""
    header = request.getHeader(b"last-event-id")
    if header is not None:
        header = header.strip()
        if not header:
            return from_query
        if not _EVENT_ID.fullmatch(header):
            raise bad_parameter("Last-Event-ID must be a non-negative integer")
        return int(header)
    return from_query


class _EventStream:
    """One open stream."""

    def __init__(
        self,
        request: IRequest,
        events: EventSource,
        render: Render,
        clock: IReactorTime,
        ping_seconds: float,
        last_id: int,
    ) -> None:
        self.request = request
        self.events = events
        self.render = render
        self.clock = clock
        self.ping_seconds = ping_seconds
        self.last_id = last_id
        self.closed = False
        self._ping: IDelayedCall | None = None
        self._unsubscribe = events.subscribe(self.wake)
        request.notifyFinish().addBoth(self.close)  # type: ignore[attr-defined]

    def start(self, resuming: bool) -> None:
        self.request.write(b"retry: 3000\n: connected\n\n")
        oldest = self.events.log.oldest_id()
        if resuming and oldest is not None and oldest > self.last_id + 1:
            gap = {"missed_from": self.last_id + 1, "resumed_at": oldest}
            self.request.write(b"event: gap\ndata: " + json.dumps(gap).encode() + b"\n\n")
        self.wake()
        self._schedule_ping()

    def _schedule_ping(self) -> None:
        self._ping = self.clock.callLater(self.ping_seconds, self.ping)

    def ping(self) -> None:
        self._ping = None
        if self.closed:
            return
        self.request.write(b": ping\n\n")
        self._schedule_ping()

    def wake(self) -> None:
        if self.closed:
            return
        for event in self.events.log.after(self.last_id):
            data = json.dumps(self.render(event), ensure_ascii=False)
            self.request.write(f"id: {event.event_id}\ndata: {data}\n\n".encode())
            self.last_id = event.event_id

    def close(self, _reason: object = None) -> None:
        self.closed = True
        self._unsubscribe()
        if self._ping is not None and self._ping.active():
            self._ping.cancel()
        self._ping = None


class EventStream(Resource):
    """The `text/event-stream` reply to one `GET .../stream` request."""

    isLeaf = True

    def __init__(
        self,
        events: EventSource,
        render: Render,
        clock: IReactorTime,
        last_id: int | None,
        ping_seconds: float = PING_SECONDS,
    ) -> None:
        super().__init__()
        self.events = events
        self.item = render
        self.clock = clock
        self.last_id = last_id
        self.ping_seconds = ping_seconds

    def render_GET(self, request: IRequest) -> int:
        request.setResponseCode(200)
        set_common_headers(request)
        request.setHeader(b"Content-Type", b"text/event-stream; charset=utf-8")
        request.setHeader(b"X-Accel-Buffering", b"no")
        resuming = self.last_id is not None
        start_after = self.last_id if self.last_id is not None else self.events.log.last_id
        connection = _EventStream(
            request,
            self.events,
            self.item,
            self.clock,
            self.ping_seconds,
            start_after,
        )
        connection.start(resuming)
        return NOT_DONE_YET
