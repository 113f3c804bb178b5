"""Helpers for tests that talk to a listener over real sockets on 127.0.0.1 while its timers
run on an injected `Clock`.

A clock step must come after the server has read what the client sent: `settle` waits
until every client's bytes have left its socket (acknowledged by the server's kernel) and
every session's socket has nothing left unread (checked in the reactor thread, which is the
one that reads), so the step that follows cannot overtake the bytes.
"""

from __future__ import annotations

import array
import fcntl
import socket
import termios
import time
from collections.abc import Callable, Iterable
from typing import Any


def _unread(protocols: Iterable[Any]) -> int:
    total = 0
    for proto in protocols:
        transport = getattr(proto, "transport", None)
        handle = transport.getHandle() if transport is not None else None
        if handle is None or handle.fileno() < 0:
            continue
        count = array.array("i", [0])
        try:
            fcntl.ioctl(handle.fileno(), termios.FIONREAD, count)
        except OSError:
            continue
        total += count[0]
    return total


def _unsent(clients: Iterable[Client]) -> int:
    total = 0
    for client in clients:
        if client.sock.fileno() < 0:
            continue
        count = array.array("i", [0])
        fcntl.ioctl(client.sock.fileno(), termios.TIOCOUTQ, count)
        total += count[0]
    return total


def settle(
    in_reactor: Any, sessions: Callable[[], Iterable[Any]], clients: Iterable[Client] = ()
) -> None:
    """Wait until the server has read everything `clients` (or any client) sent so far."""
    clients = list(clients)
    for _ in range(5000):
        if _unsent(clients) == 0 and in_reactor(lambda: _unread(list(sessions()))) == 0:
            in_reactor(lambda: None)  # one more turn: what was read has been handled
            return
        time.sleep(0.002)
    raise AssertionError("the server did not read its clients' input")


class Client:
    """A blocking client socket from `source` (any address of 127.0.0.0/8 works)."""

    def __init__(self, port: int, source: str = "127.0.0.1") -> None:
        self.sock = socket.create_connection(
            ("127.0.0.1", port), timeout=10, source_address=(source, 0)
        )
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def line(self) -> bytes:
        """The next line the server sent (without its CRLF)."""
        while b"\r\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"closed; got {self.buffer!r}")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\r\n", 1)
        return line

    def reply(self) -> str:
        """The next complete SMTP reply's last line, e.g. "250 2.0.0 OK"."""
        while True:
            line = self.line()
            if line[3:4] != b"-":
                return line.decode()

    def arrived(self) -> bytes:
        """What the server has sent and was not read yet, without waiting."""
        self.sock.setblocking(False)
        try:
            while True:
                try:
                    chunk = self.sock.recv(65536)
                except BlockingIOError:
                    break
                if not chunk:
                    break
                self.buffer += chunk
        finally:
            self.sock.settimeout(10)
        out, self.buffer = self.buffer, b""
        return out

    def is_closed(self) -> bool:
        """Whether the server closed the connection (after what it sent is read)."""
        self.sock.settimeout(10)
        while True:
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                return True
            if not chunk:
                return True
            self.buffer += chunk

    def close(self) -> None:
        self.sock.close()
