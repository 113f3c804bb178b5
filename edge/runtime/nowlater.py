"""Answers that are usually there at once: use them now, and wait only when they are not.

Much of the edge's per-message work (a cached store lookup, a check that needed no DNS)
answers at once, but through interfaces that may have to wait. Wrapping every such answer
in a coroutine and a Deferred costs more than the work itself, so these helpers take a
plain value or an already fired Deferred as it is, and build a chain only for what is still
pending.
"""

from __future__ import annotations

from collections.abc import Callable
from types import CoroutineType
from typing import Any

from twisted.internet import defer
from twisted.python.failure import Failure
from typing_extensions import TypeIs

_IS_DEFERRED: dict[type, bool] = {}


def is_deferred(value: object) -> TypeIs[defer.Deferred[Any]]:
    """`isinstance(value, Deferred)`, remembered per type: Deferred's class is an ABC, so
    the plain check goes through `ABCMeta.__instancecheck__` in Python, and these checks
    run many times per message."""
    kind = type(value)
    known = _IS_DEFERRED.get(kind)
    if known is None:
        known = _IS_DEFERRED[kind] = isinstance(value, defer.Deferred)
    return known


def now(result: Any) -> Any:
    """`result` itself, the value of a fired Deferred (its failure is raised here), or a
    Deferred still pending. A coroutine runs until it first waits."""
    if not is_deferred(result):
        if not isinstance(result, CoroutineType):  # (a concrete type: no ABC check)
            return result
        result = defer.Deferred.fromCoroutine(result)
    if result.called and not result.paused:
        value = result.result
        if isinstance(value, Failure):
            result.addErrback(lambda _: None)  # raised here instead
            value.raiseException()
        return value
    return result


def then(result: Any, fn: Callable[..., Any], *args: Any) -> Any:
    """`fn(value, *args)` now when `result` has its value (see `now`), else a Deferred of it."""
    result = now(result)
    if is_deferred(result):
        return result.addCallback(fn, *args)
    return fn(result, *args)
