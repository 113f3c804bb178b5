"""The outbound queue's items and the interface of its relay (`connector.outbound.queue`).

`OutboundItem` is what `OutboundQueue.submit` answers; `Entry` is what the queue keeps of a
message in memory; a `Relay` hands a message to the edge and answers with a `RelayResult`
of one `RelayOutcome` per recipient. Nothing here does I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from twisted.internet.defer import Deferred

from connector.outbound.outbox import OutboxEnvelope, RecipientState

__all__ = ["Entry", "OutboundItem", "Relay", "RelayOutcome", "RelayResult"]


@dataclass(frozen=True)
class RelayOutcome:
    """The edge's answer for one recipient: its reply code and text (enhanced code first)."""

    code: int
    text: str


@dataclass(frozen=True)
class RelayResult:
    """One relay attempt: an outcome per recipient, and the edge's queue id on a 250."""

    outcomes: dict[str, RelayOutcome]
    queue_id: str = ""
    where: str = ""
    connected: bool = True
    """False when the edge never answered for the message (unreachable, not linked, the
    connection failed): the outcomes are then 4xx of this device's own."""


class Relay(Protocol):
    """Hands one message to the edge. Never fails: an unreachable edge is a 4xx outcome."""

    def send(self, sender: str, recipients: list[str], data: bytes) -> Deferred[RelayResult]: ...

    def close(self) -> Deferred[None]: ...


@dataclass
class OutboundItem:
    """One submitted message, as `submit` answers it."""

    id: str
    message_id: str
    status: str
    sender: str
    recipients: list[str]
    subject: str = ""
    source: str = ""


@dataclass
class Entry:
    envelope: OutboxEnvelope
    states: dict[str, RecipientState] = field(default_factory=dict)
    has_data: bool = True

    @property
    def pending(self) -> list[str]:
        """Recipients not relayed (nor bounced) yet."""
        return [r for r in self.envelope.recipients if r not in self.states]

    @property
    def awaiting(self) -> list[str]:
        """Recipients the edge took whose final outcome is not known yet."""
        return [r for r, s in self.states.items() if not s.final]
