"""The edge for benchmarks only: the whole MX policy runs, and an accepted message is dropped.

`DiscardingMXHandler` is the edge's `MXHandler` except that DATA goes to a `DiscardSink`:
the checks judge the message, then 250 is sent with nothing kept. It measures the protocol
and policy layers without the spool. Run as a script, this module starts the edge as
`twistd -n tailpost-edge` does (`make_service`), with this handler on the MX listener; it is
one process (`edge.mx_processes` must be 1, since each acceptor process builds its own
production listener).

This module must never be used by a real MX: the 250 it sends is a lie about durability.
Nothing outside bench/ imports it, and the production configuration has no way to ask for it.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edge.checks import CheckPipeline, Transaction
from edge.inbound.policy import MXHandler
from edge.runtime.nowlater import NowOrLater, then
from edge.smtp import replies
from edge.smtp.replies import Reply

DISCARDED = replies.S250_OK.with_text("Discarded")


class DiscardSink:
    """Runs the checks on the data, then answers 250 without keeping anything. Without
    checks, it only counts the octets."""

    def __init__(self, checks: CheckPipeline | None = None, tx: Transaction | None = None) -> None:
        self.checks = checks
        self.tx = tx
        self.chunks: list[bytes] = []
        self.size = 0

    def write(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.checks is not None:
            self.chunks.append(chunk)

    def abort(self) -> None:
        self.chunks = []
        self.size = 0

    def finish(self) -> NowOrLater[Reply]:
        """The 250 (or a Deferred of it) once the checks have judged the message."""
        if self.checks is not None and self.tx is not None:
            message = b"".join(self.chunks)
            self.chunks = []
            return then(self.checks.data(self.tx, message), _discarded)
        return DISCARDED


def _discarded(_: object) -> Reply:
    return DISCARDED


class DiscardingMXHandler(MXHandler):
    """The MX policy of one connection, up to the data, which it drops after the checks."""

    def data(self, session: Any) -> Any:
        return DiscardSink(self.checks, self.tx)


def make_service(config_path: str, data_dir: str, reactor: Any) -> Any:
    """What `edge.tap.makeService` builds, with `DiscardingMXHandler` on the MX listener."""
    from twisted.application.service import MultiService

    from edge.app import build_edge
    from edge.config import ConfigError, load_config
    from edge.runtime.reactordispatch import direct_dispatch
    from edge.runtime.service import ReadyReport, freeze_start_up

    config = load_config(config_path, data_dir=data_dir)
    if config.edge.mx_processes != 1:
        raise ConfigError("the discarding edge runs in one process: edge.mx_processes = 1")
    edge = build_edge(config, reactor, handler_class=DiscardingMXHandler)
    top = MultiService()
    edge.service.setServiceParent(top)
    report = ReadyReport(config.data_path / "run", [edge.mx, edge.control.listener])
    report.ready.append(edge.control.on_ready)
    report.setServiceParent(top)
    direct_dispatch(reactor)
    freeze_start_up()
    return top


def main(argv: list[str]) -> None:
    """`discard_edge.py --config <file> --data-dir <dir>`: the edge in the foreground, its
    log on stderr, until SIGTERM or SIGINT."""
    import argparse

    from twisted.internet import reactor as default_reactor
    from twisted.logger import globalLogBeginner, textFileLogObserver

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--data-dir", required=True)
    args = parser.parse_args(argv)
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)], redirectStandardIO=False)
    reactor: Any = default_reactor
    top = make_service(args.config, args.data_dir, reactor)
    reactor.callWhenRunning(top.startService)
    reactor.addSystemEventTrigger("before", "shutdown", top.stopService)
    reactor.run()


if __name__ == "__main__":
    main(sys.argv[1:])
