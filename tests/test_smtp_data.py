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
    header_size = 0
    received = 0
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
        elif in_headers:
            header_size += len(line)
            if error is None and header_size > limits.max_header_size:
                error = replies.S552_HEADER_TOO_BIG
            if line[:9].lower() == b"received:":
                received += 1
                if error is None and received > limits.max_received_headers:
                    error = replies.S554_LOOP
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


HEADER_SECTIONS = [
    b"Subject: t\r\nReceived: by x\r\n\r\n",
    b"From: a@b.test\r\nTo: c@d.test\r\nSubject: folded\r\n  on two lines\r\n\r\n",
    b"Received: one\r\nRECEIVED: two\r\nreceived: three\r\nX-Received: not one\r\n\r\n",
    b"Subject: a dot\r\n.X-Stuffed: yes\r\n\r\n",
    b"Subject: bare lf\nTo: x\r\n\r\n",
    b"Subject: bare cr\r here\r\n\r\n",
    b"X-Long: " + b"v" * 1000 + b"\r\n\r\n",
    b"X-Big: " + b"v" * 200 + b"\r\n" + b"X-Big-Too: " + b"w" * 200 + b"\r\n\r\n",
    b"\r\n",  # no header fields at all
    b"Subject: no end of the header section\r\n",
]


@pytest.mark.parametrize("section", HEADER_SECTIONS)
@pytest.mark.parametrize("header_limit,received_limit", [(1 << 20, 50), (300, 2)])
def test_header_sections_read_as_line_by_line(
    section: bytes, header_limit: int, received_limit: int
) -> None:
    limits = Limits(
        max_message_size=6000,
        max_text_line=1000,
        max_header_size=header_limit,
        max_received_headers=received_limit,
    )
    body = b"\r\nReceived: in the body\r\nline\r\n" if section.endswith(b"\r\n\r\n") else b""
    stream = section + body + b".\r\nQUIT\r\n"
    expected = reference(stream, limits)
    rng = random.Random(section)
    chunkings = [[len(stream)], [1] * len(stream), [9] * (len(stream) // 9 + 1)]
    chunkings += [[rng.randint(1, 120) for _ in range(len(stream))] for _ in range(20)]
    for sizes in chunkings:
        assert read(stream, limits, sizes) == expected, sizes[:10]
