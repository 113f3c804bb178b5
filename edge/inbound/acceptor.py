"""Acceptor processes: more MX listeners on the same port, one per extra CPU.

One Python process runs on one core. With `edge.mx_processes = N`, the edge process starts
N-1 acceptor processes (`python -m edge.inbound.acceptor`). Each binds the MX port with SO_REUSEPORT
(the edge's own listener does too), so the kernel spreads connections over all of them, and
each runs the whole inbound policy: SMTP, checks, store lookups, and the durable spool
commit, into the edge's spool directory (each into segments of its own). Delivery stays in
the edge process, which owns the queue: when an acceptor's batch is durable, and before any
of its messages is answered 250, the acceptor writes the batch's entries to a pipe
(descriptor 3), and the edge takes them into its spool index and delivery queue. A
hand-over that cannot be written undoes the batch, so the client gets a 4xx and nothing is
left that nobody delivers. If the edge dies with entries still in the pipe, its start-up
recovery finds the batches in the spool. The edge deletes a segment only once it is sealed:
the acceptor says so on the pipe when it starts the next one (or stops), and the edge
seals every segment of an acceptor that exited.

The edge hands each acceptor its configuration on standard input and restarts an acceptor
that exits; an acceptor ends with the edge (SIGTERM on the parent's death). An acceptor reads
the store (routes, devices, rules) through its own short cache, so a control-plane change
reaches it within that cache's lifetime, as it reaches other edges sharing the database.
Connection limits (`max_connections`, `max_connections_per_ip`) hold over all the
processes: each counts in shared memory the edge hands it as descriptor 4
(`edge.smtp.conncount`), and the edge clears an acceptor's counts when it exits.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer, protocol
from twisted.logger import FileLogObserver, Logger, eventAsText, globalLogBeginner
from twisted.python.failure import Failure

from edge.config import Config, config_from_json, config_to_json
from edge.runtime.reactordispatch import direct_dispatch
from edge.runtime.service import freeze_start_up
from edge.smtp.conncount import SharedCounts
from edge.spool.spool import Envelope, Spool, SpoolEntry

log = Logger()

NOTIFY_FD = 3
"""The acceptor's descriptor for batch hand-overs (a pipe the edge reads): one JSON line per
batch, `{"batch": segment, "entries": [...]}`, and `{"sealed": segment}` once no more
batches go into that segment."""

COUNTS_FD = 4
"""The acceptor's descriptor for the connection counts shared with the other processes."""

RESTART_DELAY = 1.0
"""Seconds before an acceptor that exited is started again (10x that after a quick exit)."""


# -- the edge's side ---------------------------------------------------------------------------


class _AcceptorProtocol(protocol.ProcessProtocol):
    def __init__(self, pool: AcceptorPool, index: int) -> None:
        self.pool = pool
        self.index = index
        self.pending = b""
        self.errors = b""
        self.ended: defer.Deferred[None] = defer.Deferred()
        self.started_at = pool.reactor.seconds()
        self.segments: set[str] = set()
        """The acceptor's segments the edge took batches from, not sealed yet."""

    def childDataReceived(self, childFD: int, data: bytes) -> None:  # noqa: N802
        if childFD == NOTIFY_FD:
            self.pending += data
            *lines, self.pending = self.pending.split(b"\n")
            for line in lines:
                if line == b"listening":
                    log.info("acceptor {index} is listening", index=self.index)
                elif line:
                    self.pool.take_batch(line, self)
        elif childFD == 2:
            self.errors += data
            *lines, self.errors = self.errors.split(b"\n")
            for line in lines:
                log.info(
                    "acceptor {index}: {line}",
                    index=self.index,
                    line=line.decode("utf-8", "replace"),
                )

    def processEnded(self, reason: Failure) -> None:  # noqa: N802
        self.ended.callback(None)
        self.pool.ended(self, reason)


