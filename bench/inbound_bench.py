"""Inbound end to end: the all-in-one from its MX to the device's Maildir, next to two sinks.

The all-in-one (`twistd tailpost`, this checkout, on its embedded defaults in a temporary
directory, with a local DNS server that answers NXDOMAIN to everything) takes 4 KB messages
from Postfix's `smtp-source` for its demo address at 1, 10 and 50 sessions. Each goes
through the whole path: the MX and its checks, the spool's fsync before the 250, the queue,
the SMTP hop to the device's connector, the Maildir's fsync. The figure is the number of
messages over the time from the first connection to the last message in the Maildir (the
rate the MX answered them at is shown too). aiosmtpd's discard sink and Postfix's
`smtp-sink` take the same load in the same run, and p50/p99 of the SMTP transaction come
from `bench/smtp_load.py`'s client, as in `bench/smtp_bench.py`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import smtp_load  # noqa: E402
import smtp_peers  # noqa: E402

DEMO = "demo@example.test"
AIO_CONFIG = """\
hostname = "mx.bench.test"
[edge]
mx_listen = "127.0.0.1:0"
control_listen = "127.0.0.1:0"
relay_listen = "127.0.0.1:0"
[device]
connector_listen = "127.0.0.1:0"
imap_listen = "127.0.0.1:0"
http_listen = "127.0.0.1:0"
[dns]
nameservers = ["127.0.0.1"]
port = {dns_port}
"""


class AllInOne:
    def __init__(self, port: int, pid: int, maildir: Path) -> None:
        self.port = port
        self.pid = pid
        self.maildir = maildir

    def stored(self) -> int:
        """Messages in the Maildir's INBOX and Junk folders."""
        total = 0
        for folder in (self.maildir, self.maildir / ".Junk"):
            for sub in ("new", "cur"):
                with contextlib.suppress(FileNotFoundError):
                    total += len(os.listdir(folder / sub))
        return total


@contextlib.contextmanager
def all_in_one(workdir: Path, dns_port: int) -> Iterator[AllInOne]:
    data = workdir / "aio"
    data.mkdir()
    config = workdir / "aio.toml"
    config.write_text(AIO_CONFIG.format(dns_port=dns_port))
    with smtp_peers.run_twistd("tailpost", config, data, workdir / "aio.log") as (proc, port):
        yield AllInOne(port, proc.pid, data / "device" / "Maildir")


def end_to_end(aio: AllInOne, sessions: int, messages: int, size: int) -> tuple[float, float]:
    """(messages per second into the Maildir, messages per second answered 250)."""
    before = aio.stored()
    started = time.monotonic()
    accepted = smtp_load.smtp_source(aio.port, sessions, messages, size, recipient=DEMO)
    deadline = time.monotonic() + 300
    while aio.stored() - before < messages:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {aio.stored() - before} of {messages} reached the Maildir")
        time.sleep(0.01)
    return messages / (time.monotonic() - started), accepted.rate


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", default="1,10,50", help="concurrencies (default 1,10,50)")
    parser.add_argument("--messages", type=int, default=2000, help="messages per run")
    parser.add_argument("--latency-messages", type=int, default=500)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure (median)")
    args = parser.parse_args(argv)
    sessions = [int(n) for n in args.sessions.split(",") if n.strip()]
    smtp_peers.stop_on_signals()
    smtp_load.raise_fd_limit(4096)
    rows: list[tuple[str, int, float, float | None, float, float]] = []
    with tempfile.TemporaryDirectory(prefix="tailpost-inbound-") as tmp:
        work = Path(tmp)
        with contextlib.ExitStack() as running:
            dns_port = running.enter_context(smtp_peers.null_dns(work))
            sinks = [
                running.enter_context(smtp_peers.aiosmtpd_sink(work)),
                running.enter_context(smtp_peers.postfix_smtp_sink(work)),
            ]
            aio = running.enter_context(all_in_one(work, dns_port))
            smtp_load.smtp_source(aio.port, 1, 50, args.size, recipient=DEMO)  # warm-up
            for n in sessions:
                for sink in sinks:
                    rates = [
                        smtp_load.smtp_source(sink.port, n, args.messages, args.size).rate
                        for _ in range(args.repeat)
                    ]
                    lat = smtp_load.latency_run(sink.port, n, args.latency_messages, args.size)
                    rows.append(
                        (
                            sink.name,
                            n,
                            statistics.median(rates),
                            None,
                            smtp_load.percentile(lat, 50),
                            smtp_load.percentile(lat, 99),
                        )
                    )
                runs = [end_to_end(aio, n, args.messages, args.size) for _ in range(args.repeat)]
                lat = smtp_load.latency_run(
                    aio.port, n, args.latency_messages, args.size, recipient=DEMO
                )
                rows.append(
                    (
                        "tailpost all-in-one, to the Maildir",
                        n,
                        statistics.median(r[0] for r in runs),
                        statistics.median(r[1] for r in runs),
                        smtp_load.percentile(lat, 50),
                        smtp_load.percentile(lat, 99),
                    )
                )
                print(f"  {n} sessions done", flush=True)
    print()
    print(render(rows, args.size))
    return 0


def render(rows: list[tuple[str, int, float, float | None, float, float]], size: int) -> str:
    machine = ", ".join(f"{k} {v}" for k, v in smtp_load.machine().items())
    out = [
        f"Messages of {size} octets; machine: {machine}",
        "",
        "| server | sessions | msg/s | answered msg/s | p50 ms | p99 ms |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, n, rate, answered, p50, p99 in rows:
        shown = f"{answered:.0f}" if answered is not None else "-"
        out.append(f"| {name} | {n} | {rate:.0f} | {shown} | {p50 * 1000:.2f} | {p99 * 1000:.2f} |")
    out += [
        "",
        "| sessions | tailpost / aiosmtpd sink | tailpost / postfix smtp-sink |",
        "|---:|---:|---:|",
    ]
    for n in sorted({r[1] for r in rows}):
        by = {r[0]: r[2] for r in rows if r[1] == n}
        ours = by.get("tailpost all-in-one, to the Maildir")
        if ours is None:
            continue
        ratios = [
            f"{ours / by[p]:.2f}x" if by.get(p) else "-"
            for p in ("aiosmtpd sink", "postfix smtp-sink")
        ]
        out.append(f"| {n} | {ratios[0]} | {ratios[1]} |")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
