"""Log lines that say the same thing again and again, said once per interval with a count.

When a device is offline, every message queued for it is deferred for the same reason, and
a busy edge would write one identical line per message (the history of each message is in
the store's delivery events either way: `/v1/queue/events`). `Quieter.say` logs the first
line for a reason at once and, for the next `interval` seconds, only counts the others; at
the end of the interval one line tells how many there were. Time comes from the injected
clock.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from twisted.logger import Logger

MAX_REASONS = 1000
"""Reasons tracked at once; past this, lines are logged as they come."""


@dataclass
class _Window:
    started: float
    quiet: int = 0


class Quieter:
    def __init__(self, log: Logger, clock: Any, interval: float = 10.0) -> None:
        self.log = log
        self.clock = clock
        self.interval = interval
        self._windows: dict[str, _Window] = {}

    def say(self, reason: str, fmt: str, **fields: Any) -> None:
        """Log `fmt` (with `fields`), unless a line for `reason` went out in this interval."""
        window = self._windows.get(reason)
        if window is not None:
            window.quiet += 1
            return
        self.log.info(fmt, **fields)
        if len(self._windows) < MAX_REASONS:
            self._windows[reason] = _Window(self.clock.seconds())
            self.clock.callLater(self.interval, self._close, reason)

    def _close(self, reason: str) -> None:
        window = self._windows.pop(reason, None)
        if window is not None and window.quiet:
            self.log.info(
                "{reason} ({n} more in {s:.0f} s)", reason=reason, n=window.quiet, s=self.interval
            )
