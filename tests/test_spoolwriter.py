"""SpoolWriter: small messages in memory, large ones in a file, the same bytes either way, and
headers put on top of the data without copying it."""

from __future__ import annotations

from pathlib import Path

from edge.spool.spool import SpoolWriter


class Small(SpoolWriter):
    SPILL_SIZE = 100


def test_a_message_within_the_limit_stays_in_memory(tmp_path: Path) -> None:
    writer = Small(tmp_path, "Q1")
    for chunk in (b"Subject: x\r\n", b"\r\n", b"body\r\n"):
        writer.write(chunk)
    assert not writer.spilled and writer.size == 20
    assert writer.data() == b"Subject: x\r\n\r\nbody\r\n"
    writer.put_on_top(b"Received: here\r\n")
    writer.close()
    assert writer.size == 36
    assert b"".join(writer.chunks()) == b"Received: here\r\nSubject: x\r\n\r\nbody\r\n"
    writer.abort()
    assert list(tmp_path.iterdir()) == []


def test_a_message_past_the_limit_goes_on_in_a_file(tmp_path: Path) -> None:
    writer = Small(tmp_path, "Q2")
    data = [bytes([65 + i]) * 30 for i in range(10)]
    for chunk in data:
        writer.write(chunk)
    assert writer.spilled and writer.size == 300
    assert writer.data() == b"".join(data)  # read back while still open
    writer.put_on_top(b"Top: 1\r\n")
    writer.close()
    assert b"".join(writer.chunks()) == b"Top: 1\r\n" + b"".join(data)
    writer.abort()
    assert list(tmp_path.iterdir()) == []  # the spilled file is gone
