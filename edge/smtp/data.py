"""The DATA phase of one SMTP transaction: end-of-data, dot-unstuffing and data limits.

`DataReader.feed` takes bytes as they arrive and hands complete, unstuffed lines to the
transaction's sink. Data ends only at `<CRLF>.<CRLF>`; a bare CR or LF anywhere marks the
message as refused (it is still read to its real end, so nothing after a bare-LF dot can
run as a command), as do the size, text-line, header-section and Received-count limits.
Once refused, nothing more reaches the sink and the sink is aborted. It never holds more
than one text line of input, and never decides anything but these wire-level rules.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Protocol

from twisted.logger import Logger

from edge.runtime.nowlater import NowOrLater
from edge.smtp import replies
from edge.smtp.replies import Reply

log = Logger()

_RECEIVED = re.compile(rb"^received:", re.IGNORECASE | re.MULTILINE)


@dataclass
class Limits:
    """Sizes and timeouts of one listener; defaults follow the design's limits."""

    max_message_size: int = 25 * 1024 * 1024
    max_recipients: int = 100
    max_line_length: int = 512
    max_text_line: int = 1000
    max_header_size: int = 1024 * 1024
    max_received_headers: int = 50
    own_received: int = 0
    """How many Received headers this hop adds to a message it accepts (the MX: one; the
    connector, the final delivery: none). Loop detection counts them (`is_loop`)."""
    idle_timeout: float = 300.0
    """Seconds the server waits for the first byte of the next command."""
    command_timeout: float = 60.0
    """Seconds a command line may take from its first byte to its end (not restarted by
    each byte that arrives)."""
    data_timeout: float = 600.0
    """Seconds DATA may go without a byte, and the spool commit may take."""
    min_data_rate: int = 1024
    """Octets per second DATA must average over each `data_rate_window` (0: no minimum)."""
    data_rate_window: float = 60.0
    handler_timeout: float = 60.0
    max_errors: int = 20
    max_junk_commands: int = 100
    """NOOP, RSET, VRFY and HELP commands a session may send since its last accepted
    message before it is closed with 421 4.7.0."""
    max_connections: int = 1000
    max_connections_per_ip: int = 100
    max_connections_per_network: int = 200
    """Concurrent connections from one network (`network_v4_prefix`, `network_v6_prefix`)."""
    network_v4_prefix: int = 24
    network_v6_prefix: int = 64
    reserved_connections: int = 200
    """The last of `max_connections` that only go to clients whose network holds no more
    than `reserved_per_network` connections: one network never takes them all."""
    reserved_per_network: int = 10


def is_loop(received: int, limits: Limits) -> bool:
    """Whether a message with `received` Received headers is refused as a mail loop.

    The one rule of every hop: refused when its Received headers and the ones this hop adds
    (`limits.own_received`) would be more than the limit. So the MX (which adds one) refuses
    at `max_received_headers` incoming ones, and a message it accepted reaches the
    connector (which adds none) with at most `max_received_headers`: the connector, with
    the same limit, never refuses as a loop what its edge accepted.
    """
    return received + limits.own_received > limits.max_received_headers


class MessageSink(Protocol):
    """Receives one message's data; `finish` makes it durable and returns the 250 reply."""

    def write(self, chunk: bytes) -> None: ...

    def finish(self) -> NowOrLater[Reply]: ...

    def abort(self) -> None: ...


