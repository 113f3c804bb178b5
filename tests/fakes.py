"""The stand-ins the tests share: what lies outside the code under test, written once.

- A downstream MTA: `DownstreamMX`, an aiosmtpd handler (a real SMTP peer on loopback)
  that records what it is given, started by `start_peer` on an OS-chosen port.
- For the delivery queue: `ScriptedDeliverer` (plays every host the queue delivers to),
  `MXResolver` (a resolver for `Router`), `RecordingSpool` (a real spool that remembers
  what was committed and finished) and `run_sync`.
- For the check pipeline: `ScriptedCheck` and `WaitingCheck`.

Nothing here stands in for the code a test is about: each replaces a remote host, a clock
or a collaborator the test only needs to observe.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from edge.checks.base import BaseCheck, Finding, Recipient, Transaction
from edge.delivery.outcomes import Outcome
from edge.delivery.routing import Target
from edge.dns.resolver import DNSTemporaryError
from edge.spool.spool import Envelope, Spool, SpoolWriter

# A downstream MTA -------------------------------------------------------------------------


@dataclass
class Seen:
    """One transaction as the peer saw it."""

    sender: str
    recipients: list[str]
    data: bytes
    tls: bool


@dataclass
class DownstreamMX:
    """An aiosmtpd handler: refuses some recipients at RCPT, answers DATA as told, and
    keeps every transaction it answered in `seen`."""

    refuse: dict[str, str] = field(default_factory=dict)
    data_reply: str = "250 2.0.0 Message accepted for delivery"
    seen: list[Seen] = field(default_factory=list)
    port: int = 0

    async def handle_RCPT(  # noqa: N802
        self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: Any
    ) -> str:
        if address in self.refuse:
            return self.refuse[address]
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802
        data = envelope.original_content
        assert isinstance(data, bytes)
        # STARTTLS sets the session's `ssl`; TLS from the first octet shows on the transport.
        tls = session.ssl is not None or server.transport.get_extra_info("ssl_object") is not None
        self.seen.append(Seen(envelope.mail_from, list(envelope.rcpt_tos), data, tls))
        return self.data_reply


class AnyPortController(Controller):
    """aiosmtpd's Controller on an OS-chosen port (it needs the port to check readiness)."""

    def _trigger_server(self) -> None:
        server: Any = self.server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]
        super()._trigger_server()


@dataclass
class Peer:
    """A started peer: its handler and its controller (`controller.stop()` ends it)."""

    handler: Any
    controller: Controller

    @property
    def port(self) -> int:
        return int(self.controller.port)


def start_peer(
    handler: Any,
    tls_context: ssl.SSLContext | None = None,
    *,
    implicit: bool = False,
    controller: type[Controller] = AnyPortController,
    **kwargs: Any,
) -> Peer:
    """A peer on a free port of 127.0.0.1: STARTTLS offered with `tls_context`, or
    (`implicit`) TLS from the first octet with it, as on port 465. `kwargs` go to the
    controller (e.g. `enable_SMTPUTF8=False`)."""
    if tls_context is not None and implicit:
        kwargs.update(ssl_context=tls_context)
    elif tls_context is not None:
        kwargs.update(tls_context=tls_context, require_starttls=False)
    kwargs.setdefault("server_hostname", "old-mx.test")
    started = controller(handler, hostname="127.0.0.1", port=0, **kwargs)
    started.start()
    if hasattr(handler, "port"):
        handler.port = int(started.port)
    return Peer(handler, started)


