"""MessageBuffer: small messages in memory, large ones in a file, the same bytes either way."""

from __future__ import annotations

from pathlib import Path

from edge.msgbuffer import MessageBuffer


class Collect:
    def __init__(self) -> None:
        self.pieces: list[bytes] = []

    def write(self, chunk: bytes) -> None:
        self.pieces.append(chunk)


def test_a_message_within_the_limit_stays_in_memory(tmp_path: Path) -> None:
    buffer = MessageBuffer(tmp_path, limit=100)
    for chunk in (b"Subject: x\r\n", b"\r\n", b"body\r\n"):
        buffer.write(chunk)
    assert buffer.in_memory and buffer.size == 20
    assert buffer.value() == b"Subject: x\r\n\r\nbody\r\n"
    out = Collect()
    buffer.copy_to(out)
    assert b"".join(out.pieces) == b"Subject: x\r\n\r\nbody\r\n"
    buffer.close()
    assert list(tmp_path.iterdir()) == []


def test_a_message_past_the_limit_goes_on_in_a_file(tmp_path: Path) -> None:
    buffer = MessageBuffer(tmp_path, limit=100)
    data = [bytes([65 + i]) * 30 for i in range(10)]
    for chunk in data:
        buffer.write(chunk)
    assert not buffer.in_memory and buffer.size == 300
    assert buffer.value() == b"".join(data)
    out = Collect()
    buffer.copy_to(out)
    assert b"".join(out.pieces) == b"".join(data)
    buffer.close()
    assert list(tmp_path.iterdir()) == []  # an unnamed file: nothing left behind
