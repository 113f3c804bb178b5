"""The DATA reader against a line-by-line statement of the rules, in any chunking.

The reader takes the body's complete lines in one piece; whatever the chunk boundaries, it
must end data at the same place, hand the sink the same unstuffed octets and refuse the same
messages as reading one line at a time by RFC 5321 §4.5.2 and the edge's limits would.
"""

from __future__ import annotations

import random

import pytest

from edge.smtp import replies
from edge.smtp.data import DataReader, Limits
from edge.smtp.replies import Reply


class Sink:
    def __init__(self) -> None:
        self.data = b""
        self.aborted = False

    def write(self, chunk: bytes) -> None:
        self.data += chunk

    def finish(self) -> Reply:
        return replies.S250_OK

    def abort(self) -> None:
        self.aborted = True


def reference(stream: bytes, limits: Limits) -> tuple[bytes | None, Reply | None, bytes]:
    """(data kept, or None when refused; the refusal; what follows the end of data)."""
    out = b""
    error: Reply | None = None
    prev_crlf = True
    in_headers = True
    size = 0
    pos = 0
    while True:
        nl = stream.find(b"\n", pos)
        assert nl >= 0, "the test streams all end with <CRLF>.<CRLF>"
        line = stream[pos : nl + 1]
        pos = nl + 1
        if prev_crlf and line == b".\r\n":
            return (None if error else out), error, stream[pos:]
        crlf = line.endswith(b"\r\n")
        if error is None and (not crlf or b"\r" in line[:-2]):
            error = replies.S550_BARE_NEWLINE
        if error is None and len(line) > limits.max_text_line + 2:
            error = replies.S552_LINE_TOO_LONG
        if line.startswith(b"."):
            line = line[1:]
        if in_headers and line in (b"\r\n", b"\n"):
            in_headers = False
        prev_crlf = crlf
        size += len(line)
        if error is None and size > limits.max_message_size:
            error = replies.S552_TOO_BIG
        out += line


def read(
    stream: bytes, limits: Limits, sizes: list[int]
) -> tuple[bytes | None, Reply | None, bytes]:
    sink = Sink()
    reader = DataReader(limits, sink)
    pending = b""
    pos = 0
    for n in sizes:
        pending += stream[pos : pos + n]
        pos += n
        done, pending = reader.feed(pending)
        if done:
            rest = pending + stream[pos:]
            return (None if reader.error else sink.data), reader.error, rest
    raise AssertionError("the reader never saw the end of data")


BODIES = [
    b"plain line\r\n" * 40,
    b"..starts with a dot\r\n.\r\n.. two\r\nlast\r\n",
    b"bare lf here\nand more\r\n",
    b"bare cr here\r and more\r\n",
    b"x" * 1000 + b"\r\n" + b"y" * 1001 + b"\r\n",
    b"x" * 1000 + b"\r\n",
    b"line\n.\r\nMAIL FROM:<evil@x.test>\r\n",  # a bare-LF dot is not the end
    b"line\r\n.\nMAIL FROM:<evil@x.test>\r\n",
    b"\r\n\r\n.x\r\n",
    b"",
]


@pytest.mark.parametrize("body", BODIES)
def test_any_chunking_reads_as_line_by_line(body: bytes) -> None:
    limits = Limits(max_message_size=6000, max_text_line=1000)
    stream = b"Subject: t\r\nReceived: by x\r\n\r\n" + body + b".\r\nQUIT\r\n"
    expected = reference(stream, limits)
    rng = random.Random(body)
    chunkings = [[len(stream)], [1] * len(stream), [7] * (len(stream) // 7 + 1)]
    chunkings += [[rng.randint(1, 200) for _ in range(len(stream))] for _ in range(20)]
    for sizes in chunkings:
        assert read(stream, limits, sizes) == expected, sizes[:10]


def test_size_limit_counts_unstuffed_octets() -> None:
    limits = Limits(max_message_size=100, max_text_line=1000)
    body = b"\r\n" + b"." * 40 + b"\r\n" + b"." * 40 + b"\r\n"
    stream = b"A: b\r\n" + body + b".\r\n"
    assert reference(stream, limits) == read(stream, limits, [len(stream)])
    assert read(stream, limits, [len(stream)])[1] is None  # 2 x 39 + headers fit in 100
