"""Outbound benchmark: a device's mail through the edge's relay to the recipients' MX, next to
a private Postfix instance relaying the same load, in one run.

A small asyncio client (here) plays the devices: over 1, 10 and 50 concurrent sessions it
sends 4 KB messages from an address of the sender's domain to one of the recipient domain.
To the tailpost edge (`twistd tailpost-edge` of this checkout, its `[edge] relay_listen`)
each session authenticates with AUTH PLAIN as the device (its id and key, from loopback,
which `relay_plaintext_networks` lets in without STARTTLS); the edge checks the sender and
the From field, DKIM-signs the message with the domain's RSA-2048 and Ed25519 keys, spools
it (fdatasync before the 250), and its queue delivers it to the recipient domain's MX, found
in DNS (a local server that answers the MX and its address, 127.0.0.1; `mx_delivery_port` is
the sink's port). Postfix takes the same sessions without AUTH (it relays for 127.0.0.0/8)
into its queue and delivers to its `relayhost`. Each relay has its own Postfix `smtp-sink`
as the MX, counting what it receives.

The figure is messages over the time from the first connection to the last message at the
sink, end to end through the queue; the rate of the 250s (answered) and the CPU time of the
relay's processes per message are shown too, and the client's own CPU time, to show it was
not the bottleneck. Runs go in rounds, each relay one run in turn; the median counts and
the per-round range of the ratio is printed. Prints Markdown tables.

    make bench-outbound   # or: PYTHONPATH=. .venv/bin/python bench/outbound_bench.py [--help]

A benchmark, not a test: it asserts nothing, and exits 1 only when a server fails. It only ever
talks to 127.0.0.1 and stops every process it starts; it needs `postfix` (smtp-sink, and root
for the private Postfix instance) and skips, with the reason, a peer that cannot run.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import itertools
import json
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import outbound_peers  # noqa: E402
import smtp_load  # noqa: E402
import smtp_peers  # noqa: E402
from outbound_peers import RCPT, SENDER, Relay  # noqa: E402

TAILPOST = "tailpost edge relay"
POSTFIX = "postfix relay"


@dataclass
class Run:
    """One run: messages, seconds to the last message at the sink, seconds to the last 250,
    the relay's CPU seconds and the client's over the same time, and the sessions the relay
    opened to the sink."""

    messages: int
    seconds: float
    answered_seconds: float
    relay_cpu: float
    client_cpu: float
    mx_sessions: int

    @property
    def rate(self) -> float:
        return self.messages / self.seconds


@dataclass
class Report:
    machine: dict[str, str]
    size: int
    messages: int
    runs: dict[str, list[Run]] = field(default_factory=dict)
    """Every run, per "relay@sessions", in the order of the rounds."""
    skipped: dict[str, str] = field(default_factory=dict)


MESSAGE_NUMBER = b"0000000000000000"
"""Where each message's number goes in its Message-ID (`numbered`), as wide as the number."""

_numbers = itertools.count(1)


def numbered(body: bytes) -> bytes:
    """`body` with a Message-ID of its own: a device never relays two messages with the same
    one, and the relay answers a message it took before (the same Message-ID, envelope and
    content) with its first queue id, spooling nothing."""
    return body.replace(MESSAGE_NUMBER, b"%016d" % next(_numbers), 1)


def message_body(size: int) -> bytes:
    """A message of about `size` octets in 78-octet lines, dot-terminated, from the sender
    to the recipient (the relay checks the From field against the device's account), its
    Message-ID numbered by `numbered` as it is sent."""
    head = (
        f"From: <{SENDER}>\r\nTo: <{RCPT}>\r\nSubject: bench\r\n"
        "Date: Tue, 08 Dec 2026 00:00:00 +0000\r\n"
        f"Message-ID: <bench-{MESSAGE_NUMBER.decode()}@device.bench.test>\r\n\r\n"
    ).encode()
    return smtp_load.padded_body(head, size)


