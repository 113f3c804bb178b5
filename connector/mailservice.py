"""Enabling and disabling the device's mail services, and the state of its link to the edge.

`MailService` owns the mail listeners (connector SMTP, IMAP, submission when present): it
starts them only while mail is enabled and remembers the choice in a small JSON file, so a
restart keeps a disabled device disabled. Disabling stops listening and nothing else: the
Maildir and every stored message stay; connections already open finish what they are doing;
mail for the device waits in the edge's queue, which retries until the device listens again.
`LinkState` remembers when the edge was last heard from. This module must never delete mail
or touch the Maildir, and never block the reactor thread (the state file is written in a
worker thread).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.logger import Logger

__all__ = ["LinkState", "MailService", "read_enabled"]

log = Logger(namespace="tailpost.mailservice")

DEFAULT_ONLINE_WINDOW = 15 * 60.0


def read_enabled(path: Path) -> bool:
    """The saved state: enabled unless the file says otherwise (a damaged file: enabled)."""
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError):
        return True
    return not (isinstance(raw, dict) and raw.get("mail") == "disabled")


def _write_state(path: Path, enabled: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump({"mail": "enabled" if enabled else "disabled"}, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class MailService(Service):
    """Starts the mail listeners while mail is enabled; `enable()`/`disable()` switch it."""

    def __init__(
        self,
        state_path: Path,
        listeners: Sequence[Service],
        run_blocking: Callable[..., Deferred[Any]],
    ) -> None:
        self.setName("mail")
        self.state_path = state_path
        self.listeners = list(listeners)
        self._run = run_blocking
        self.enabled = read_enabled(state_path)
        self._busy: Deferred[Any] = defer.succeed(None)

    @property
    def status(self) -> str:
        return "enabled" if self.enabled else "disabled"

    def startService(self) -> None:
        super().startService()
        if self.enabled:
            self._start_listeners()

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        return self._stop_listeners()

    def _start_listeners(self) -> None:
        for listener in self.listeners:
            if not listener.running:
                listener.startService()

    def _stop_listeners(self) -> Deferred[Any]:
        stops = [
            defer.maybeDeferred(listener.stopService)
            for listener in self.listeners
            if listener.running
        ]
        return defer.gatherResults(stops, consumeErrors=True)

    def _serialized(self, work: Callable[[], Deferred[Any]]) -> Deferred[Any]:
        """Run switches one after another, so enable and disable never interleave."""
        done: Deferred[Any] = Deferred()

        def run(_: object) -> Deferred[Any]:
            d = defer.maybeDeferred(work)
            d.chainDeferred(done)
            return d.addErrback(lambda _f: None)

        self._busy = self._busy.addCallback(run)
        return done

    def enable(self) -> Deferred[bool]:
        """Start the listeners and save "enabled"; fires with True if anything changed."""

        def work() -> Deferred[bool]:
            changed = not self.enabled
            d = self._run(_write_state, self.state_path, True)

            def started(_: object) -> bool:
                self.enabled = True
                if self.running:
                    self._start_listeners()
                return changed

            return d.addCallback(started)

        return self._serialized(work)

    def disable(self) -> Deferred[bool]:
        """Stop the listeners and save "disabled"; fires with True if anything changed."""

        def work() -> Deferred[bool]:
            changed = self.enabled
            d = self._run(_write_state, self.state_path, False)

            def stop(_: object) -> Deferred[Any]:
                self.enabled = False
                return self._stop_listeners()

            return d.addCallback(stop).addCallback(lambda _: changed)

        return self._serialized(work)


class LinkState:
    """When the edge was last heard from (a delivery or a successful API call)."""

    def __init__(
        self, clock: Callable[[], float], online_window: float = DEFAULT_ONLINE_WINDOW
    ) -> None:
        self._clock = clock
        self.online_window = online_window
        self.last_seen: float | None = None

    def touch(self) -> None:
        self.last_seen = self._clock()

    @property
    def status(self) -> str:
        """ "online" when heard from within the window, "offline" after, "unknown" never."""
        if self.last_seen is None:
            return "unknown"
        return "online" if self._clock() - self.last_seen <= self.online_window else "offline"
