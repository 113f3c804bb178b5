"""The outbound operations of `/v1`: what became of the mail devices relayed.

`GET /v1/outbound/events?after=&limit=` answers the delivery events (accepted, delivered,
deferred, bounced, expired, deleted, per recipient) of messages relayed through the edge's
relay (`edge.outbound`), oldest first, after the event id `after`: a device key sees only
the messages that device relayed, the admin key every device's. `next_after` is the id to
ask after next time. Blocking (SQL), run in a thread by `webapi.v1.app`; this module must
never show one device another's mail.
"""

from __future__ import annotations

from typing import Any

from edge.store import Store
from edge.store.outbound import OutboundStore
from webapi.v1 import models as m
from webapi.v1.ops import Principal

__all__ = ["OutboundOps"]


class OutboundOps:
    def __init__(self, store: Store) -> None:
        self.outbound = OutboundStore(store)

    def events(self, p: Principal, query: m.OutboundEventsQuery) -> dict[str, Any]:
        device = None if p.kind == "admin" else (p.device_id or "")
        found = self.outbound.events(device_id=device, after=query.after, limit=query.limit)
        body = {
            "events": [e.to_dict() for e in found],
            "next_after": found[-1].id if found else query.after,
        }
        return m.OutboundEventList.model_validate(body).model_dump(mode="json")