async def _session(port: int, count: int, body: bytes, login: tuple[str, str] | None) -> None:
    """One session: EHLO, AUTH PLAIN when `login`, then `count` transactions, no pipelining."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        await smtp_load.expect(reader, b"220")
        writer.write(b"EHLO device.bench.test\r\n")
        await smtp_load.expect(reader, b"250")
        if login is not None:
            token = base64.b64encode(f"\0{login[0]}\0{login[1]}".encode()).decode()
            writer.write(f"AUTH PLAIN {token}\r\n".encode())
            await smtp_load.expect(reader, b"235")
        for _ in range(count):
            writer.write(f"MAIL FROM:<{SENDER}>\r\n".encode())
            await smtp_load.expect(reader, b"250")
            writer.write(f"RCPT TO:<{RCPT}>\r\n".encode())
            await smtp_load.expect(reader, b"250")
            writer.write(b"DATA\r\n")
            await smtp_load.expect(reader, b"354")
            writer.write(numbered(body))
            await smtp_load.expect(reader, b"250")
        writer.write(b"QUIT\r\n")
        await smtp_load.read_reply(reader)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


def send(relay: Relay, sessions: int, messages: int, body: bytes, timeout: float) -> None:
    """`messages` over `sessions` concurrent sessions (shared out as evenly as they go)."""
    shares = [messages // sessions + (i < messages % sessions) for i in range(sessions)]

    async def run() -> None:
        await asyncio.gather(*(_session(relay.port, n, body, relay.login) for n in shares if n))

    asyncio.run(asyncio.wait_for(run(), timeout=timeout))


def one_run(relay: Relay, sessions: int, messages: int, body: bytes, timeout: float) -> Run:
    """From the first connection to the last message at the relay's sink."""
    expected, mx_sessions = relay.sink.received + messages, relay.sink.sessions
    cpu = outbound_peers.cpu_seconds(relay.pid) if relay.pid else 0.0
    client = time.process_time()
    started = time.monotonic()
    send(relay, sessions, messages, body, timeout)
    answered = time.monotonic()
    client = time.process_time() - client
    done = relay.sink.wait_for(expected, timeout)
    cpu = (outbound_peers.cpu_seconds(relay.pid) - cpu) if relay.pid else float("nan")
    time.sleep(0.2)  # the relay's sessions to the sink end once idle: most of them by now
    mx_sessions = relay.sink.sessions - mx_sessions
    return Run(messages, done - started, answered - started, cpu, client, mx_sessions)


def warm_up(relay: Relay, body: bytes) -> None:
    """100 messages first: imports, caches (DNS, DKIM keys, the store), processes."""
    one_run(relay, 5, 100, body, 120)


