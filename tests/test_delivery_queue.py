"""The delivery queue over a real spool, a fake clock, a real Router and a scripted deliverer.

DSNs the queue sends are delivered to the MX target of the sender (answered 250 here) and
recorded apart from the deliveries under test; tests/test_queue_dsn.py looks at them.
"""

from __future__ import annotations

import gc
import json
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import pytest
from twisted.internet.task import Clock

from edge.delivery.outcomes import Outcome
from edge.delivery.queue import INTAKE_WAIT, DeliveryQueue
from edge.delivery.routing import Router, Target
from edge.dns.resolver import DNSResolver
from edge.spool.scan import recoverable
from edge.spool.spool import Envelope, Spool
from edge.store import RecipientTarget
from tests.fakes import (
    Answer,
    Call,
    MXResolver,
    RecordingSpool,
    Script,
    ScriptedDeliverer,
    pending,
    run_sync,
)

SCHEDULE = [60.0, 300.0, 900.0]
BODY = b"Received: from x\r\nSubject: hello\r\n\r\nbody\r\n"


def device(address: str, device_id: str = "dev1", port: int = 2525) -> RecipientTarget:
    """What the store answers for an address on a device."""
    return RecipientTarget(
        kind="device",
        address=address,
        device_id=device_id,
        connector_smtp_addr=f"100.64.0.{port % 250}:{port}",
        connector_username=f"edge-{device_id}",
        connector_secret="secret",
        route_id=None,
        upstream_hosts=[],
    )


def device_target(device_id: str = "dev1", port: int = 2525) -> Target:
    """The target the Router makes of `device(...)`."""
    host = f"100.64.0.{port % 250}"
    return Target(
        kind="device",
        key=f"device:{device_id}:{host}:{port}",
        hosts=((host, port),),
        username=f"edge-{device_id}",
        secret="secret",
        starttls=True,  # where offered: no pin of the connector's key is known
        device_id=device_id,
    )


def all_(code: int, text: str = "") -> Script:
    return lambda call: dict.fromkeys(call.recipients, Outcome(code, text or f"{code} reply"))


class Harness:
    def __init__(
        self,
        root: Path,
        targets: dict[str, RecipientTarget],
        script: Script = pending,
    ) -> None:
        self.clock = Clock()
        self.spool = RecordingSpool(root)
        self.targets = targets
        self.deliverer = ScriptedDeliverer(self.clock, script)
        self.router = Router(self.targets.get, cast(DNSResolver, MXResolver()))
        self.queue = DeliveryQueue(
            self.spool,
            self.router.target,
            self.deliverer,
            self.clock,
            SCHEDULE,
            run_blocking=run_sync,
        )

    def accept(self, recipients: list[str], data: bytes = BODY) -> Envelope:
        """What the MX does: spool the message, then hand it to the queue."""
        env = commit(self.spool, recipients, data, self.clock.seconds())
        self.queue.enqueue(env)
        return env

    def done_lines(self, qid: str) -> list[dict[str, Any]]:
        """The outcome records of `qid` in the log of its batch."""
        path = self.spool.queue / f"{self.spool.entry(qid).batch}.log"
        lines = [json.loads(line) for line in path.read_text().splitlines()]
        return [x for x in lines if x.get("q") == qid and "r" in x]

    def finished_log(self, qid: str) -> list[dict[str, str]]:
        return [outcomes for q, outcomes in self.spool.finished_log if q == qid]

    def dsns_to(self, rcpt: str) -> list[Call]:
        return [c for c in self.deliverer.dsn_calls if c.recipients == [rcpt]]


def commit(spool: Spool, recipients: list[str], data: bytes, now: float) -> Envelope:
    writer = spool.writer()
    writer.write(data)
    env = Envelope(writer.qid, "sender@example.net", recipients, now)
    spool.commit(writer, env)
    return env


A = "alice@example.test"
B = "bob@example.test"
SENDER = "sender@example.net"


