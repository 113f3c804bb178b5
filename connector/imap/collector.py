"""Python's cyclic collector, paused while a command works through every message of a folder.

A FETCH or SEARCH over a large folder makes a few objects per message (a `MaildirMessage`,
the pairs that list them) that live as long as the command and are then freed by reference
counting. Alive for the collector's young passes, they are moved to its oldest generation,
and once that has grown by a quarter, the next pass walks every object of the process: at
100,000 messages about a million of them, the folder's listing included. Measured there:
`UID SEARCH UNSEEN` took 1,026 ms with the collector running and 179 ms without. So such a
command pauses the collector and lets it go on when it is done; what it made is gone by
then and never reaches the old generation. The collector is one for the whole process, so
the pauses are counted: it runs again when the last command that paused it is done, and
only if it ran before the first. The local API's parsing of a message pauses it too
(`webapi.local.mail`).
"""

from __future__ import annotations

import contextlib
import gc
import threading
from collections.abc import Iterator

_lock = threading.Lock()
_pauses = 0
_was_enabled = False


def pause() -> None:
    global _pauses, _was_enabled
    with _lock:
        if _pauses == 0:
            _was_enabled = gc.isenabled()
            gc.disable()
        _pauses += 1


def resume() -> None:
    global _pauses
    with _lock:
        if _pauses == 0:
            return
        _pauses -= 1
        if _pauses == 0 and _was_enabled:
            gc.enable()


@contextlib.contextmanager
def paused() -> Iterator[None]:
    pause()
    try:
        yield
    finally:
        resume()
