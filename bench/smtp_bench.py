"""MX benchmark: the tailpost edge against the SMTP servers one would use instead, in one run.

For each server (aiosmtpd discard sink, Postfix smtp-sink, a private Postfix smtpd accepting
into its queue, the tailpost edge in discard mode with its checks running, and the edge in
durable mode with the spool fsync before 250), all running at once, and each concurrency
(1, 10, 50 sessions) it sends 4 KB messages with Postfix's smtp-source for the rate, in
rounds that give each server one run in turn (the median run counts), then the same load
from a small asyncio client for p50/p99 transaction latency. The edge's SMTP protocol layer alone, behind
a policy that accepts everything, is measured too: the ceiling the edge's policy works under.
Then it holds 1,000 idle sessions on a fresh durable edge and reads its resident memory. Prints Markdown tables: results, ratios of
tailpost to each peer, and the targets.

    make bench            # or: PYTHONPATH=. .venv/bin/python bench/smtp_bench.py [--help]

A benchmark, not a test: it asserts nothing, and exits 1 only when a server fails. It only ever
talks to 127.0.0.1 and stops every process it starts; it needs `postfix` (smtp-source,
smtp-sink, and root for the private Postfix instance) and skips, with the reason, any peer
that cannot run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import smtp_load  # noqa: E402
import smtp_peers  # noqa: E402


@dataclass
class Row:
    server: str
    sessions: int
    messages: int
    rate: float
    p50_ms: float
    p99_ms: float


@dataclass
class Report:
    machine: dict[str, str]
    size: int
    rows: list[Row] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    runs: dict[str, list[float]] = field(default_factory=dict)
    """Every run's msg/s, per "server@sessions", in the order of the rounds."""
    idle_connections: int = 0
    idle_rss_before: int = 0
    idle_rss_after: int = 0
    edge_processes: int = 1

    def rate(self, server: str, sessions: int) -> float | None:
        for row in self.rows:
            if row.server == server and row.sessions == sessions:
                return row.rate
        return None


AIOSMTPD = "aiosmtpd sink"
SMTP_SINK = "postfix smtp-sink"
POSTFIX_QUEUE = "postfix smtpd -> queue"
EDGE_DISCARD = "tailpost edge (discard)"
EDGE_DURABLE = "tailpost edge (durable)"
PROTOCOL_ONLY = "tailpost SMTP layer only"
TARGETS = [(EDGE_DISCARD, AIOSMTPD, 1.5), (EDGE_DURABLE, POSTFIX_QUEUE, 1.3)]
BASELINE = "baseline"
"""The label of the durable edge of another checkout (`--baseline`), run in the same rounds."""
IDLE_TARGET = 100 * 1024 * 1024


def servers(
    workdir: Path, dns_port: int, extra: str, processes: int = 1, baseline: Path | None = None
) -> list[tuple[str, Callable[[], AbstractContextManager[Any]]]]:
    against: list[tuple[str, Callable[[], AbstractContextManager[Any]]]] = []
    if baseline is not None:
        against = [
            (
                f"{EDGE_DURABLE} {BASELINE}",
                lambda: smtp_peers.tailpost_edge(
                    workdir, "durable", dns_port, extra, processes, baseline, BASELINE
                ),
            )
        ]
    # The discarding edge is one process (bench/discard_edge.py): left out with acceptors.
    discarding: list[tuple[str, Callable[[], AbstractContextManager[Any]]]] = [
        (EDGE_DISCARD, lambda: smtp_peers.tailpost_edge(workdir, "discard", dns_port, extra))
    ]
    return against + [
        (AIOSMTPD, lambda: smtp_peers.aiosmtpd_sink(workdir)),
        (SMTP_SINK, lambda: smtp_peers.postfix_smtp_sink(workdir)),
        (POSTFIX_QUEUE, lambda: smtp_peers.postfix_queue(workdir)),
        *(discarding if processes == 1 else []),
        (
            EDGE_DURABLE,
            lambda: smtp_peers.tailpost_edge(workdir, "durable", dns_port, extra, processes),
        ),
        (PROTOCOL_ONLY, lambda: smtp_peers.tailpost_protocol_only(workdir)),
    ]


def messages_for(sessions: int, messages: int) -> int:
    """At least 20 messages per session, so that connection setup stays a small share."""
    return max(messages, 20 * sessions)


