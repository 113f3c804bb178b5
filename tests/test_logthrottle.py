"""edge.runtime.logthrottle: a reason said once per interval, with the count of the lines held
back."""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock
from twisted.logger import Logger, LogPublisher, formatEvent

from edge.runtime.logthrottle import MAX_REASONS, Quieter


def _quieter(interval: float = 10.0) -> tuple[Quieter, Clock, list[str]]:
    lines: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        lines.append(formatEvent(event))

    clock = Clock()
    publisher = LogPublisher(observe)  # type: ignore[arg-type]
    return Quieter(Logger(observer=publisher), clock, interval), clock, lines


def test_repeats_are_counted_and_told_at_the_end_of_the_interval() -> None:
    quiet, clock, lines = _quieter()
    for n in range(5):
        quiet.say("offline", "msg {n} deferred: offline", n=n)
    quiet.say("other", "msg x deferred: other")
    assert lines == ["msg 0 deferred: offline", "msg x deferred: other"]
    clock.advance(10)
    assert lines[2:] == ["offline (4 more in 10 s)"]  # "other" had no repeats: no summary
    quiet.say("offline", "msg 9 deferred: offline")
    assert lines[-1] == "msg 9 deferred: offline"  # a new interval starts with a full line


def test_past_the_limit_every_line_is_logged() -> None:
    quiet, clock, lines = _quieter()
    for n in range(MAX_REASONS):
        quiet.say(f"r{n}", "first {n}", n=n)
    quiet.say("one more", "new reason")
    quiet.say("one more", "new reason")
    assert lines[-2:] == ["new reason", "new reason"]
    assert len(clock.getDelayedCalls()) == MAX_REASONS
