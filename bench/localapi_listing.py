"""Benchmark: listing a 10,000-message folder through the local API's mail view, with paging.

Fills a temporary Maildir with N messages (default 10,000; a mix of plain and multipart with
an attachment), then times `GET /localapi/v0/mail/messages` requests through the real Klein
app (in-process, no sockets) for first pages, deep pages, unread filters and searches, once
with a cold summary cache and again warm. Prints a table; asserts nothing.

    PYTHONPATH=. .venv/bin/python bench/localapi_listing.py [--messages 10000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from email.message import EmailMessage
from pathlib import Path
from typing import Any

from treq.testing import StubTreq
from twisted.internet import defer

from maildir import Maildir
from webapi.local.app import LocalAPI
from webapi.local.mail import SummaryCache

TOKEN = "bench-token"


def run_now(fn: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
    return defer.maybeDeferred(fn, *args)


def make_message(i: int) -> bytes:
    msg = EmailMessage()
    msg["From"] = f"Sender {i % 97} <sender{i % 97}@example.com>"
    msg["To"] = "demo@example.test"
    msg["Subject"] = f"{'invoice' if i % 50 == 0 else 'note'} number {i}"
    msg["Date"] = "Fri, 03 Apr 2026 18:30:00 +0000"
    msg["Message-ID"] = f"<bench-{i}@example.com>"
    msg.set_content(f"Hello, this is message {i}.\n" + "Some body text. " * 40)
    if i % 10 == 0:
        msg.add_attachment(
            b"%PDF-1.4 " + b"x" * 20_000,
            maintype="application",
            subtype="pdf",
            filename=f"doc-{i}.pdf",
        )
    return msg.as_bytes(policy=msg.policy.clone(linesep="\r\n"))


def fill(maildir: Maildir, count: int) -> None:
    folder = maildir.folder("INBOX")
    for i in range(count):
        flags = ["\\Seen"] if i % 3 else []
        folder.add(make_message(i), flags, internaldate=1_700_000_000 + i)


def get(stub: Any, path: str) -> float:
    done: list[int] = []
    start = time.perf_counter()
    d = stub.get(f"http://127.0.0.1{path}", headers={"Authorization": f"Bearer {TOKEN}"})
    d.addCallback(lambda response: response.content().addCallback(lambda _b: done.append(1)))
    stub.flush()
    elapsed = time.perf_counter() - start
    assert done, path
    return elapsed


QUERIES = [
    ("first page (20)", "/localapi/v0/mail/messages"),
    ("page at offset 5000", "/localapi/v0/mail/messages?offset=5000&limit=100"),
    ("last page", "/localapi/v0/mail/messages?offset=9980&limit=20"),
    ("unread only", "/localapi/v0/mail/messages?unread_only=true"),
    ("search subject", "/localapi/v0/mail/messages?search=invoice"),
    ("search preview", "/localapi/v0/mail/messages?search=message%209999"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        maildir = Maildir(Path(tmp) / "Maildir", hostname="bench")
        start = time.perf_counter()
        fill(maildir, args.messages)
        print(f"filled {args.messages} messages in {time.perf_counter() - start:.1f} s\n")
        cache = SummaryCache()
        api = LocalAPI(maildir, TOKEN, run_blocking=run_now, cache=cache)
        stub = StubTreq(api.resource())
        print(f"{'request':24} {'cold ms':>10} {'warm p50 ms':>12} {'warm max ms':>12}")
        for name, path in QUERIES:
            cold = get(stub, path)
            warm = [get(stub, path) for _ in range(args.repeat)]
            print(
                f"{name:24} {cold * 1000:10.1f} {statistics.median(warm) * 1000:12.1f}"
                f" {max(warm) * 1000:12.1f}"
            )
        print(f"\nsummary cache: {len(cache)} entries, {cache.hits} hits, {cache.misses} misses")
        uncached = LocalAPI(maildir, TOKEN, run_blocking=run_now, cache=SummaryCache(size=0))
        stub = StubTreq(uncached.resource())
        times = [get(stub, QUERIES[4][1]) for _ in range(2)]
        print(f"search without a cache: {statistics.median(times) * 1000:.1f} ms per request")


if __name__ == "__main__":
    main()
