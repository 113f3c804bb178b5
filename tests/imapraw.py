"""A minimal IMAP client over a socket for tests that need the exact bytes of responses
(literals and their announced sizes), or control over when a response is read."""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass, field

_LITERAL_AT_END = re.compile(rb"\{(\d+)\}\r\n$")


@dataclass
class Line:
    """One response, its literals taken out: `text` holds `{n}` where each one was."""

    text: bytes = b""
    literals: list[bytes] = field(default_factory=list)


class RawIMAP:
    def __init__(self, port: int, *, rcvbuf: int | None = None, timeout: float = 30) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(timeout)
        self.sock.connect(("127.0.0.1", port))
        self.file = self.sock.makefile("rb")
        greeting = self.file.readline()
        assert greeting.startswith(b"* OK"), greeting

    def send(self, line: bytes) -> None:
        self.sock.sendall(line + b"\r\n")

    def line(self) -> Line:
        out = Line()
        while True:
            raw = self.file.readline()
            if not raw:
                raise ConnectionError("the server closed the connection")
            out.text += raw
            m = _LITERAL_AT_END.search(raw)
            if m is None:
                return out
            data = self.file.read(int(m.group(1)))
            assert len(data) == int(m.group(1))
            out.literals.append(data)

    def until_tagged(self, tag: bytes) -> tuple[list[Line], Line]:
        """The untagged responses, then the tagged one, of the command tagged `tag`."""
        untagged: list[Line] = []
        while True:
            line = self.line()
            if line.text.startswith(tag + b" "):
                return untagged, line
            untagged.append(line)

    def command(self, tag: bytes, line: bytes) -> tuple[list[Line], Line]:
        self.send(tag + b" " + line)
        return self.until_tagged(tag)

    def login(self, user: bytes = b"bob", password: bytes = b"secret") -> None:
        _, done = self.command(b"L", b"LOGIN " + user + b" " + password)
        assert done.text.startswith(b"L OK"), done

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass
