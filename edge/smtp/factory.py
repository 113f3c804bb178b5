"""The SMTP listener's factory: a session with its own policy per connection, within the
connection limits.

`SMTPServerFactory.admit` counts each new session against the total, per-address and
per-network limits (shared with the other MX processes when `counts` is) and gives the
refusal of one over a limit; `release` uncounts it when it closes. This module must never
read from or write to a connection: the protocol is `edge.smtp.server`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Factory

from edge.auththrottle import AuthThrottle
from edge.smtp import replies
from edge.smtp.conncount import LocalCounts, network_of
from edge.smtp.data import Limits
from edge.smtp.replies import Reply
from edge.smtp.server import SMTPServer
from edge.smtp.session import SessionHandler

__all__ = ["SMTPServerFactory"]


class SMTPServerFactory(Factory):
    """Makes sessions with a handler per connection and enforces connection limits."""

    def __init__(
        self,
        handler_factory: Callable[[], SessionHandler],
        limits: Limits,
        hostname: str,
        clock: IReactorTime,
        tls_context: Any = None,
        counts: LocalCounts | None = None,
        auth_throttle: AuthThrottle | None = None,
        auth_service: str = "smtp",
    ) -> None:
        """`counts` keeps the connections the limits are checked against: this factory's
        own by default, or shared with the other processes on the MX port.
        `auth_throttle` delays failed AUTH answers (logged as `auth_service`)."""
        self.handler_factory = handler_factory
        self.auth_throttle = auth_throttle
        self.auth_service = auth_service
        self.limits = limits
        self.hostname = hostname
        self.clock = clock
        self.tls_context = tls_context
        self.sessions: set[SMTPServer] = set()
        self.counts = counts if counts is not None else LocalCounts()

    def buildProtocol(self, addr: Any) -> SMTPServer:  # type: ignore[override]
        proto = SMTPServer(
            self.handler_factory(), self.limits, self.hostname, self.clock, self.tls_context
        )
        proto.factory = self
        return proto

    def admit(self, proto: SMTPServer) -> Reply | None:
        """Count the new session: its refusal if it is over a limit (it is counted until
        it is released all the same). Over the total, over the client address's limit, over
        its network's limit; and once the total is within `reserved_connections` of its
        limit, only clients whose network holds at most `reserved_per_network` sessions get
        in, so that one network filling its share never shuts out the others."""
        assert proto.session is not None
        self.sessions.add(proto)
        limits, host = self.limits, proto.session.peer_host
        proto.network = network_of(host, limits.network_v4_prefix, limits.network_v6_prefix)
        total, of_ip = self.counts.add(host)
        of_network = self.counts.add_network(proto.network)
        if total > limits.max_connections:
            return replies.S421_TOO_MANY_CONNECTIONS
        if of_ip > limits.max_connections_per_ip:
            return replies.S421_TOO_MANY_FROM_IP
        if of_network > limits.max_connections_per_network or (
            total > limits.max_connections - limits.reserved_connections
            and of_network > limits.reserved_per_network
        ):
            return replies.S421_TOO_MANY_FROM_NETWORK
        return None

    def release(self, proto: SMTPServer) -> None:
        if proto in self.sessions:
            self.sessions.discard(proto)
            self.counts.remove(proto.session.peer_host if proto.session else "")
            self.counts.remove_network(proto.network)
