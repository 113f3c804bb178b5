"""edge.runtime.nowlater: answers that are already there are used as they are, the rest waits."""

from __future__ import annotations

import pytest
from twisted.internet import defer
from twisted.python.failure import Failure

from edge.runtime.nowlater import is_deferred, now, then
from edge.smtp.replies import S550_NO_SUCH_USER, SMTPReplyError


async def _finished() -> str:
    return "done"


async def _waits(d: defer.Deferred[str]) -> str:
    return (await d) + "!"


async def _refuses() -> None:
    raise SMTPReplyError(S550_NO_SUCH_USER)


def test_plain_values_and_fired_deferreds_are_taken_now() -> None:
    assert now("value") == "value"
    assert now(None) is None
    assert now(defer.succeed(3)) == 3
    assert now(_finished()) == "done"


def test_a_fired_failure_is_raised_and_counts_as_handled() -> None:
    d: defer.Deferred[None] = defer.fail(SMTPReplyError(S550_NO_SUCH_USER))
    with pytest.raises(SMTPReplyError):
        now(d)
    with pytest.raises(SMTPReplyError):
        now(_refuses())
    # The failure was consumed: nothing is left to be logged as unhandled.
    assert not isinstance(d.result, BaseException) and d.result is None


def test_pending_answers_stay_deferred() -> None:
    pending: defer.Deferred[str] = defer.Deferred()
    assert now(pending) is pending
    waiting: defer.Deferred[str] = defer.Deferred()
    result = now(_waits(waiting))
    assert isinstance(result, defer.Deferred) and not result.called
    waiting.callback("late")
    assert result.result == "late!"


def test_a_deferred_paused_on_another_is_not_taken_as_fired() -> None:
    inner: defer.Deferred[str] = defer.Deferred()
    outer: defer.Deferred[str] = defer.succeed("x")
    outer.addCallback(lambda _: inner)
    assert outer.called and outer.paused
    assert now(outer) is outer
    inner.callback("inner")
    assert outer.result == "inner"


def test_then_calls_now_or_later() -> None:
    assert then(2, lambda v, k: v * k, 5) == 10
    assert then(defer.succeed(2), lambda v: v + 1) == 3
    pending: defer.Deferred[int] = defer.Deferred()
    chained = then(pending, lambda v: v + 1)
    assert isinstance(chained, defer.Deferred) and not chained.called
    pending.callback(1)
    assert chained.result == 2


def test_is_deferred_tells_deferreds_from_values_of_any_type() -> None:
    class Later(defer.Deferred[None]):
        pass

    for _ in range(2):  # the second round answers from what the first remembered
        assert is_deferred(defer.Deferred()) and is_deferred(Later())
        fired = defer.succeed(1)
        assert is_deferred(fired)
        values: list[object] = [None, 1, "x", [], Failure(ValueError())]
        assert not any(is_deferred(v) for v in values)
