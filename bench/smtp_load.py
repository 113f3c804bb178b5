"""The load of the MX benchmark: throughput with Postfix's smtp-source, latency with a small
asyncio client, idle connections for the memory figure, and resident memory from /proc.

`smtp-source` gives the messages per second; it cannot report per-transaction latency, so
`latency_run` sends the same 4 KB messages over the same number of sessions, in the same
order of commands (no pipelining), and times each transaction from MAIL to the final 250.
Everything talks only to 127.0.0.1; every socket opened here is closed here.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import time
from dataclasses import dataclass

from smtp_peers import BENCH_RCPT, tool

SENDER = "bench@sender.bench.test"


@dataclass
class Throughput:
    messages: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.messages / self.seconds if self.seconds > 0 else 0.0


def smtp_source(
    port: int,
    sessions: int,
    messages: int,
    size: int,
    timeout: float = 300.0,
    recipient: str = BENCH_RCPT,
) -> Throughput:
    """Send `messages` of `size` octets over `sessions` parallel, reused sessions."""
    binary = tool("smtp-source")
    if binary is None:
        raise RuntimeError("smtp-source (Debian package postfix) is not installed")
    cmd = [binary, "-d", "-s", str(sessions), "-m", str(messages), "-l", str(size)]
    cmd += ["-f", SENDER, "-t", recipient, "-M", "client.bench.test", f"127.0.0.1:{port}"]
    started = time.monotonic()
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    elapsed = time.monotonic() - started
    if result.returncode != 0 or result.stderr.strip():
        raise RuntimeError(f"smtp-source failed: {result.stderr.strip()[:500]}")
    return Throughput(messages, elapsed)


def message_body(size: int) -> bytes:
    """A message of about `size` octets in 78-octet lines, dot-terminated, like smtp-source's."""
    head = (
        f"From: <{SENDER}>\r\nTo: <{BENCH_RCPT}>\r\nSubject: bench\r\n"
        "Message-ID: <bench@client.bench.test>\r\n\r\n"
    ).encode()
    return padded_body(head, size)


def padded_body(head: bytes, size: int) -> bytes:
    """`head` (header fields and the blank line) with 78-octet lines of X to about `size`
    octets in all, dot-terminated."""
    line = b"X" * 76 + b"\r\n"
    lines = max(1, (size - len(head)) // len(line))
    return head + line * lines + b".\r\n"


async def read_reply(reader: asyncio.StreamReader) -> bytes:
    """The last line of the next (possibly multiline) SMTP reply."""
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("connection closed")
        if line[3:4] != b"-":
            return line


async def expect(reader: asyncio.StreamReader, code: bytes) -> None:
    line = await read_reply(reader)
    if not line.startswith(code):
        raise RuntimeError(f"expected {code.decode()}, got {line[:200]!r}")


async def _session(
    port: int, count: int, body: bytes, out: list[float], recipient: str = BENCH_RCPT
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        await expect(reader, b"220")
        writer.write(b"EHLO client.bench.test\r\n")
        await expect(reader, b"250")
        for _ in range(count):
            started = time.perf_counter()
            writer.write(f"MAIL FROM:<{SENDER}>\r\n".encode())
            await expect(reader, b"250")
            writer.write(f"RCPT TO:<{recipient}>\r\n".encode())
            await expect(reader, b"250")
            writer.write(b"DATA\r\n")
            await expect(reader, b"354")
            writer.write(body)
            await expect(reader, b"250")
            out.append(time.perf_counter() - started)
        writer.write(b"QUIT\r\n")
        await read_reply(reader)
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass


def latency_run(
    port: int, sessions: int, messages: int, size: int, recipient: str = BENCH_RCPT
) -> list[float]:
    """Transaction latencies (seconds) of `messages` sent over `sessions` concurrent sessions."""
    body = message_body(size)
    per_session = max(1, messages // sessions)
    latencies: list[float] = []

    async def run() -> None:
        await asyncio.gather(
            *(_session(port, per_session, body, latencies, recipient) for _ in range(sessions))
        )

    asyncio.run(asyncio.wait_for(run(), timeout=300))
    return latencies


def percentile(values: list[float], pct: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(pct / 100 * (len(ordered) - 1))))
    return ordered[index]


def rss_bytes(pid: int) -> int:
    """Resident memory of one process (VmRSS)."""
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def rss_tree_bytes(pid: int) -> int:
    """Resident memory of a process and its direct children (the edge's acceptors)."""
    total = rss_bytes(pid)
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            if ppid == pid:
                total += rss_bytes(int(entry))
        except (OSError, RuntimeError, ValueError):
            continue
    return total


def hold_idle(port: int, count: int) -> list[socket.socket]:
    """Open `count` sessions that are greeted and said EHLO, then sit idle; caller closes them."""
    held: list[socket.socket] = []
    try:
        for _ in range(count):
            s = socket.create_connection(("127.0.0.1", port), timeout=30)
            held.append(s)
            if not s.recv(512).startswith(b"220"):
                raise RuntimeError(f"connection {len(held)} was not greeted with 220")
            s.sendall(b"EHLO idle.bench.test\r\n")
            reply = b""
            while not reply.endswith(b"\r\n") or b"250 " not in reply:
                chunk = s.recv(4096)
                if not chunk:
                    raise RuntimeError(f"connection {len(held)} closed after EHLO")
                reply += chunk
    except BaseException:
        close_all(held)
        raise
    return held


def close_all(sockets: list[socket.socket]) -> None:
    for s in sockets:
        try:
            s.close()
        except OSError:
            pass
    sockets.clear()


def raise_fd_limit(needed: int) -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(needed, soft)), hard))


def machine() -> dict[str, str]:
    """What the numbers were measured on."""
    info = {"cpus": str(os.cpu_count() or "?")}
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
        with open("/proc/meminfo") as fh:
            total = int(fh.readline().split()[1])
            info["memory"] = f"{total / 1024 / 1024:.1f} GiB"
    except OSError:
        pass
    uname = os.uname()
    info["kernel"] = f"{uname.sysname} {uname.release}"
    return info