def measure(peers: list[smtp_peers.Peer], args: argparse.Namespace, report: Report) -> None:
    """Each concurrency in rounds: one smtp-source run per server in turn, `--repeat` rounds,
    the median counting; then the latency runs. Taking turns, every server sees the same
    share of a shared machine's slow and fast moments: one run can be off by a third here
    (Postfix's queue most of all), and back-to-back runs of one server would carry that
    drift into the ratios."""
    for peer in peers:
        smtp_load.smtp_source(peer.port, 5, 100, args.size)  # warm up: imports, caches, processes
    for sessions in args.sessions:
        count = messages_for(sessions, args.messages)
        rates: dict[str, list[float]] = {peer.name: [] for peer in peers}
        for _ in range(args.repeat):
            for peer in peers:
                rates[peer.name].append(
                    smtp_load.smtp_source(peer.port, sessions, count, args.size).rate
                )
        for peer in peers:
            runs = rates[peer.name]
            report.runs[f"{peer.name}@{sessions}"] = runs
            latencies = smtp_load.latency_run(peer.port, sessions, args.latency_messages, args.size)
            row = Row(
                peer.name,
                sessions,
                count,
                sorted(runs)[len(runs) // 2],
                smtp_load.percentile(latencies, 50) * 1000,
                smtp_load.percentile(latencies, 99) * 1000,
            )
            report.rows.append(row)
            print(
                f"  {peer.name:26} {sessions:3} sessions: {row.rate:8.0f} msg/s  "
                f"p50 {row.p50_ms:7.2f} ms  p99 {row.p99_ms:7.2f} ms  "
                f"(runs: {', '.join(f'{r:.0f}' for r in runs)})",
                flush=True,
            )


def measure_idle(
    workdir: Path, dns_port: int, count: int, report: Report, processes: int = 1
) -> None:
    smtp_load.raise_fd_limit(count + 256)
    edge = smtp_peers.tailpost_edge(workdir / "idle", "durable", dns_port, "", processes)
    with edge as peer:
        assert peer.pid is not None
        time.sleep(1.0 + 2.0 * (processes > 1))  # acceptors start after the spool recovery
        report.idle_rss_before = smtp_load.rss_tree_bytes(peer.pid)
        held = smtp_load.hold_idle(peer.port, count)
        try:
            time.sleep(2.0)
            report.idle_rss_after = smtp_load.rss_tree_bytes(peer.pid)
            report.idle_connections = len(held)
        finally:
            smtp_load.close_all(held)
    mib = report.idle_rss_after / 2**20
    print(f"  tailpost edge holding {count} idle sessions: {mib:.1f} MiB resident", flush=True)


def ratio(report: Report, ours: str, theirs: str, sessions: int) -> float | None:
    a, b = report.rate(ours, sessions), report.rate(theirs, sessions)
    return a / b if a is not None and b else None


def round_ratios(report: Report, ours: str, theirs: str, sessions: int) -> list[float]:
    """The ratio within each round (the two runs made one after the other)."""
    a, b = report.runs.get(f"{ours}@{sessions}", []), report.runs.get(f"{theirs}@{sessions}", [])
    return [x / y for x, y in zip(a, b, strict=False) if y]


def _times(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}x" if value >= 0.1 else f"{value:.3f}x"


def render(report: Report, sessions: list[int]) -> str:
    out = [
        f"Messages of {report.size} octets; machine: "
        + ", ".join(f"{k} {v}" for k, v in report.machine.items())
        + f"; tailpost edge with mx_processes = {report.edge_processes}",
        "",
    ]
    out += [
        "| server | sessions | messages | msg/s | p50 ms | p99 ms |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in report.rows:
        out.append(
            f"| {r.server} | {r.sessions} | {r.messages} | {r.rate:.0f} | "
            f"{r.p50_ms:.2f} | {r.p99_ms:.2f} |"
        )
    peers = [p for p in (AIOSMTPD, SMTP_SINK, POSTFIX_QUEUE) if p not in report.skipped]
    out += ["", "Ratios of msg/s (tailpost / peer):", ""]
    out.append("| tailpost | sessions | " + " | ".join(peers) + " |")
    out.append("|---|---:|" + "---:|" * len(peers))
    for ours in (EDGE_DISCARD, EDGE_DURABLE, PROTOCOL_ONLY):
        for n in sessions:
            cells = [ratio(report, ours, p, n) for p in peers]
            text = " | ".join(_times(c) for c in cells)
            out.append(f"| {ours} | {n} | {text} |")
    out += ["", "Targets:", ""]
    for ours, theirs, want in TARGETS:
        for n in sessions:
            got = ratio(report, ours, theirs, n)
            verdict = "n/a" if got is None else ("met" if got >= want else "NOT met")
            shown = _times(got)
            rounds = round_ratios(report, ours, theirs, n)
            spread = f"; per round {_times(min(rounds))}-{_times(max(rounds))}" if rounds else ""
            out.append(
                f"- {ours} vs {theirs}, {n} sessions: {shown}{spread} (target {want}x): {verdict}"
            )
    base = f"{EDGE_DURABLE} {BASELINE}"
    for n in sessions:
        got = ratio(report, EDGE_DURABLE, base, n)
        if got is not None:
            rounds = round_ratios(report, EDGE_DURABLE, base, n)
            out.append(
                f"- this checkout's durable edge against the baseline's, {n} sessions: "
                f"{_times(got)}; per round {_times(min(rounds))}-{_times(max(rounds))}"
            )
    if report.idle_connections:
        after = report.idle_rss_after / 2**20
        verdict = "met" if report.idle_rss_after < IDLE_TARGET else "NOT met"
        out.append(
            f"- {report.idle_connections} idle sessions: edge resident {after:.1f} MiB "
            f"(at start {report.idle_rss_before / 2**20:.1f} MiB; target < 100 MiB): {verdict}"
        )
    for name, why in report.skipped.items():
        out.append(f"- skipped {name}: {why}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", default="1,10,50", help="concurrencies (default 1,10,50)")
    parser.add_argument("--messages", type=int, default=2000, help="messages per smtp-source run")
    parser.add_argument(
        "--latency-messages", type=int, default=1000, help="messages per latency run"
    )
    parser.add_argument("--size", type=int, default=4096, help="message size in octets")
    parser.add_argument(
        "--repeat", type=int, default=3, help="smtp-source runs per figure; the median counts"
    )
    parser.add_argument(
        "--idle", type=int, default=1000, help="idle sessions for the memory figure"
    )
    parser.add_argument("--only", default="", help="comma-separated server names to run")
    parser.add_argument(
        "--edge-extra",
        type=Path,
        help="a TOML fragment appended to the edge's configuration, e.g. [checks] enabled = false",
    )
    parser.add_argument(
        "--edge-processes",
        type=int,
        default=1,
        help="the edge's edge.mx_processes (default 1); memory is summed over its processes",
    )
    parser.add_argument(
        "--baseline",
        type=Path,
        help="another checkout (e.g. `git worktree add /tmp/base HEAD~3`): its durable edge "
        "runs in the same rounds, and the ratio of this one to it is printed",
    )
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    args = parser.parse_args(argv)
    args.sessions = smtp_peers.parse_sessions(parser, args.sessions)
    if not args.sessions or min(args.sessions) < 1 or args.messages < 1 or args.size < 200:
        parser.error("sessions and messages must be positive and --size at least 200")
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    if smtp_peers.tool("smtp-source") is None:
        print("smtp-source is missing: install the Debian package postfix", file=sys.stderr)
        print(
            "(scripts/install-test-deps installs it without configuring any mail)", file=sys.stderr
        )
        return 2
    extra = smtp_peers.read_edge_extra(parser, args.edge_extra)
    if args.baseline is not None and not (args.baseline / "edge" / "__init__.py").is_file():
        parser.error(f"--baseline: {args.baseline} is not a tailpost checkout (no edge/)")
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    smtp_peers.stop_on_signals()
    report = Report(machine=smtp_load.machine(), size=args.size, edge_processes=args.edge_processes)
    smtp_load.raise_fd_limit(4096)
    with (
        smtp_peers.workspace(args.keep, "tailpost-bench-") as workdir,
        smtp_peers.null_dns(workdir) as dns_port,
    ):
        print(f"work directory {workdir}", flush=True)
        with contextlib.ExitStack() as running:
            peers, failed = smtp_peers.start_servers(
                running,
                servers(workdir, dns_port, extra, args.edge_processes, args.baseline),
                only,
                report.skipped,
            )
            failed += smtp_peers.run_measurement(
                lambda: measure(peers, args, report), report.skipped
            )
        if args.idle and (
            not only or any("tailpost edge" in o or o in "tailpost edge" for o in only)
        ):
            measure_idle(workdir, dns_port, args.idle, report, args.edge_processes)
    print()
    print(render(report, args.sessions))
    if args.json:
        args.json.write_text(json.dumps(asdict(report), indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
