"""A message held for a defect shows why, in the queue API (and so in `tailpost queue`)."""

from __future__ import annotations

from pathlib import Path

from edge.delivery.outcomes import Outcome
from edge.smtp import replies
from tests.fakes import Answer, Call, ScriptedDeliverer
from tests.test_queue_api import World


def broken(call: Call) -> Answer:
    """A defect for one sender's mail (a bug of ours, not the target's)."""
    if call.sender == "bad@outside.test":
        raise KeyError("a bug")
    return dict.fromkeys(call.recipients, Outcome(250, "2.0.0 Ok", "dev:25"))


def test_a_message_held_for_a_defect_shows_the_reason(tmp_path: Path) -> None:
    world = World(tmp_path)
    world.queue.deliverer = ScriptedDeliverer(world.clock, broken)
    bad = world.accept(["me@home.test"], sender="bad@outside.test")
    good = world.accept(["me@home.test"])
    code, body = world.call("GET", "/")
    assert code == 200 and [m["id"] for m in body["messages"]] == [bad.qid]  # good: gone
    [item] = body["messages"]
    assert item["state"] == "held" and item["held"]
    assert item["held_reason"].startswith("4.3.0 held after a defect in delivery: KeyError")
    # The defect's detail is the operator's; the recorded reply (what a report would
    # quote to the sender) says only that the mail system holds it.
    assert item["last_errors"]["me@home.test"] == replies.D451_HELD.status
    assert "KeyError" not in replies.D451_HELD.status
    assert good.qid not in world.spool.queued_ids()
    code, _ = world.call("POST", f"/{bad.qid}/release")
    code, shown = world.call("GET", f"/{bad.qid}")
    assert code == 200 and shown["held_reason"] == "" and not shown["held"]


def test_an_operator_hold_says_so(tmp_path: Path) -> None:
    world = World(tmp_path)
    env = world.accept(["me@home.test"])
    code, body = world.call("POST", f"/{env.qid}/hold")
    assert code == 200 and body["held_reason"] == "held by the operator"