class AcceptorPool(Service):
    """Starts and keeps `count` acceptor processes on the MX listener's port."""

    def __init__(
        self,
        config: Config,
        reactor: Any,
        listener: Any,
        spool: Spool,
        enqueue: Any,
        count: int,
        tls_files: tuple[Path, Path] | None = None,
        *,
        after: Any = None,
        counts: SharedCounts | None = None,
    ) -> None:
        """`counts` is the edge's own part (slot 0) of the connection counts shared with
        the acceptors; acceptor N counts in slot N."""
        self.setName("acceptors")
        self.config = config
        self.reactor = reactor
        self.listener = listener
        self.spool = spool
        self.enqueue = enqueue
        self.count = count
        self.tls_files = tls_files
        self.after = after
        self.counts = counts
        self.children: dict[int, _AcceptorProtocol] = {}
        self._restarts: dict[int, Any] = {}

    def startService(self) -> None:
        """Start the acceptors once `after` (a callable giving a Deferred: the edge's spool
        recovery) is done, so that recovery and hand-overs never overlap."""
        super().startService()
        d: defer.Deferred[Any] = self.after() if self.after else defer.succeed(None)
        d.addCallback(lambda _: self._spawn_all())
        d.addErrback(lambda f: log.failure("acceptors not started", f))

    def _spawn_all(self) -> None:
        if not self.running:
            return
        for index in range(1, self.count + 1):
            self._spawn(index)

    def _spawn(self, index: int) -> None:
        self._restarts.pop(index, None)
        proto = _AcceptorProtocol(self, index)
        payload = {
            "config": config_to_json(self.config),
            "listen": self.listener.address,
            "tls": [str(p) for p in self.tls_files] if self.tls_files else None,
            "index": index,
            "slots": self.counts.slots if self.counts is not None else 0,
        }
        env = dict(os.environ)
        fds: dict[int, Any] = {0: "w", 1: "r", 2: "r", NOTIFY_FD: "r"}
        if self.counts is not None:
            fds[COUNTS_FD] = self.counts.fd
        self.reactor.spawnProcess(
            proto,
            sys.executable,
            [sys.executable, "-m", "edge.inbound.acceptor"],
            env=env,
            childFDs=fds,
        )
        transport: Any = proto.transport
        transport.writeToChild(0, json.dumps(payload).encode())
        transport.closeChildFD(0)
        self.children[index] = proto

    def take_batch(self, line: bytes, proto: _AcceptorProtocol) -> None:
        """An acceptor committed a batch: index it and queue its messages for delivery. Or
        it sealed a segment: that may go once its messages are finished."""
        try:
            record = json.loads(line)
            if "sealed" in record:
                segment = str(record["sealed"])
                proto.segments.discard(segment)
                self.spool.seal(segment)
                return
            entries = [SpoolEntry.from_record(r) for r in record["entries"]]
        except (ValueError, KeyError, TypeError) as exc:
            # The batch is on disk; the next start of the edge recovers it.
            log.error("acceptor hand-over unreadable ({exc}): {line!r}", exc=exc, line=line[:200])
            return
        segment = str(record["batch"])
        self.spool.adopt(segment, entries)
        proto.segments.add(segment)
        for entry in entries:
            self.enqueue(entry.envelope)

    def ended(self, proto: _AcceptorProtocol, reason: Failure) -> None:
        for segment in proto.segments:  # it appends to them no more
            self.spool.seal(segment)
        proto.segments.clear()
        if self.counts is not None:  # its connections are gone with it
            self.counts.clear(proto.index)
        if self.children.get(proto.index) is proto:
            del self.children[proto.index]
        if not self.running:
            return
        quick = self.reactor.seconds() - proto.started_at < 5.0
        delay = RESTART_DELAY * (10 if quick else 1)
        log.warn(
            "acceptor {index} exited ({reason}); starting it again in {delay:.0f}s",
            index=proto.index,
            reason=reason.getErrorMessage(),
            delay=delay,
        )
        self._restarts[proto.index] = self.reactor.callLater(delay, self._spawn, proto.index)

    def stopService(self) -> defer.Deferred[Any]:
        super().stopService()
        for call in self._restarts.values():
            if call.active():
                call.cancel()
        self._restarts.clear()
        waiting = []
        for proto in list(self.children.values()):
            waiting.append(proto.ended)
            if _signal(proto, "TERM"):
                kill = self.reactor.callLater(15.0, _signal, proto, "KILL")
                proto.ended.addCallback(_cancel, kill)
        return defer.DeferredList(waiting)