class DataReader:
    def __init__(self, limits: Limits, sink: MessageSink | None) -> None:
        self.limits = limits
        self.sink = sink
        self.error: Reply | None = None
        self.size = 0
        self._prev_crlf = True
        self._discarding = False
        self._in_headers = True
        self._header_size = 0
        self._received = 0

    def feed(self, buf: bytes) -> tuple[bool, bytes]:
        """Consume `buf`: (True, what follows the end) at the end of data, else (False,
        the incomplete last line to feed again with more bytes)."""
        pos = 0
        limit = self.limits.max_text_line + 2
        while True:
            if self._in_headers and self._prev_crlf and not self._discarding:
                pos = self._headers(buf, pos, limit)
            if not self._in_headers and self._prev_crlf and not self._discarding:
                done, pos = self._body(buf, pos, limit)
                if done:
                    return True, buf[pos:]
            nl = buf.find(b"\n", pos)
            if nl < 0:
                rest = buf[pos:]
                if len(rest) > limit:
                    # An over-long line: keep counting its size, but do not hold it.
                    self.fail(replies.S552_LINE_TOO_LONG)
                    self._count(len(rest))
                    self._discarding = True
                    rest = b""
                return False, rest
            line = buf[pos : nl + 1]
            pos = nl + 1
            crlf = line.endswith(b"\r\n")
            if self._discarding:
                self._discarding = False
                self._count(len(line))
                self._prev_crlf = crlf
                continue
            if self._prev_crlf and line == b".\r\n":
                return True, buf[pos:]
            if not crlf or b"\r" in line[:-2]:
                self.fail(replies.S550_BARE_NEWLINE)
            if len(line) > limit:
                self.fail(replies.S552_LINE_TOO_LONG)
            if line.startswith(b"."):
                line = line[1:]
            if self._in_headers:
                self._header_line(line)
            self._prev_crlf = crlf
            self._count(len(line))
            if self.error is None and self.sink is not None:
                self.sink.write(line)

    def _body(self, buf: bytes, pos: int, limit: int) -> tuple[bool, int]:
        """The body's complete lines from `pos` at once, by the same rules as line by line
        (the header section is read line by line): (True, just past the end of data) or
        (False, where the incomplete last line starts)."""
        if buf.startswith(b".\r\n", pos):
            return True, pos + 3
        end = buf.find(b"\r\n.\r\n", pos)
        if end >= 0:
            stop = end + 2
        else:
            stop = buf.rfind(b"\n", pos) + 1
            if stop <= pos:
                return False, pos
        region = buf[pos:stop]
        crlf = region.count(b"\r\n")
        if region.count(b"\n") != crlf or region.count(b"\r") != crlf:
            self.fail(replies.S550_BARE_NEWLINE)
        if len(region) >= limit and max(map(len, region.split(b"\n"))) >= limit:
            self.fail(replies.S552_LINE_TOO_LONG)  # a line of `limit` octets before its LF
        if region.startswith(b"."):
            region = region[1:]
        region = region.replace(b"\n.", b"\n")
        self._prev_crlf = region.endswith(b"\r\n")
        self._count(len(region))
        if self.error is None and self.sink is not None:
            self.sink.write(region)
        if end >= 0:
            return True, stop + 3
        return False, stop

    def _headers(self, buf: bytes, pos: int, limit: int) -> int:
        """The whole header section from `pos` at once, with the empty line that ends it,
        when it is all here and plain (CRLF lines, none starting with a dot, every limit
        kept): where reading goes on. Otherwise `pos`, and it is read line by line, which
        says exactly where and why it is refused."""
        if buf.startswith(b"\r\n", pos):
            return pos
        end = buf.find(b"\r\n\r\n", pos)
        if end < 0:
            return pos
        region = buf[pos : end + 4]
        crlf = region.count(b"\r\n")
        if region.startswith(b".") or b"\n." in region:
            return pos
        if region.count(b"\n") != crlf or region.count(b"\r") != crlf:
            return pos
        if len(region) >= limit and max(map(len, region.split(b"\n"))) >= limit:
            return pos
        fields = len(region) - 2
        received = len(_RECEIVED.findall(region))
        if (
            self._header_size + fields > self.limits.max_header_size
            or is_loop(self._received + received, self.limits)
            or self.size + len(region) > self.limits.max_message_size
        ):
            return pos
        self._header_size += fields
        self._received += received
        self._in_headers = False
        self._count(len(region))
        if self.error is None and self.sink is not None:
            self.sink.write(region)
        return end + 4

    def _header_line(self, line: bytes) -> None:
        """Header-section limits: its size and the Received count (loop detection)."""
        if line in (b"\r\n", b"\n"):
            self._in_headers = False
            return
        self._header_size += len(line)
        if self._header_size > self.limits.max_header_size:
            self.fail(replies.S552_HEADER_TOO_BIG)
        if line[:9].lower() == b"received:":
            self._received += 1
            if is_loop(self._received, self.limits):
                self.fail(replies.S554_LOOP)

    def _count(self, n: int) -> None:
        self.size += n
        if self.size > self.limits.max_message_size:
            self.fail(replies.S552_TOO_BIG)

    def fail(self, reply: Reply) -> None:
        """Refuse the message with `reply` (the first refusal wins) and drop its data."""
        if self.error is None:
            self.error = reply
            self.abort()

    def abort(self) -> None:
        sink, self.sink = self.sink, None
        if sink is not None:
            try:
                sink.abort()
            except Exception:
                log.failure("smtp: aborting message data failed")

    def take_sink(self) -> MessageSink | None:
        sink, self.sink = self.sink, None
        return sink
