"""Inbound mail events for API clients: `recent` items and the server-sent events stream.

Each stream connection keeps the id of the last event it sent; when the event bus wakes it,
it asks the log for everything after that id, so events arrive in order, once, with no
gaps, including after a reconnect with `Last-Event-ID`. A `: ping` comment every 15 seconds
keeps proxies and clients from timing out. This module must never block the reactor thread
(the log is in memory) and never hold a closed connection's subscription.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from connector.events import InboundEvent, InboundEvents
from webapi.errors import bad_parameter, set_common_headers
from webapi.local.mail import Links

__all__ = ["EventStream", "event_item", "last_event_id"]

PING_SECONDS = 15.0
_EVENT_ID = re.compile(rb"[0-9]{1,18}")


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


class _Connection:
    """One open stream."""

    def __init__(
        self,
        request: IRequest,
        events: InboundEvents,
        render: Callable[[InboundEvent], dict[str, Any]],
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
        events: InboundEvents,
        links: Links,
        clock: IReactorTime,
        last_id: int | None,
        ping_seconds: float = PING_SECONDS,
    ) -> None:
        super().__init__()
        self.events = events
        self.links = links
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
        connection = _Connection(
            request,
            self.events,
            lambda event: event_item(event, self.links),
            self.clock,
            self.ping_seconds,
            start_after,
        )
        connection.start(resuming)
        return NOT_DONE_YET
