"""A stand-in for the edge's relay listener: the edge's own SMTP server with a test policy.

It takes AUTH PLAIN from one device (id and key), offers STARTTLS with a self-signed
certificate when given one, refuses the recipients in `refuse` (550 5.1.1) or answers them
451 4.7.1 while they are in `later`, and keeps each message it takes, answering
"250 2.0.0 Queued as Q<n>" as the edge's relay does. Start and stop it in the reactor thread.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path as FilePath
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IListeningPort
from twisted.python.failure import Failure

from edge.smtp import replies
from edge.smtp.address import Path
from edge.smtp.factory import SMTPServerFactory
from edge.smtp.replies import Reply
from edge.smtp.server import Limits
from edge.smtp.session import Session
from edge.tls import ensure_self_signed, server_context

DEVICE_ID = "dev_test"
DEVICE_KEY = "tpk_test_device_key"


@dataclass
class Taken:
    sender: str
    recipients: list[str]
    data: bytes
    tls: bool
    qid: str
    smtputf8: bool = False
    """Whether MAIL FROM asked for SMTPUTF8."""


@dataclass
class EdgeRelayStandIn:
    tls_dir: FilePath | None = None
    require_tls: bool = False
    refuse: set[str] = field(default_factory=set)
    later: set[str] = field(default_factory=set)
    taken: list[Taken] = field(default_factory=list)
    logins: list[tuple[str, bool]] = field(default_factory=list)
    port: IListeningPort | None = None

    def factory(self, reactor: Any) -> SMTPServerFactory:
        context = None
        if self.tls_dir is not None:
            cert, key = self.tls_dir / "edge-cert.pem", self.tls_dir / "edge-key.pem"
            ensure_self_signed(cert, key, "edge.test")
            context = server_context(cert, key)
        return SMTPServerFactory(lambda: _Policy(self), Limits(), "edge.test", reactor, context)

    def listen(self, reactor: Any, host: str = "127.0.0.1", port: int = 0) -> int:
        self.port = reactor.listenTCP(port, self.factory(reactor), interface=host)
        bound: Any = self.port.getHost()
        return int(bound.port)

    def stop(self) -> Any:
        port, self.port = self.port, None
        return port.stopListening() if port is not None else None


class _Sink:
    def __init__(self, relay: EdgeRelayStandIn, session: Session) -> None:
        self.relay = relay
        assert session.sender is not None
        self.sender = session.sender.address
        self.recipients = [r.address for r in session.recipients]
        self.tls = session.tls is not None
        self.smtputf8 = "SMTPUTF8" in session.sender.params
        self.chunks: list[bytes] = []

    def write(self, chunk: bytes) -> None:
        self.chunks.append(chunk)

    def abort(self) -> None:
        self.chunks = []

    def finish(self) -> Reply:
        qid = f"Q{len(self.relay.taken) + 1}"
        data = b"".join(self.chunks)
        self.relay.taken.append(
            Taken(self.sender, self.recipients, data, self.tls, qid, self.smtputf8)
        )
        return replies.S250_QUEUED.with_text(f"Queued as {qid}")


class _Policy:
    auth_offered = True
    auth_required = True

    def __init__(self, relay: EdgeRelayStandIn) -> None:
        self.relay = relay

    def connect(self, session: Session) -> None:
        session.auth_needs_tls = self.relay.require_tls

    def authenticate(self, session: Session, username: str, password: str) -> bool:
        self.relay.logins.append((username, session.tls is not None))
        return username == DEVICE_ID and password == DEVICE_KEY

    def mail_from(self, session: Session, sender: Path) -> None:
        return None

    def rcpt_to(self, session: Session, recipient: Path) -> Reply | None:
        if recipient.address in self.relay.refuse:
            return replies.S550_NO_SUCH_USER
        if recipient.address in self.relay.later:
            return replies.S451_POLICY_TEMP
        return None

    def data(self, session: Session) -> _Sink:
        return _Sink(self.relay, session)


def within(in_reactor: Any, fn: Callable[..., Any], *args: Any, limit: float = 30.0) -> Any:
    """`fn(*args)` run in the reactor thread, its Deferred waited for at most `limit`
    seconds (a wait that never ends fails the test rather than hanging it)."""
    done = threading.Event()
    out: list[Any] = []

    def finished(value: Any) -> None:
        out.append(value)
        done.set()

    def run() -> None:
        defer.maybeDeferred(fn, *args).addBoth(finished)

    in_reactor.reactor.callFromThread(run)
    assert done.wait(limit), f"{getattr(fn, '__qualname__', fn)} did not finish"
    value = out[0]
    if isinstance(value, Failure):
        value.raiseException()
    return value
