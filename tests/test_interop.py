"""Interop with real SMTP peers against the all-in-one's MX, all on 127.0.0.1.

Postfix's `smtp-source` sends 1,000 messages over 20 concurrent sessions and every one must
land in the Maildir exactly once; `swaks` delivers over STARTTLS; a raw-socket client tries
SMTP smuggling with every non-standard end-of-data sequence and never gets a second message
through. The peers are Debian packages (`postfix`, `swaks`, installed by
scripts/install-test-deps); each test is skipped, with the reason, when its tool is absent.
"""

from __future__ import annotations

import email
import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.dnsserver import LocalDNSServer
from tests.processes import Process, allinone_config, host_port, wait_for

DEMO = "demo@example.test"


def tool(name: str) -> str | None:
    """A Postfix or swaks binary: on PATH, or in /usr/sbin where Debian puts Postfix's."""
    found = shutil.which(name)
    if found is None and os.access(f"/usr/sbin/{name}", os.X_OK):
        found = f"/usr/sbin/{name}"
    return found


SMTP_SOURCE = tool("smtp-source")
SWAKS = tool("swaks")
needs_smtp_source = pytest.mark.skipif(
    SMTP_SOURCE is None, reason="smtp-source (Debian package postfix) is not installed"
)
needs_swaks = pytest.mark.skipif(SWAKS is None, reason="swaks is not installed")


@pytest.fixture(scope="module")
def allinone(
    tmp_path_factory: pytest.TempPathFactory, in_reactor: Any
) -> Iterator[tuple[Process, str, int]]:
    # The checks' DNS lookups (SPF, DMARC of the sender domains) go to a local server that
    # knows no names: every answer is an immediate NXDOMAIN, and nothing leaves the machine.
    dns_server = in_reactor(LocalDNSServer, in_reactor.reactor)
    config = allinone_config(hostname="mx.interop.test", dns_port=dns_server.port)
    proc = Process("tailpost", tmp_path_factory.mktemp("interop"), config)
    try:
        listeners = proc.start()
        host, port = host_port(listeners["mx"])
        yield proc, host, port
    finally:
        proc.stop()
        in_reactor(dns_server.stop)


def maildir_messages(proc: Process) -> list[bytes]:
    root = proc.data_dir / "device" / "Maildir"
    out = []
    for sub in ("new", "cur"):
        folder = root / sub
        if folder.is_dir():
            for path in folder.iterdir():
                try:
                    out.append(path.read_bytes())
                except FileNotFoundError:
                    continue  # moved from new/ to cur/ while listing
    return out


def with_subject(proc: Process, subject: str) -> list[bytes]:
    found = []
    for raw in maildir_messages(proc):
        head = raw.split(b"\r\n\r\n", 1)[0]
        if re.search(rb"^Subject: " + re.escape(subject.encode()) + rb"\r?$", head, re.M):
            found.append(raw)
    return found


def edge_queue_id(raw: bytes) -> str:
    received = email.message_from_bytes(raw).get_all("Received") or []
    for value in received:
        m = re.search(
            r"by mx\.interop\.test \(tailpost\) with \S+ id (\w+)", " ".join(value.split())
        )
        if m:
            return m.group(1)
    raise AssertionError(f"no edge Received header in {raw[:500]!r}")


