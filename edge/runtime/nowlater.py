"""Answers that are usually there at once: use them now, and wait only when they are not.

Much of the edge's per-message work (a cached store lookup, a check that needed no DNS)
answers at once, but through interfaces that may have to wait. Wrapping every such answer
in a coroutine and a Deferred costs more than the work itself, so such an interface returns
a `NowOrLater[T]`: the plain value when it has it (an error is raised), a Deferred of it
only when it has to wait. `now` and `then` take either as it is, and build a chain only for
what is still pending. This module never wraps a plain value in a Deferred.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from types import CoroutineType
from typing import Any, TypeAlias, TypeVar, TypeVarTuple, overload

from twisted.internet import defer
from twisted.python.failure import Failure
from typing_extensions import TypeIs

T = TypeVar("T")
U = TypeVar("U")
Ts = TypeVarTuple("Ts")

NowOrLater: TypeAlias = T | defer.Deferred[T]
"""A `T` now, or a Deferred of it later (whose failure is the error)."""

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


@overload
def now(result: defer.Deferred[T]) -> NowOrLater[T]: ...
@overload
def now(result: Coroutine[Any, Any, T]) -> NowOrLater[T]: ...
@overload
def now(result: NowOrLater[T]) -> NowOrLater[T]: ...
def now(result: NowOrLater[T] | Coroutine[Any, Any, T]) -> NowOrLater[T]:
    """`result` itself, the value of a fired Deferred (its failure is raised here), or a
    Deferred still pending. A coroutine runs until it first waits."""
    if not is_deferred(result):
        if not isinstance(result, CoroutineType):  # (a concrete type: no ABC check)
            value: T = result  # type: ignore[assignment]
            return value
        result = defer.Deferred.fromCoroutine(result)
    if result.called and not result.paused:
        fired = result.result
        if isinstance(fired, Failure):
            result.addErrback(lambda _: None)  # raised here instead
            fired.raiseException()
        done: T = fired  # type: ignore[assignment]
        return done
    return result


def then(
    result: NowOrLater[T] | Coroutine[Any, Any, T],
    fn: Callable[[T, *Ts], NowOrLater[U]],
    *args: *Ts,
) -> NowOrLater[U]:
    """`fn(value, *args)` now when `result` has its value (see `now`), else a Deferred of it."""
    result = now(result)
    if is_deferred(result):
        later: defer.Deferred[U] = result.addCallback(fn, *args)
        return later
    return fn(result, *args)
