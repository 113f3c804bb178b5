"""Twisted services shared by the processes: TCP listeners that know their real port, and a
report of where everything listens, written once all listeners are up.

The report (`<data_dir>/run/listening.json`) is how scripts and tests find ports when the
configuration asks for port 0. Nothing here decides policy.
"""

from __future__ import annotations

import gc
import json
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.application.service import MultiService, Service
from twisted.internet.interfaces import IListeningPort

from edge.config import parse_listen


def freeze_start_up() -> None:
    """Keep what start-up made (modules, the store's metadata, the API models; it lives as
    long as the process) out of the cyclic collector's full passes, which would otherwise
    scan it every time: tens of milliseconds during which no session is served. For each
    process, once it is assembled."""
    gc.freeze()


class TCPListener(Service):
    """Listens on `host:port` (port 0: any free port) when started.

    With `reuse_port`, the socket is bound with SO_REUSEPORT, so that other processes of
    the same user can bind the same port and the kernel spreads new connections over them.
    """

    def __init__(
        self, name: str, listen: str, factory: Any, reactor: Any, *, reuse_port: bool = False
    ) -> None:
        self.setName(name)
        self.host, self.port = parse_listen(listen)
        self.factory = factory
        self.reactor = reactor
        self.reuse_port = reuse_port
        self.listening: IListeningPort | None = None

    def startService(self) -> None:
        super().startService()
        if self.reuse_port:
            self.listening = self._listen_reusing_port()
        else:
            self.listening = self.reactor.listenTCP(self.port, self.factory, interface=self.host)
        bound: Any = self.listening.getHost()
        self.port = bound.port

    def _listen_reusing_port(self) -> IListeningPort:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((self.host, self.port))
            sock.listen(128)
            sock.setblocking(False)
            port: IListeningPort = self.reactor.adoptStreamPort(sock.fileno(), family, self.factory)
        finally:
            sock.close()  # the reactor holds its own duplicate of the descriptor
        return port

    def stopService(self) -> Any:
        super().stopService()
        if self.listening is not None:
            listening, self.listening = self.listening, None
            return listening.stopListening()
        return None

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


class ReadyReport(Service):
    """Started last: writes where each listener listens and runs the `ready` callbacks."""

    def __init__(self, run_dir: Path, listeners: list[TCPListener]) -> None:
        self.setName("ready-report")
        self.run_dir = run_dir
        self.listeners = listeners
        self.ready: list[Callable[[dict[str, str]], None]] = []

    def startService(self) -> None:
        super().startService()
        addresses = {str(listener.name): listener.address for listener in self.listeners}
        self.run_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.run_dir / "listening.json.tmp"
        tmp.write_text(json.dumps({"pid": os.getpid(), "listeners": addresses}, indent=2))
        os.replace(tmp, self.run_dir / "listening.json")
        for callback in self.ready:
            callback(addresses)

    def stopService(self) -> Any:
        super().stopService()
        (self.run_dir / "listening.json").unlink(missing_ok=True)
        return None


def add_listeners(parent: MultiService, listeners: list[TCPListener]) -> None:
    for listener in listeners:
        listener.setServiceParent(parent)
