"""Benchmark: the durable spool commit, per batch, of 1 and of 10 messages of 4 KB.

Commits batches with `Spool.commit_batch` into a spool in a temporary directory (on the
disk that holds --dir, default the system's temporary directory) and prints the median
and 90th percentile milliseconds per batch. As the committer does, the next segment is made
when no batch waits (`Spool.prepare`), outside the timed part; the batches that fill a
segment and go on into the next one are timed like the others. Asserts nothing.

    PYTHONPATH=. .venv/bin/python bench/spool_commit.py [--batches 2000] [--dir /var/tmp]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from edge.spool.spool import Envelope, Spool

MESSAGE = b"Subject: spool benchmark\r\n\r\n" + (b"x" * 78 + b"\r\n") * 51  # about 4 KB


def run(spool: Spool, per_batch: int, batches: int) -> list[float]:
    times = []
    for _ in range(batches):
        items = []
        for _ in range(per_batch):
            writer = spool.writer()
            writer.write(MESSAGE)
            items.append((writer, Envelope(writer.qid, "a@example.net", ["b@example.test"], 0.0)))
        started = time.perf_counter()
        spool.commit_batch(items)
        times.append(time.perf_counter() - started)
        if spool.wants_spare():
            spool.prepare()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--batches", type=int, default=2000)
    parser.add_argument("--dir", default=None, help="where to make the spool")
    args = parser.parse_args()
    for per_batch in (1, 10):
        with tempfile.TemporaryDirectory(dir=args.dir) as root:
            spool = Spool(Path(root))
            run(spool, per_batch, 20)  # the first segment, and warm caches
            times = sorted(run(spool, per_batch, args.batches))
            median = statistics.median(times) * 1000
            p90 = times[int(len(times) * 0.9)] * 1000
            print(
                f"{per_batch:3d} x {len(MESSAGE)} octets: {median:.3f} ms per batch (median),"
                f" {p90:.3f} ms (p90), {spool.batches_written} batches"
                f" in {len(list(spool.queue.glob('*.seg')))} segments"
            )


if __name__ == "__main__":
    main()
