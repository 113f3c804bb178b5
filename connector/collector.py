"""Python's cyclic collector, paused while the device works through every message of a folder.

A FETCH or SEARCH over a large folder makes a few objects per message (a `MaildirMessage`,
the pairs that list them) that live as long as the command and are then freed by reference
counting. Alive for the collector's young passes, they are moved to its oldest generation,
and once that has grown by a quarter, the next pass walks every object of the process: at
100,000 messages about a million of them, the folder's listing included. Measured there:
`UID SEARCH UNSEEN` took 1,026 ms with the collector running and 179 ms without. So such a
command (and the local API's parsing of a message, `webapi.local.mail`) holds a
`CollectorPause` while it works: `with pause:` around what it does at once, and
`pause.until(d)` for what goes on until a Deferred fires (a search in a worker thread, a
listing written in slices). What it made is gone by then and never reaches the old
generation.

The collector is one for the whole process, so the pause is chosen once, when the process is
put together (`for_process`), and shared by everything in it; its holds are counted (from
any thread), and it lets go when the last is released:

- `WHOLE`, in the device's own process: the collector is disabled while held, and enabled
  again after, if it was before. Nothing else in that process needs it meanwhile.
- `FULL_PASSES`, in the all-in-one, where the edge's MX shares the process: a process-wide
  `gc.disable()` would also stop collection for the MX (its Deferreds and failures make
  cycles, each session's mail), for as long as a client's command runs. So only the full
  passes are held off (the oldest generation's threshold is set out of reach, and put back
  after): the young passes go on, for the MX's garbage as for the command's. Measured on a
  model of the command (300,000 short-lived objects beside 300,000 long-lived ones): 1,100
  to 2,100 ms with the collector running, 170 to 190 ms disabled, 230 to 280 ms with only
  the full passes held off. A `gc.freeze()` of the listing was not taken: the command's own
  objects would still reach the oldest generation, whose passes would then come more often
  (the quarter is counted on what is not frozen), and a frozen object is never collected.
- `NO_PAUSE` holds nothing (for callers that need no pause).

This module must never leave the collector disabled, or its thresholds changed, once the
last hold is released, and never touch the collector when nothing holds a pause.
"""

from __future__ import annotations

import gc
import threading
from types import TracebackType
from typing import TypeVar

from twisted.internet import defer

T = TypeVar("T")

OUT_OF_REACH = 1 << 30
"""The oldest generation's threshold while `FULL_PASSES` is held: no full pass is due."""


class CollectorPause:
    """A counted hold on the collector; `NO_PAUSE` as it is (subclasses say what holding does).

    `with pause:` holds it for a block; `pause.until(d)` holds it until `d` fires (and
    returns `d`). Holds nest, from any thread; releasing more than was held changes
    nothing."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._holds = 0

    def __enter__(self) -> None:
        with self._lock:
            if self._holds == 0:
                self._hold()
            self._holds += 1

    def __exit__(
        self,
        kind: type[BaseException] | None = None,
        exc: BaseException | None = None,
        tb: TracebackType | None = None,
    ) -> None:
        with self._lock:
            if self._holds == 0:
                return
            self._holds -= 1
            if self._holds == 0:
                self._let_go()

    def until(self, d: defer.Deferred[T]) -> defer.Deferred[T]:
        """Hold the pause until `d` has fired (its result goes on unchanged)."""
        self.__enter__()

        def released(result: T) -> T:
            self.__exit__()
            return result

        return d.addBoth(released)

    def _hold(self) -> None:
        """(Lock held.) The first hold begins."""

    def _let_go(self) -> None:
        """(Lock held.) The last hold ended."""


class _Disabled(CollectorPause):
    def __init__(self) -> None:
        super().__init__()
        self._was_enabled = False

    def _hold(self) -> None:
        self._was_enabled = gc.isenabled()
        gc.disable()

    def _let_go(self) -> None:
        if self._was_enabled:
            gc.enable()


class _FullPassesHeld(CollectorPause):
    def __init__(self) -> None:
        super().__init__()
        self._oldest = 0

    def _hold(self) -> None:
        young, middle, self._oldest = gc.get_threshold()
        gc.set_threshold(young, middle, OUT_OF_REACH)

    def _let_go(self) -> None:
        young, middle, _ = gc.get_threshold()
        gc.set_threshold(young, middle, self._oldest)


WHOLE: CollectorPause = _Disabled()
"""The collector disabled while held: for a process that serves no MX."""

FULL_PASSES: CollectorPause = _FullPassesHeld()
"""Only the full passes held off: for a process that shares the collector with the MX."""

NO_PAUSE = CollectorPause()
"""Holds nothing."""


def for_process(with_mx: bool) -> CollectorPause:
    """The pause of a device process: `FULL_PASSES` when the edge's MX runs in it too (the
    all-in-one), else `WHOLE`."""
    return FULL_PASSES if with_mx else WHOLE