def closed_port() -> int:
    """A port of 127.0.0.1 that nothing listens on (it was free a moment ago)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def mx_target(*ports: int, starttls: bool = True) -> Target:
    """An MX target whose hosts are the given ports of 127.0.0.1, in order."""
    return Target(
        kind="mx",
        key="mx:example.com",
        hosts=tuple(("127.0.0.1", p) for p in ports),
        starttls=starttls,
    )


# The delivery queue's collaborators -------------------------------------------------------


def run_sync(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> defer.Deferred[Any]:
    """`run_blocking` for a queue under a fake clock: the work is done at once."""
    return defer.maybeDeferred(fn, *args, **kwargs)


class MXResolver:
    """A resolver for `Router`: every domain's MX is mx.<domain> at 192.0.2.25, unless
    `failing` (a temporary DNS error). Every MX lookup is noted in `lookups`."""

    def __init__(self) -> None:
        self.failing = False
        self.lookups: list[str] = []

    def mx(self, name: str) -> list[tuple[int, str]]:
        self.lookups.append(name)
        if self.failing:
            raise DNSTemporaryError(f"MX {name}: timed out")
        return [(10, f"mx.{name}")]

    def addresses(self, name: str) -> list[str]:
        return ["192.0.2.25"]

    def host_addresses(self, name: str) -> list[str]:
        return ["192.0.2.25"]


@dataclass
class Call:
    """One delivery the queue asked for: when, where, what; `result` is what it got."""

    at: float
    target: Target
    sender: str
    recipients: list[str]
    data: bytes
    result: defer.Deferred[dict[str, Outcome]] = field(default_factory=defer.Deferred)


Answer = dict[str, Outcome] | BaseException | None
Script = Callable[[Call], Answer]


def pending(call: Call) -> Answer:
    """Leaves the delivery unanswered (the test fires `call.result` when it wants)."""
    return None


def accepted(call: Call) -> dict[str, Outcome]:
    """What `SMTPDeliverer` reports when the host took every recipient."""
    host = "{}:{}".format(*call.target.hosts[0])
    return dict.fromkeys(call.recipients, Outcome(250, "2.0.0 Ok", host))


def refused(call: Call) -> dict[str, Outcome]:
    """What `SMTPDeliverer` reports for a host that does not answer."""
    host = "{}:{}".format(*call.target.hosts[0])
    return dict.fromkeys(
        call.recipients, Outcome(451, "4.4.1 connection refused", host, connected=False)
    )


@dataclass
class ScriptedDeliverer:
    """Plays every host the queue delivers to, and records each call.

    A call to a target of kind K is answered by `scripts[K]`, else by `script`, except that
    an MX target (the senders' MX hosts, which receive the DSNs) is `accepted` unless
    scripted. A script returns the outcomes, or an exception (the delivery fails with it),
    or None (the delivery stays pending). `calls` are the calls to anything but an MX,
    `dsn_calls` those to an MX, `to(kind)` those to one kind.
    """

    clock: IReactorTime | None = None
    script: Script = pending
    scripts: dict[str, Script] = field(default_factory=dict)
    log: list[Call] = field(default_factory=list)

    def deliver(
        self,
        target: Target,
        sender: str,
        recipients: list[str],
        data: bytes,
        *,
        smtputf8: bool = False,
        envid: str = "",
    ) -> defer.Deferred[dict[str, Outcome]]:
        at = self.clock.seconds() if self.clock is not None else 0.0
        call = Call(at, target, sender, list(recipients), data)
        self.log.append(call)
        default = accepted if target.kind == "mx" else self.script
        answer = self.scripts.get(target.kind, default)(call)
        if isinstance(answer, BaseException):
            call.result.errback(Failure(answer))
        elif answer is not None:
            call.result.callback(answer)
        return call.result

    @property
    def calls(self) -> list[Call]:
        return [c for c in self.log if c.target.kind != "mx"]

    @property
    def dsn_calls(self) -> list[Call]:
        return self.to("mx")

    def to(self, kind: str) -> list[Call]:
        return [c for c in self.log if c.target.kind == kind]

    def rcpts(self) -> list[list[str]]:
        """The recipients of each call to anything but an MX, in order."""
        return [c.recipients for c in self.calls]


class RecordingSpool(Spool):
    """A real spool that remembers every envelope committed (with its data) and every
    `mark_finished`."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.committed: list[tuple[Envelope, bytes]] = []
        self.finished_log: list[tuple[str, dict[str, str]]] = []

    def commit(self, writer: SpoolWriter, envelope: Envelope) -> None:
        super().commit(writer, envelope)
        self.committed.append((envelope, self.read(envelope.qid)))

    def mark_finished(self, qid: str, outcomes: dict[str, str]) -> None:
        self.finished_log.append((qid, dict(outcomes)))
        super().mark_finished(qid, outcomes)

    def dsns(self) -> list[tuple[Envelope, bytes]]:
        return [(e, d) for e, d in self.committed if e.kind == "dsn"]


# Checks -----------------------------------------------------------------------------------


class ScriptedCheck(BaseCheck):
    """Answers every stage at once with `found`; notes in `log` when it ran."""

    def __init__(self, name: str, log: list[str], found: list[Finding] | None = None) -> None:
        self.name = name
        self.log = log
        self.found = found or []

    def mail(self, tx: Transaction) -> Any:
        self.log.append(self.name)
        return list(self.found)

    def rcpt(self, tx: Transaction, recipient: Recipient) -> Any:
        return self.mail(tx)

    def data(self, tx: Transaction, message: bytes) -> Any:
        return self.mail(tx)


class WaitingCheck(ScriptedCheck):
    """Answers with `answer` (a Deferred, maybe fired already; never fired: it hangs)."""

    def __init__(self, name: str, log: list[str], answer: defer.Deferred[Any]) -> None:
        super().__init__(name, log)
        self.answer = answer

    def mail(self, tx: Transaction) -> Any:
        self.log.append(self.name)
        return self.answer
