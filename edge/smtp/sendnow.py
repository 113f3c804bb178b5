"""Replies sent at once: a plain TCP connection with nothing queued gets `send()` now.

Twisted buffers every write until the next turn of the reactor, registering the socket for
writability and removing it again: two `epoll_ctl` calls and a loop turn per SMTP reply.
An SMTP server writes one short reply per command, nearly always to an idle socket, so this
sends it straight away when that is safe (plain TCP, not TLS, nothing already buffered) and
leaves anything the kernel did not take, and every other case, to the transport's `write`.
This is the one place that looks at Twisted's write buffer.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import tcp


def send_now(transport: Any, data: bytes) -> None:
    if (
        isinstance(transport, tcp.Connection)
        and not transport.TLS
        and transport.connected
        and not transport.disconnecting
        and not transport._writeDisconnected
        and transport._tempDataLen == 0
        and len(transport.dataBuffer) == transport.offset
    ):
        try:
            sent = transport.socket.send(data)
        except OSError:
            sent = 0  # the transport's own write meets the error and closes properly
        data = data[sent:]
    if data:
        transport.write(data)
