"""Answer from a cache at once, or run the loader in a worker thread: one runner for both.

Some caches answer lookups that block on a miss (the DNS resolver's, which queries the
network; the store's `CachedLookups`, which queries the database). Work made of such lookups
(an SPF evaluation, a recipient's route) is cheap when every answer is cached, and must not
block the reactor when one is not. `CachedLoad.run(fn, *args)` runs `fn` at once in the
calling thread in cache-only mode: a lookup the cache cannot answer calls `miss`, which
raises `NotCached`; if one did (even if `fn` swallowed it, as pyspf's bare `except:` does),
`fn` runs again from the start through the loader (a worker thread), where lookups may
block. So `fn` must be free of side effects before its lookups. A cache's lookup asks
`cache_only` before it would block, and tells `hit` when it answered from an entry that
expires (the earliest such expiry is what `inline` reports, for results kept as long as
their answers). Cache-only mode is per thread. This module never blocks and never loads in
the calling thread.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

from twisted.internet import defer

from edge.runtime.nowlater import NowOrLater

T = TypeVar("T")

MISSED: Any = object()
"""`CachedLoad.inline`'s answer when a lookup would have had to load."""


class NotCached(Exception):
    """A lookup in cache-only mode that the cache cannot answer (it would have to load).

    Internal: `CachedLoad.run` catches it and runs the work again through its loader. A miss
    is also noticed when the code in between swallows it."""


class CachedLoad:
    """Runs work made of one cache's lookups: from the cache now, or through `load` later.

    `load(fn, *args, **kwargs)` runs `fn` where it may block (a worker thread) and returns a
    Deferred of its value."""

    def __init__(self, load: Callable[..., defer.Deferred[Any]]) -> None:
        self.load = load
        self._local = threading.local()  # .cache_only / .missed / .expires, per thread

    @property
    def cache_only(self) -> bool:
        """Whether this thread runs work in cache-only mode (a miss must call `miss`)."""
        return getattr(self._local, "cache_only", False)

    def hit(self, expires: float) -> None:
        """A lookup answered from an entry that expires at `expires` (cache-only mode)."""
        local = self._local
        if getattr(local, "cache_only", False) and expires < local.expires:
            local.expires = expires

    def miss(self, what: str) -> NoReturn:
        """A lookup the cache cannot answer in cache-only mode: raises NotCached."""
        self._local.missed = True
        raise NotCached(what)

    def inline(
        self, fn: Callable[..., T], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[T, float]:
        """`fn` in cache-only mode in this thread: its value and when the first of the cached
        answers it used expires (infinity if none told), or `MISSED` when one of its
        lookups would have had to load. Errors of `fn` are raised, unless a lookup missed
        before them (the loader's run will tell)."""
        local = self._local
        local.cache_only = True
        local.missed = False
        local.expires = math.inf
        try:
            result = fn(*args, **kwargs)
        except NotCached:
            local.missed = True
        except Exception:
            if not local.missed:
                raise
        finally:
            local.cache_only = False
        if local.missed:
            local.missed = False
            return MISSED, 0.0
        expires: float = local.expires
        return result, expires

    def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> NowOrLater[T]:
        """`fn`'s value at once when the cache answers all its lookups (an error of that run
        is raised here), else the Deferred of the loader's run. Nested in another run, `fn`
        just runs: the outer run decides."""
        local = self._local
        if getattr(local, "cache_only", False):
            return fn(*args, **kwargs)
        # `inline`, written out: this runs for every cached lookup of every message.
        local.cache_only = True
        local.missed = False
        local.expires = math.inf
        try:
            result = fn(*args, **kwargs)
        except NotCached:
            local.missed = True
        except Exception:
            if not local.missed:
                raise
        finally:
            local.cache_only = False
        if local.missed:
            local.missed = False
            return self.load(fn, *args, **kwargs)
        return result