def _signal(proto: _AcceptorProtocol, name: str) -> bool:
    transport: Any = proto.transport
    try:
        transport.signalProcess(name)
    except Exception:  # already gone
        return False
    return True


def _cancel(result: None, call: Any) -> None:
    if call.active():
        call.cancel()


# -- the acceptor's side -----------------------------------------------------------------------


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def hand_over(fd: int) -> Any:
    """The spool's `on_commit` of an acceptor: one line per batch on `fd`."""

    def on_commit(batch: str, entries: list[SpoolEntry]) -> None:
        record = {"batch": batch, "entries": [e.to_record() for e in entries]}
        _write_all(fd, json.dumps(record).encode() + b"\n")

    return on_commit


def hand_over_seal(fd: int) -> Any:
    """The spool's `on_seal` of an acceptor: one line per sealed segment on `fd`."""

    def on_seal(segment: str) -> None:
        _write_all(fd, json.dumps({"sealed": segment}).encode() + b"\n")

    return on_seal


def _end_with_parent() -> None:
    """SIGTERM when the edge process dies (Linux), and stop now if it is already gone."""
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent or parent == 1:
        sys.exit(0)


def build_acceptor(
    config: Config,
    reactor: Any,
    listen: str,
    tls_files: tuple[Path, Path] | None,
    fd: int,
    counts: SharedCounts | None = None,
) -> Any:
    """The acceptor's service: the MX listener over the shared spool and store."""
    from edge.dns.namehosts import use_configured_names
    from edge.dns.resolver import DNSResolver
    from edge.inbound.listener import build_mx_factory
    from edge.runtime.service import TCPListener
    from edge.runtime.storeopen import open_configured_store
    from edge.spool.committer import mx_committer
    from edge.store.cache import CachedLookups
    from edge.tls import server_context

    store = open_configured_store(config, migrate=False, create_key=False)
    spool = Spool(
        config.spool_path, on_commit=hand_over(fd), on_seal=hand_over_seal(fd), index=False
    )
    resolver = DNSResolver(
        config.dns.nameservers or None, config.dns.port, config.dns.timeout, reactor=reactor
    )
    use_configured_names(reactor, resolver)
    tls = server_context(*tls_files) if tls_files else None

    def accepted(envelope: Envelope) -> None:
        """Delivery belongs to the edge process, which has the batch already."""

    commit = mx_committer(spool, reactor).commit  # the spool's durability, chosen once
    factory = build_mx_factory(
        config, reactor, CachedLookups(store), spool, resolver, accepted, commit, tls, counts=counts
    )
    return TCPListener("mx", listen, factory, reactor, reuse_port=True)


def main() -> None:
    _end_with_parent()
    payload = json.loads(sys.stdin.buffer.read())
    config = config_from_json(payload["config"])
    tls = payload.get("tls")
    tls_files = (Path(tls[0]), Path(tls[1])) if tls else None
    globalLogBeginner.beginLoggingTo(
        [
            FileLogObserver(
                sys.stderr,
                lambda event: (
                    (eventAsText(event, includeTimestamp=False, includeSystem=False) or "") + "\n"
                ),
            )
        ],
        redirectStandardIO=False,
    )
    from twisted.internet import reactor as _reactor

    reactor: Any = _reactor
    slots = int(payload.get("slots") or 0)
    counts = SharedCounts(COUNTS_FD, int(payload["index"]), slots) if slots else None
    listener = build_acceptor(config, reactor, payload["listen"], tls_files, NOTIFY_FD, counts)

    def start() -> None:
        listener.startService()
        _write_all(NOTIFY_FD, b"listening\n")

    reactor.callWhenRunning(start)
    reactor.addSystemEventTrigger("before", "shutdown", listener.stopService)
    direct_dispatch(reactor)
    freeze_start_up()
    reactor.run()


if __name__ == "__main__":
    main()