def test_delivered_message_is_removed_and_carries_the_queue_id(tmp_path: Path) -> None:
    h = Harness(tmp_path, {A: device(A)}, all_(250))
    env = h.accept([A])
    assert h.deliverer.calls == []  # nothing happens before the reactor turns

    h.clock.advance(0)

    [call] = h.deliverer.calls
    assert call.target == device_target()
    assert call.sender == SENDER
    assert call.recipients == [A]
    assert call.data == b"X-Tailpost-Queue-ID: " + env.qid.encode() + b"\r\n" + BODY
    assert h.spool.queued_ids() == []
    assert recoverable(h.spool.root) == []
    assert h.spool.finished_log == [(env.qid, {A: "delivered"})]
    assert h.queue.envelopes == {}
    assert h.deliverer.dsn_calls == []  # no report for a delivery
    h.clock.advance(10_000)
    assert len(h.deliverer.calls) == 1


def test_taken_messages_are_queued_together_and_attempted_at_once(tmp_path: Path) -> None:
    h = Harness(tmp_path, {A: device(A), B: device(B, "dev2", 2526)}, all_(250))
    first = commit(h.spool, [A], BODY, h.clock.seconds())
    second = commit(h.spool, [B], BODY, h.clock.seconds())
    h.queue.take(first)
    h.queue.take(second)
    # Nothing of the queue's work runs while the client is being answered.
    assert h.queue.envelopes == {}
    assert h.deliverer.calls == []
    assert len(h.clock.getDelayedCalls()) == 1  # one wait for every message taken

    h.queue.intake()  # the MX calls it while the spool syncs

    assert h.deliverer.rcpts() == [[A], [B]]  # in the order they were taken
    assert h.spool.finished_log == [(first.qid, {A: "delivered"}), (second.qid, {B: "delivered"})]
    assert h.queue.envelopes == {}
    h.queue.intake()  # nothing more taken: nothing happens
    h.clock.advance(INTAKE_WAIT)
    assert len(h.deliverer.calls) == 2


def test_a_taken_message_is_queued_within_the_intake_wait(tmp_path: Path) -> None:
    h = Harness(tmp_path, {A: device(A)}, all_(250))
    env = commit(h.spool, [A], BODY, h.clock.seconds())
    h.queue.take(env)
    h.clock.advance(INTAKE_WAIT * 0.9)
    assert h.deliverer.calls == []
    h.clock.advance(INTAKE_WAIT * 0.1)
    assert h.deliverer.rcpts() == [[A]]
    assert h.spool.queued_ids() == []


def test_a_taken_message_that_fails_is_retried_on_the_schedule(tmp_path: Path) -> None:
    h = Harness(tmp_path, {A: device(A)}, all_(451, "4.3.0 try later"))
    env = commit(h.spool, [A], BODY, h.clock.seconds())
    h.queue.take(env)
    h.queue.intake()
    assert len(h.deliverer.calls) == 1
    assert h.queue.states[env.qid].attempts == 1
    h.clock.advance(SCHEDULE[0] - 0.5)
    assert len(h.deliverer.calls) == 1
    h.clock.advance(0.5)
    assert len(h.deliverer.calls) == 2


def test_a_message_taken_as_the_queue_stops_is_left_to_the_spool(tmp_path: Path) -> None:
    h = Harness(tmp_path, {A: device(A)}, all_(250))
    env = commit(h.spool, [A], BODY, h.clock.seconds())
    h.queue.take(env)
    h.queue.stop()
    assert h.clock.getDelayedCalls() == []
    h.clock.advance(INTAKE_WAIT)
    assert h.deliverer.calls == []
    assert h.spool.queued_ids() == [env.qid]  # the next start queues it


