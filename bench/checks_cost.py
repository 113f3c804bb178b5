"""The CPU cost of the edge's checks per message, without the SMTP layer.

Builds the edge's real check pipeline (`build_pipeline`, with a `DNSResolver`, a store and
`CachedLookups` as the MX wires them) against a DNS server on 127.0.0.1 that answers every
query NXDOMAIN with an SOA (so SPF and DMARC are none and the answers are cached), warms the
caches, then runs transactions of MAIL, RCPT and DATA on a 4 KB message like smtp-source's,
several per connection, inside the running reactor, and prints the CPU time of the thread in
microseconds per message and per stage. `--api coroutine` wraps each stage's answer in a
coroutine and a Deferred, as an awaiting caller would; `--api now` takes the stage methods'
answers as they are (`NowOrLater`). `--senders N` cycles through N senders of the same domain (envelope and From), so
what is kept per sender (SPF results, From addresses) is found again only every N messages.
Everything stays on this machine; the DNS server is a thread of this process.

    .venv/bin/python bench/checks_cost.py [--messages 20000] [--api coroutine|now] [--senders 1]
"""

from __future__ import annotations

import argparse
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import dns.flags
import dns.message
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from twisted.internet import defer  # noqa: E402
from twisted.internet import reactor as default_reactor  # noqa: E402

from edge.checks import Recipient, build_pipeline  # noqa: E402
from edge.checks.pipeline import CheckPipeline  # noqa: E402
from edge.config import Config  # noqa: E402
from edge.dns.resolver import DNSResolver  # noqa: E402
from edge.store import open_store  # noqa: E402
from edge.store.cache import CachedLookups  # noqa: E402

SENDER = "bench@sender.bench.test"
RCPT = "rcpt@bench.test"
HELO = "client.bench.test"
CLIENT_IP = "192.0.2.10"
PER_SESSION = 100  # messages per connection (smtp-source -d reuses its sessions)


def message(size: int = 4096, sender: str = SENDER) -> bytes:
    """About `size` octets in 78-octet lines, with smtp-source's kind of header section."""
    head = (
        f"From: <{sender}>\r\nTo: <{RCPT}>\r\nSubject: bench\r\n"
        "Message-ID: <bench@client.bench.test>\r\n\r\n"
    ).encode()
    line = b"X" * 76 + b"\r\n"
    return head + line * max(1, (size - len(head)) // len(line))


def serve_nxdomain(sock: socket.socket) -> None:
    """Answers every query NXDOMAIN with an SOA (minimum 300 s) in the authority section."""
    while True:
        try:
            data, peer = sock.recvfrom(4096)
        except OSError:
            return
        query = dns.message.from_wire(data)
        response = dns.message.make_response(query)
        response.set_rcode(dns.rcode.NXDOMAIN)
        response.flags |= dns.flags.AA
        soa = dns.rrset.from_text(
            "bench.test.",
            300,
            "IN",
            "SOA",
            "ns.bench.test. hostmaster.bench.test. 1 3600 600 86400 300",
        )
        response.authority.append(soa)
        sock.sendto(response.to_wire(), peer)


def build(tmp: Path, dns_port: int) -> CheckPipeline:
    config = Config(data_dir=str(tmp), hostname="mx.bench.test")
    store = open_store(f"sqlite:///{tmp / 'store.db'}")
    store.ensure_account()
    resolver = DNSResolver(["127.0.0.1"], dns_port, timeout=2.0, reactor=default_reactor)
    lookups = CachedLookups(store)
    pipeline = build_pipeline(
        config, resolver, default_reactor, lookups.list_spam_rules, lookups.cached_or_load
    )
    assert pipeline is not None
    return pipeline


async def _wait(result: Any) -> Any:
    if isinstance(result, defer.Deferred):
        return await result
    return result


async def run(
    pipeline: CheckPipeline, count: int, api: str, size: int, senders: int
) -> dict[str, float]:
    totals = dict.fromkeys(("connect", "mail", "rcpt", "data"), 0)
    clock = time.thread_time_ns  # CPU time: other processes on the machine do not count
    fast = api == "now"
    tx = pipeline.transaction(CLIENT_IP)
    sessions = 0
    same = message(size)
    for i in range(count):
        sender = SENDER if senders == 1 else f"bench{i % senders}@sender.bench.test"
        body = same if senders == 1 else message(size, sender)
        if i % PER_SESSION == 0:
            sessions += 1
            t0 = clock()
            tx = pipeline.transaction(CLIENT_IP)
            if fast:
                await _wait(pipeline.connect(tx))
            else:
                await defer.ensureDeferred(_wait(pipeline.connect(tx)))
            totals["connect"] += clock() - t0
        t0 = clock()
        if fast:
            await _wait(pipeline.mail(tx, HELO, sender))
        else:
            await defer.ensureDeferred(_wait(pipeline.mail(tx, HELO, sender)))
        t1 = clock()
        if fast:
            await _wait(pipeline.rcpt(tx, Recipient(RCPT, None)))
        else:
            await defer.ensureDeferred(_wait(pipeline.rcpt(tx, Recipient(RCPT, None))))
        t2 = clock()
        if fast:
            outcome = await _wait(pipeline.data(tx, body))
        else:
            outcome = await defer.ensureDeferred(_wait(pipeline.data(tx, body)))
        t3 = clock()
        assert outcome.decision.action == "accept", outcome
        totals["mail"] += t1 - t0
        totals["rcpt"] += t2 - t1
        totals["data"] += t3 - t2
    out = {stage: ns / 1000 / count for stage, ns in totals.items() if stage != "connect"}
    out["connect (per session)"] = totals["connect"] / 1000 / max(sessions, 1)
    out["message (mail+rcpt+data)"] = out["mail"] + out["rcpt"] + out["data"]
    return out


async def main(args: argparse.Namespace, dns_port: int, tmp: Path) -> None:
    pipeline = build(tmp, dns_port)
    await run(pipeline, 200, args.api, args.size, 1)  # warm up: DNS cache, store cache, imports
    best: dict[str, float] | None = None
    for _ in range(args.repeat):
        figures = await run(pipeline, args.messages, args.api, args.size, args.senders)
        if best is None or figures["message (mail+rcpt+data)"] < best["message (mail+rcpt+data)"]:
            best = figures
    assert best is not None
    print(
        f"api={args.api} messages={args.messages} size={len(message(args.size))} "
        f"senders={args.senders} (best of {args.repeat})"
    )
    for stage, us in best.items():
        print(f"  {stage:26s} {us:8.1f} us")


def cli() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--api", choices=("coroutine", "now"), default="coroutine")
    parser.add_argument(
        "--senders",
        type=int,
        default=1,
        help="distinct senders (envelope and From) to cycle through; 1 is smtp-source's load",
    )
    args = parser.parse_args()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    threading.Thread(target=serve_nxdomain, args=(sock,), daemon=True).start()
    failures: list[Any] = []
    with tempfile.TemporaryDirectory() as tmp:

        def start() -> None:
            d = defer.ensureDeferred(main(args, sock.getsockname()[1], Path(tmp)))
            d.addErrback(failures.append)
            d.addBoth(lambda _: default_reactor.stop())  # type: ignore[attr-defined]

        default_reactor.callWhenRunning(start)  # type: ignore[attr-defined]
        default_reactor.run()  # type: ignore[attr-defined]
    sock.close()
    for failure in failures:
        failure.printTraceback()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(cli())
