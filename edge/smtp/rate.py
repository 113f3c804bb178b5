"""The minimum transfer rate of DATA: a client must keep sending, not trickle.

`DataRate` counts the octets of DATA as they arrive and, at the end of each window of
`Limits.data_rate_window` seconds, asks whether the window brought its share of
`Limits.min_data_rate`; if not, it calls the session's `too_slow`. Time comes from the
clock passed in. It never reads or changes the data, and it holds one timer at most.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.interfaces import IDelayedCall, IReactorTime

from edge.smtp.data import Limits


class DataRate:
    def __init__(self, clock: IReactorTime, limits: Limits, too_slow: Callable[[int], None]):
        """`too_slow` is called with the octets of the window that fell short."""
        self.clock = clock
        self.limits = limits
        self.too_slow = too_slow
        self.octets = 0
        self._timer: IDelayedCall | None = None

    def start(self) -> None:
        """DATA begins: count from here (nothing is watched with no minimum rate)."""
        self.stop()
        self.octets = 0
        if self.limits.min_data_rate > 0:
            self._timer = self.clock.callLater(self.limits.data_rate_window, self._check)

    def stop(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _check(self) -> None:
        self._timer = None
        window = self.limits.data_rate_window
        if self.octets < self.limits.min_data_rate * window:
            self.too_slow(self.octets)
            return
        self.octets = 0
        self._timer = self.clock.callLater(window, self._check)