def test_a_message_deferred_at_once_leaves_nothing_for_the_cyclic_collector(
    tmp_path: Path,
) -> None:
    """Mail to a device that cannot be reached is deferred without a coroutine, once per
    message; what that leaves behind must be freed as it goes, not in cycles that only a
    full pass of the collector finds (each holding the frames of the whole call stack)."""
    absent = replace(device(A), connector_smtp_addr="")  # has never connected
    h = Harness(tmp_path, {A: absent})
    h.queue.route_soon = h.router.target  # answered at once, as from the edge's caches
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        env = h.accept([A])
        h.clock.advance(0)
        gc.collect()
        left = [type(o).__name__ for o in gc.garbage if isinstance(o, BaseException)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    assert h.queue.states[env.qid].last_errors == {
        A: "451 4.4.0 device dev1 has no connector address"
    }
    assert h.queue.states[env.qid].attempts == 1
    assert left == []


def test_temporary_failure_is_retried_on_the_schedule(tmp_path: Path) -> None:
    h = Harness(tmp_path, {A: device(A)}, all_(451, "4.3.0 try later"))
    env = h.accept([A])
    h.clock.advance(0)
    assert len(h.deliverer.calls) == 1

    expected = 1
    for delay in [*SCHEDULE, SCHEDULE[-1], SCHEDULE[-1]]:  # the last delay repeats
        h.clock.advance(delay - 0.5)
        assert len(h.deliverer.calls) == expected, f"attempt before {delay}s"
        h.clock.advance(0.5)
        expected += 1
        assert len(h.deliverer.calls) == expected, f"no attempt after {delay}s"

    assert h.spool.queued_ids() == [env.qid]
    assert h.spool.finished(env.qid) == set()
    assert h.spool.finished_log == []
    assert all(c.recipients == [A] for c in h.deliverer.calls)


def test_pending_deferred_holds_the_attempt(tmp_path: Path) -> None:
    h = Harness(tmp_path, {A: device(A)})
    env = h.accept([A])
    h.clock.advance(0)
    [call] = h.deliverer.calls
    h.clock.advance(10_000)  # no reply yet: no second attempt, nothing removed
    assert len(h.deliverer.calls) == 1
    assert h.spool.queued_ids() == [env.qid]

    call.result.callback({A: Outcome(250, "2.0.0 Stored")})

    assert h.spool.queued_ids() == []


def test_target_down_for_many_attempts_gets_the_message_once(tmp_path: Path) -> None:
    up = {"now": False}
    stored: list[bytes] = []

    def script(call: Call) -> Answer:
        if not up["now"]:
            return ConnectionRefusedError("connection refused")
        stored.append(call.data)
        return dict.fromkeys(call.recipients, Outcome(250, "2.0.0 Stored"))

    h = Harness(tmp_path, {A: device(A)}, script)
    env = h.accept([A])
    h.clock.advance(0)
    for _ in range(12):  # about two hours of failures
        h.clock.advance(SCHEDULE[-1])
    failures = len(h.deliverer.calls)
    assert failures >= 10
    assert h.spool.queued_ids() == [env.qid]

    up["now"] = True
    h.clock.advance(SCHEDULE[-1])
    h.clock.advance(24 * 3600)

    assert len(stored) == 1
    assert len(h.deliverer.calls) == failures + 1
    assert h.spool.queued_ids() == []


@pytest.mark.parametrize("how", ["errback", "raise"])
def test_deliverer_exception_holds_the_message_with_the_reason(tmp_path: Path, how: str) -> None:
    """An exception of the deliverer that is no network fault is a defect of ours: the
    message is held with the reason (not retried, not waited behind), until released."""
    attempts: list[int] = []

    def script(call: Call) -> Answer:
        attempts.append(1)
        if len(attempts) == 1:
            if how == "raise":
                raise RuntimeError("boom")
            return RuntimeError("boom")
        return dict.fromkeys(call.recipients, Outcome(250, "ok"))

    h = Harness(tmp_path, {A: device(A)}, script)
    env = h.accept([A])
    h.clock.advance(0)
    assert len(attempts) == 1
    entry = h.spool.entry(env.qid)
    assert entry.held and "RuntimeError: boom" in entry.held_reason
    assert h.queue.states[env.qid].last_errors[A].startswith("451 4.3.0 held")
    assert h.queue.states[env.qid].waiting_on == set()
    [found] = recoverable(tmp_path)  # the hold and its reason survive a restart
    assert found.held and found.held_reason == entry.held_reason
    h.clock.advance(10 * SCHEDULE[-1])
    assert len(attempts) == 1  # held: no attempt
    assert h.deliverer.dsn_calls == []  # a defect of ours is never a bounce
    h.spool.set_held(env.qid, False)  # released by the operator
    h.queue.schedule(env.qid, 0.0)
    h.clock.advance(0)
    assert len(attempts) == 2
    assert h.spool.queued_ids() == []


@pytest.mark.parametrize("how", ["errback", "raise"])
def test_deliverer_network_exception_is_a_temporary_failure(tmp_path: Path, how: str) -> None:
    attempts: list[int] = []

    def script(call: Call) -> Answer:
        attempts.append(1)
        if len(attempts) == 1:
            if how == "raise":
                raise ConnectionRefusedError("refused")
            return ConnectionRefusedError("refused")
        return dict.fromkeys(call.recipients, Outcome(250, "ok"))

    h = Harness(tmp_path, {A: device(A)}, script)
    env = h.accept([A])
    h.clock.advance(0)
    assert len(attempts) == 1
    assert h.spool.queued_ids() == [env.qid] and not h.spool.entry(env.qid).held
    h.clock.advance(SCHEDULE[0])
    assert len(attempts) == 2
    assert h.spool.queued_ids() == []


def test_missing_outcome_for_a_recipient_is_retried(tmp_path: Path) -> None:
    replies: list[dict[str, Outcome]] = [{A: Outcome(250, "ok")}, {B: Outcome(250, "ok")}]
    h = Harness(tmp_path, {A: device(A), B: device(B)}, lambda call: replies.pop(0))
    env = h.accept([A, B])
    h.clock.advance(0)
    assert h.spool.finished(env.qid) == {A}
    h.clock.advance(SCHEDULE[0])
    assert h.deliverer.rcpts() == [[A, B], [B]]
    assert h.spool.queued_ids() == []


def test_permanent_failure_is_final(tmp_path: Path) -> None:
    h = Harness(tmp_path, {A: device(A)}, all_(550, "5.1.1 no such mailbox"))
    env = h.accept([A])
    h.clock.advance(0)

    assert len(h.deliverer.calls) == 1
    assert h.finished_log(env.qid) == [{A: "bounced: 550 5.1.1 no such mailbox"}]
    assert h.spool.queued_ids() == []  # the message and its (delivered) DSN are gone
    assert len(h.dsns_to(SENDER)) == 1
    h.clock.advance(10 * SCHEDULE[-1])
    assert len(h.deliverer.calls) == 1
    assert len(h.deliverer.dsn_calls) == 1


def test_bounce_is_recorded_in_the_log_while_others_are_pending(tmp_path: Path) -> None:
    def script(call: Call) -> Answer:
        return {A: Outcome(552, "5.2.2 mailbox full"), B: Outcome(452, "4.2.2 try later")}

    h = Harness(tmp_path, {A: device(A), B: device(B)}, script)
    env = h.accept([A, B])
    h.clock.advance(0)

    [line] = h.done_lines(env.qid)
    assert (line["r"], line["o"]) == (A, "bounced: 552 5.2.2 mailbox full")
    assert h.spool.queued_ids() == [env.qid]
    h.clock.advance(SCHEDULE[0])
    assert h.deliverer.rcpts() == [[A, B], [B]]


def test_recipient_that_no_longer_resolves_is_bounced(tmp_path: Path) -> None:
    h = Harness(tmp_path, {A: device(A), B: device(B)}, all_(250))
    env = h.accept([A, B])
    del h.targets[B]  # the address was removed after the message was accepted

    h.clock.advance(0)

    assert h.deliverer.rcpts() == [[A]]
    [finals] = h.finished_log(env.qid)
    assert finals[A] == "delivered"
    assert finals[B].startswith("bounced: 550 5.1.1")
    assert h.spool.queued_ids() == []
    assert len(h.dsns_to(SENDER)) == 1


def test_no_resolvable_recipient_at_all_is_bounced_without_delivery(tmp_path: Path) -> None:
    h = Harness(tmp_path, {}, all_(250))
    env = h.accept([A])
    h.clock.advance(0)
    assert h.deliverer.calls == []
    assert h.finished_log(env.qid)[0][A].startswith("bounced: 550")
    assert env.qid not in h.spool.queued_ids()


def test_recipients_on_one_device_go_in_one_transaction(tmp_path: Path) -> None:
    h = Harness(tmp_path, {A: device(A, "d1"), B: device(B, "d1")}, all_(250))
    h.accept([A, B])
    h.clock.advance(0)
    assert h.deliverer.rcpts() == [[A, B]]


def test_two_devices_one_fails_only_that_one_is_retried(tmp_path: Path) -> None:
    targets = {A: device(A, "d1", 2525), B: device(B, "d2", 2526)}

    def script(call: Call) -> Answer:
        if call.target.device_id == "d1":
            n = sum(1 for c in h.deliverer.calls if c.target.device_id == "d1")
            code = 421 if n == 1 else 250
            return dict.fromkeys(call.recipients, Outcome(code, "reply"))
        return dict.fromkeys(call.recipients, Outcome(250, "Stored"))

    h = Harness(tmp_path, targets, script)
    env = h.accept([A, B])
    h.clock.advance(0)

    assert sorted(h.deliverer.rcpts()) == [[A], [B]]
    assert h.spool.finished(env.qid) == {B}
    assert [(x["r"], x["o"]) for x in h.done_lines(env.qid)] == [(B, "delivered")]
    assert h.spool.queued_ids() == [env.qid]

    h.clock.advance(SCHEDULE[0])

    assert len(h.deliverer.calls) == 3
    last = h.deliverer.calls[-1]
    assert (last.target.device_id, last.recipients) == ("d1", [A])
    assert h.spool.queued_ids() == []


def test_start_delivers_what_an_earlier_spool_left_committed(tmp_path: Path) -> None:
    before = Spool(tmp_path)
    first = commit(before, [A], b"first\r\n", 10.0)
    second = commit(before, [A, B], b"second\r\n", 20.0)
    before.mark_finished(second.qid, {A: "delivered"})  # delivered before the crash
    stray = before.writer()
    stray.write(b"never acknowledged")

    h = Harness(tmp_path, {A: device(A), B: device(B)}, all_(250))
    started = h.queue.start()
    assert started.called
    h.clock.advance(0)

    sent = sorted((c.data.split(b"\r\n", 1)[1], c.recipients) for c in h.deliverer.calls)
    assert sent == [(b"first\r\n", [A]), (b"second\r\n", [B])]
    assert h.spool.queued_ids() == []
    assert list(h.spool.tmp.iterdir()) == []
    assert list(h.spool.queue.iterdir()) == []
    assert first.qid not in h.queue.envelopes


def test_start_leaves_a_held_message_alone(tmp_path: Path) -> None:
    before = Spool(tmp_path)
    held = commit(before, [A], b"held\r\n", 10.0)
    free = commit(before, [A], b"free\r\n", 20.0)
    before.set_held(held.qid, True)

    h = Harness(tmp_path, {A: device(A)}, all_(250))
    h.queue.start()
    h.clock.advance(10 * SCHEDULE[-1])

    assert [c.data.split(b"\r\n", 1)[1] for c in h.deliverer.calls] == [b"free\r\n"]
    assert h.spool.queued_ids() == [held.qid]
    assert free.qid not in h.queue.envelopes


def test_stop_cancels_scheduled_retries(tmp_path: Path) -> None:
    h = Harness(tmp_path, {A: device(A)}, all_(451))
    env = h.accept([A])
    h.clock.advance(0)
    h.queue.stop()
    h.clock.advance(10 * SCHEDULE[-1])
    assert len(h.deliverer.calls) == 1
    assert h.spool.queued_ids() == [env.qid]  # still durable for the next start


def test_store_error_during_an_attempt_is_retried(tmp_path: Path) -> None:
    """A fault of ours (store, disk) mid-attempt reschedules instead of stalling the message."""
    h = Harness(tmp_path, {A: device(A)}, all_(250))
    broken = {"now": True}

    def resolve(address: str) -> RecipientTarget | None:
        if broken["now"]:
            raise OSError("database is locked")
        return h.targets.get(address)

    h.router.resolve = resolve
    env = h.accept([A])
    h.clock.advance(0)
    assert h.deliverer.calls == []
    assert h.spool.queued_ids() == [env.qid]
    assert h.deliverer.dsn_calls == []  # our own fault is never a bounce
    broken["now"] = False
    h.clock.advance(SCHEDULE[0] - 1)
    assert h.deliverer.calls == []  # retried on the schedule, not in a tight loop
    h.clock.advance(1)

    assert len(h.deliverer.calls) == 1
    assert env.qid not in h.spool.queued_ids()