def measure(relays: list[Relay], args: argparse.Namespace, report: Report) -> None:
    """Each concurrency in rounds: one run per relay in turn, `--repeat` rounds."""
    body = message_body(args.size)
    for relay in relays:
        warm_up(relay, body)
    for sessions in args.sessions:
        for _ in range(args.repeat):
            for relay in relays:
                run = one_run(relay, sessions, args.messages, body, args.timeout)
                report.runs.setdefault(f"{relay.name}@{sessions}", []).append(run)
                print(
                    f"  {relay.name:20} {sessions:3} sessions: {run.rate:7.0f} msg/s to the sink, "
                    f"{run.messages / run.answered_seconds:7.0f} answered, "
                    f"{run.relay_cpu / run.messages * 1000:6.2f} ms CPU/msg "
                    f"(client {run.client_cpu / run.seconds:.0%} of a core), "
                    f"{run.mx_sessions} sessions to the MX",
                    flush=True,
                )


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def render(report: Report, sessions: list[int]) -> str:
    out = [
        f"Messages of {report.size} octets, {report.messages} per run; machine: "
        + ", ".join(f"{k} {v}" for k, v in report.machine.items()),
        "",
        "| relay | sessions | msg/s to the sink | runs | answered msg/s | relay CPU ms/msg "
        "| client CPU, share of a core | sessions to the MX |",
        "|---|---:|---:|---|---:|---:|---:|---:|",
    ]
    for n in sessions:
        for name in (TAILPOST, POSTFIX):
            runs = report.runs.get(f"{name}@{n}", [])
            if not runs:
                continue
            rates = [r.rate for r in runs]
            answered = _median([r.messages / r.answered_seconds for r in runs])
            cpu = _median([r.relay_cpu / r.messages * 1000 for r in runs])
            client = _median([r.client_cpu / r.seconds for r in runs])
            mx = _median([float(r.mx_sessions) for r in runs])
            out.append(
                f"| {name} | {n} | {_median(rates):.0f} | {min(rates):.0f}-{max(rates):.0f} "
                f"| {answered:.0f} | {cpu:.2f} | {client:.0%} | {mx:.0f} |"
            )
    out += [
        "",
        "| sessions | tailpost / postfix, msg/s to the sink | per round | "
        "relay CPU per message, tailpost / postfix |",
        "|---:|---:|---|---:|",
    ]
    for n in sessions:
        ours, theirs = report.runs.get(f"{TAILPOST}@{n}"), report.runs.get(f"{POSTFIX}@{n}")
        if not ours or not theirs:
            continue
        ratio = _median([r.rate for r in ours]) / _median([r.rate for r in theirs])
        rounds = [a.rate / b.rate for a, b in zip(ours, theirs, strict=False)]
        cpu = _median([r.relay_cpu / r.messages for r in ours]) / _median(
            [r.relay_cpu / r.messages for r in theirs]
        )
        out.append(f"| {n} | {ratio:.2f}x | {min(rounds):.2f}x-{max(rounds):.2f}x | {cpu:.2f}x |")
    for name, why in report.skipped.items():
        out.append(f"- skipped {name}: {why}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", default="1,10,50", help="concurrencies (default 1,10,50)")
    parser.add_argument("--messages", type=int, default=2000, help="messages per run")
    parser.add_argument("--size", type=int, default=4096, help="message size in octets")
    parser.add_argument("--repeat", type=int, default=3, help="rounds; the median counts")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds a run may take")
    parser.add_argument(
        "--edge-extra", type=Path, help="a TOML fragment appended to the edge's configuration"
    )
    parser.add_argument("--only", default="", help="comma-separated relay names to run")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    args = parser.parse_args(argv)
    args.sessions = smtp_peers.parse_sessions(parser, args.sessions)
    if not args.sessions or min(args.sessions) < 1 or args.size < 300:
        parser.error("sessions must be positive and --size at least 300")
    if args.repeat < 1 or args.messages < max(args.sessions):
        parser.error("--repeat must be at least 1, --messages at least the most sessions")
    extra = smtp_peers.read_edge_extra(parser, args.edge_extra)
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    smtp_peers.stop_on_signals()
    smtp_load.raise_fd_limit(4096)
    report = Report(smtp_load.machine(), args.size, args.messages)
    with (
        smtp_peers.workspace(args.keep, "tailpost-outbound-") as workdir,
        outbound_peers.mx_dns(workdir) as dns_port,
    ):
        print(f"work directory {workdir}", flush=True)
        starts: list[tuple[str, Callable[[], AbstractContextManager[Relay]]]] = [
            (TAILPOST, lambda: outbound_peers.tailpost_relay(workdir, dns_port, extra)),
            (POSTFIX, lambda: outbound_peers.postfix_relay(workdir)),
        ]
        with contextlib.ExitStack() as running:
            relays, failed = smtp_peers.start_servers(running, starts, only, report.skipped)
            failed += smtp_peers.run_measurement(
                lambda: measure(relays, args, report), report.skipped
            )
    print()
    print(render(report, args.sessions))
    if args.json:
        args.json.write_text(json.dumps(asdict(report), indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
