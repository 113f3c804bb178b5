"""The delivery queue and devices it cannot reach: mail for an offline device waits without
attempts, is routed once per attempt, shares one timer, and a DNS failure is recorded in the
queue's own words. Same harness as tests/test_delivery_queue.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edge.dns.resolver import DNSTemporaryError
from edge.smtp import replies
from edge.store import RecipientTarget
from tests.test_delivery_queue import SCHEDULE, SENDER, A, B, Harness, all_, device


def offline(address: str) -> RecipientTarget:
    """A device that has not told the edge where to reach it."""
    found = device(address)
    return RecipientTarget(**{**found.__dict__, "connector_smtp_addr": ""})


def test_each_recipient_is_routed_once_per_attempt(tmp_path: Path) -> None:
    h = Harness(tmp_path, {A: device(A), B: offline(B)}, all_(250))
    asked: list[str] = []
    route_soon = h.queue.route_soon

    def counting(rcpt: str, kind: str) -> Any:
        asked.append(rcpt)
        return route_soon(rcpt, kind)

    h.queue.route_soon = counting
    env = h.accept([B, A])  # B's route is known unusable at once; A's is not
    h.clock.advance(0)
    assert sorted(asked) == [A, B]
    [call] = h.deliverer.calls
    assert call.recipients == [A]
    assert h.queue.states[env.qid].last_errors[B].startswith("451 4.4.0")


def test_mail_for_an_offline_device_is_deferred_at_once_then_delivered(tmp_path: Path) -> None:
    events: list[tuple[str, str, str, str]] = []
    h = Harness(tmp_path, {A: offline(A)}, all_(250, "2.0.0 Ok"))
    h.queue.on_event = lambda *e: events.append(e)
    attempts: list[str] = []
    full_attempt = h.queue._attempt

    def counted(qid: str, *args: Any, **kwargs: Any) -> Any:
        attempts.append(qid)
        return full_attempt(qid, *args, **kwargs)

    h.queue._attempt = counted  # type: ignore[method-assign]
    env = h.accept([A])
    h.clock.advance(0)
    assert attempts == []  # decided at once, without the attempt's coroutine
    assert h.deliverer.calls == [] and not h.queue.is_running(env.qid)
    assert [e[2] for e in events] == ["accepted", "deferred"]
    assert events[-1][3].startswith("451 4.4.0 device dev1 has no connector address")
    state = h.queue.states[env.qid]
    assert state.attempts == 1 and state.next_attempt == SCHEDULE[0]
    assert state.last_errors[A].startswith("451 4.4.0")
    h.clock.advance(SCHEDULE[0])  # still offline: deferred again, on the schedule
    assert h.queue.states[env.qid].attempts == 2 and h.deliverer.calls == []
    h.targets[A] = device(A)  # it came back
    h.clock.advance(SCHEDULE[1])
    assert h.deliverer.rcpts() == [[A]] and attempts == [env.qid]
    assert h.spool.queued_ids() == []


def test_an_offline_device_still_gets_the_delayed_report(tmp_path: Path) -> None:
    h = Harness(tmp_path, {A: offline(A)})
    h.queue.delay_warning = 100.0
    env = h.accept([A])
    h.clock.advance(0)
    assert h.dsns_to(SENDER) == []
    h.clock.advance(SCHEDULE[0] + SCHEDULE[1])  # the second retry is past the warning delay
    (dsn,) = h.dsns_to(SENDER)
    assert b"delayed" in dsn.data.lower()
    assert h.spool.entry(env.qid).warned


def test_many_waiting_messages_share_one_timer_and_keep_their_order(tmp_path: Path) -> None:
    h = Harness(tmp_path, {A: offline(A), B: offline(B)}, all_(250, "2.0.0 Ok"))
    first = [h.accept([A]) for _ in range(30)]
    h.clock.advance(5)  # (the first attempts run at t=5)
    later = [h.accept([B]) for _ in range(20)]
    h.clock.advance(0)
    # 50 messages wait for their retries; the reactor holds one timer for all of them.
    timers = [c for c in h.clock.getDelayedCalls() if getattr(c, "func", None) == h.queue._ring]
    assert len(timers) == 1 and timers[0].getTime() == 5 + SCHEDULE[0]
    h.queue.unschedule(first[0].qid)
    h.queue.schedule(later[-1].qid, 1.0)  # moved earlier than everything else
    ring = [c for c in h.clock.getDelayedCalls() if getattr(c, "func", None) == h.queue._ring]
    assert [c.getTime() for c in ring] == [6.0]
    h.targets[A], h.targets[B] = device(A), device(B)
    h.clock.advance(1)
    assert h.deliverer.rcpts() == [[B]]
    h.clock.advance(SCHEDULE[0])
    # The rest, oldest first; the unscheduled one waits until something schedules it.
    assert len(h.deliverer.calls) == 49
    assert h.spool.queued_ids() == [first[0].qid]
    order = [c.data.split(b"\r\n", 1)[0] for c in h.deliverer.calls[1:]]
    expected = [b"X-Tailpost-Queue-ID: " + e.qid.encode() for e in first[1:] + later[:-1]]
    assert order == expected


def test_a_dns_failure_is_recorded_without_the_resolver_s_words(tmp_path: Path) -> None:
    """The resolver's text (its servers, its timeouts) goes to the log, never into the
    recorded reply that a "delayed" or "failed" report quotes to the sender."""
    h = Harness(tmp_path, {})

    def unreachable(rcpt: str, kind: str) -> Any:
        raise DNSTemporaryError("All nameservers failed to answer: 10.0.0.53 port 53")

    h.queue.route_soon = unreachable
    env = h.accept([A])
    h.clock.advance(0)
    assert h.queue.states[env.qid].last_errors == {A: replies.D451_DNS_FAILED.status}
    assert "10.0.0.53" not in replies.D451_DNS_FAILED.status