@needs_smtp_source
def test_smtp_source_1000_messages_over_20_sessions(allinone: tuple[Process, str, int]) -> None:
    proc, host, port = allinone
    assert SMTP_SOURCE is not None
    subject = "interop smtp-source batch"
    started = time.monotonic()
    result = subprocess.run(
        [
            SMTP_SOURCE,
            "-d",  # keep each session open: 1,000 messages over the 20 sessions
            "-s",
            "20",
            "-m",
            "1000",
            "-l",
            "4096",
            "-f",
            "source@sender.test",
            "-t",
            DEMO,
            "-M",
            "client.sender.test",
            "-S",
            subject,
            f"{host}:{port}",
        ],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert result.returncode == 0, result.stderr + result.stdout
    assert result.stderr == "", result.stderr  # smtp-source reports every refusal here
    sent_in = time.monotonic() - started

    arrived = wait_for(lambda: len(with_subject(proc, subject)) >= 1000 or None, timeout=60)
    assert arrived
    time.sleep(0.5)  # a duplicate would show up just after the last original
    messages = with_subject(proc, subject)
    qids = [edge_queue_id(raw) for raw in messages]
    assert len(messages) == 1000, f"{len(messages)} stored (sent in {sent_in:.1f} s)"
    assert len(set(qids)) == 1000  # each accepted transaction stored exactly once
    for raw in messages[:20]:
        body = raw.split(b"\r\n\r\n", 1)[1]
        assert body.startswith(b"1XXXX") and b"\r\n" in body


@needs_swaks
def test_swaks_over_starttls(allinone: tuple[Process, str, int]) -> None:
    proc, host, port = allinone
    assert SWAKS is not None
    result = subprocess.run(
        [
            SWAKS,
            "--server",
            host,
            "--port",
            str(port),
            "--ehlo",
            "swaks.sender.test",
            "--from",
            "sw@sender.test",
            "--to",
            DEMO,
            "-tls",
            "--header",
            "Subject: interop swaks tls",
            "--body",
            "sent over TLS",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "STARTTLS" in result.stdout and "TLS started" in result.stdout
    [raw] = wait_for(lambda: with_subject(proc, "interop swaks tls") or None, timeout=20)
    received = " ".join((email.message_from_bytes(raw).get_all("Received") or [""])[0].split())
    assert "with ESMTPS id" in received
    assert re.search(r"using TLSv1\.[23] with cipher \S+", received), received
    assert b"sent over TLS" in raw


def converse(port: int, host: str, script: list[tuple[bytes, int]]) -> list[bytes]:
    """Send each chunk of `script`, each time reading until the server has given that
    chunk's number of final replies (or 10 s have passed), then half-close and collect
    whatever else the server sends until it closes: every reply line, in order."""
    sock = socket.create_connection((host, port), timeout=10)
    sock.settimeout(10)
    buffer = b""
    expected = 1  # the greeting
    try:
        for chunk, replies in script:
            sock.sendall(chunk)
            expected += replies
            while len(final_codes(buffer.split(b"\r\n"))) < expected:
                data = sock.recv(65536)
                if not data:
                    break
                buffer += data
        sock.shutdown(socket.SHUT_WR)
        while True:
            data = sock.recv(65536)
            if not data:
                break
            buffer += data
    except (ConnectionResetError, TimeoutError):
        pass
    finally:
        sock.close()
    return [line for line in buffer.split(b"\r\n") if line]


def final_codes(lines: list[bytes]) -> list[int]:
    return [int(line[:3]) for line in lines if line[3:4] == b" "]


SMUGGLE_ENDS = [
    b"\n.\r\n",  # LF . CRLF
    b"\r\n.\n",  # CRLF . LF
    b"\n.\n",  # LF . LF
    b"\r.\r\n",  # CR . CRLF
    b"\r\n.\r",  # CRLF . CR
    b"\r\n\x00.\r\n",  # NUL before the dot
]


@pytest.mark.parametrize("end", SMUGGLE_ENDS, ids=[repr(e) for e in SMUGGLE_ENDS])
def test_smuggling_never_yields_a_second_message(
    allinone: tuple[Process, str, int], end: bytes
) -> None:
    proc, host, port = allinone
    tag = f"{abs(hash(end)):x}"
    rcpt = b"RCPT TO:<" + DEMO.encode() + b">\r\n"
    smuggled = (
        b"Subject: outer "
        + tag.encode()
        + b"\r\n\r\nline"
        + end
        + b"MAIL FROM:<x@y.test>\r\n"
        + rcpt
        + b"DATA\r\nSubject: smuggled "
        + tag.encode()
        + b"\r\n\r\nevil\r\n.\r\n"
    )
    lines = converse(
        port,
        host,
        [
            (b"EHLO smuggler.test\r\n", 1),
            (b"MAIL FROM:<a@sender.test>\r\n" + rcpt + b"DATA\r\n", 3),
            (smuggled, 1),
            (b"QUIT\r\n", 1),
        ],
    )
    codes = final_codes(lines)
    # Greeting, EHLO, MAIL, RCPT, DATA, then exactly one verdict on all of that data, QUIT.
    assert codes[:5] == [220, 250, 250, 250, 354], lines
    assert len(codes) == 7 and codes[6] == 221, lines
    assert codes[5] == 550 or (end == b"\r\n\x00.\r\n" and codes[5] == 250), lines

    # A sentinel sent afterwards arrives; by then neither the smuggled message (nor, for a
    # refused one, the outer) is in the Maildir.
    sentinel = f"interop sentinel {tag}"
    lines = converse(
        port,
        host,
        [
            (b"EHLO sentinel.test\r\n", 1),
            (b"MAIL FROM:<a@sender.test>\r\n" + rcpt + b"DATA\r\n", 3),
            (f"Subject: {sentinel}\r\n\r\nok\r\n.\r\n".encode(), 1),
            (b"QUIT\r\n", 1),
        ],
    )
    assert final_codes(lines) == [220, 250, 250, 250, 354, 250, 221], lines
    wait_for(lambda: with_subject(proc, sentinel) or None, timeout=20)
    time.sleep(0.3)
    assert with_subject(proc, f"smuggled {tag}") == []
    outer = with_subject(proc, f"outer {tag}")
    if codes[5] == 550:
        assert outer == []
    else:
        # NUL is legal data: one message holding the would-be commands as its text.
        [raw] = outer
        assert b"MAIL FROM:<x@y.test>" in raw
