"""Queue operations through the HTTP API, over a real spool and queue with a fake clock."""

from __future__ import annotations

import email
import json
from pathlib import Path
from typing import Any

import pytest
from treq.testing import StubTreq
from twisted.internet import defer
from twisted.internet.task import Clock

from edge.delivery.outcomes import Outcome
from edge.delivery.queue import DeliveryQueue
from edge.delivery.queueops import QueueControl
from edge.delivery.routing import NoRoute, Target
from edge.smtp import replies
from edge.spool.spool import Envelope, Spool
from tests.fakes import Answer, Call, ScriptedDeliverer, run_sync
from webapi.v1.queue import QueueAPI


def try_later(call: Call) -> Answer:
    """Every target is temporarily unavailable (outside tailpost: a remote MTA)."""
    return dict.fromkeys(call.recipients, Outcome(451, "4.4.1 try later", "mx:25"))


def route(rcpt: str, kind: str) -> Target:
    if rcpt.endswith("@home.test"):
        return Target("device", "device:dev_1", (("127.0.0.1", 1),), device_id="dev_1")
    if kind == "dsn":
        return Target("mx", f"mx:{rcpt}", (("127.0.0.1", 1),))
    raise NoRoute(replies.D550_NO_ROUTE)


class World:
    def __init__(self, tmp_path: Path) -> None:
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.spool = Spool(tmp_path / "spool")
        self.deliverer = ScriptedDeliverer(self.clock, try_later, {"mx": try_later})
        self.queue = DeliveryQueue(
            self.spool, route, self.deliverer, self.clock, [60.0], run_blocking=run_sync
        )
        self.queue.start()
        self.api = StubTreq(QueueAPI(QueueControl(self.queue)).resource())

    def accept(self, rcpts: list[str], sender: str = "a@outside.test") -> Envelope:
        writer = self.spool.writer()
        writer.write(b"Subject: queued\r\n\r\nbody\r\n")
        env = Envelope(writer.qid, sender, rcpts, self.clock.seconds())
        self.spool.commit(writer, env)
        self.queue.enqueue(env)
        self.clock.advance(0)
        return env

    def call(self, method: str, path: str) -> tuple[int, Any]:
        url = "http://127.0.0.1/v1/queue" + ("" if path == "/" else path)
        d = self.api.request(method, url)  # type: ignore[attr-defined]
        response = self.result(d)
        body = self.result(response.content())
        return response.code, json.loads(body)

    @staticmethod
    def result(d: defer.Deferred[Any]) -> Any:
        out: list[Any] = []
        d.addBoth(out.append)
        assert out, "the request did not finish"
        if hasattr(out[0], "raiseException"):
            out[0].raiseException()
        return out[0]


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path)


def test_list_and_show(world: World) -> None:
    env = world.accept(["me@home.test", "you@home.test"])
    code, body = world.call("GET", "/")
    assert code == 200 and body["total"] == 1
    [item] = body["messages"]
    assert item["id"] == env.qid and item["state"] == "deferred" and item["attempts"] == 1
    assert item["last_errors"]["me@home.test"].startswith("451 4.4.1")
    assert item["devices"] == {"me@home.test": "dev_1", "you@home.test": "dev_1"}
    code, shown = world.call("GET", f"/{env.qid}")
    assert code == 200 and shown["pending"] == ["me@home.test", "you@home.test"]
    assert world.call("GET", "?state=held")[1]["total"] == 0
    assert world.call("GET", "?device=dev_1")[1]["total"] == 1
    assert world.call("GET", "?domain=other.test")[1]["total"] == 0
    assert world.call("GET", "?min_age=10")[1]["total"] == 0


def test_hold_release_retry(world: World) -> None:
    env = world.accept(["me@home.test"])
    code, body = world.call("POST", f"/{env.qid}/hold")
    assert code == 200 and body["state"] == "held"
    before = len(world.deliverer.calls)
    world.clock.advance(3600)
    assert len(world.deliverer.calls) == before  # held: no attempts
    code, body = world.call("POST", f"/{env.qid}/retry")
    assert code == 409 and body["code"] == "message_held"
    assert Spool(world.spool.root).load()[0].qid == env.qid
    assert world.spool.entry(env.qid).held
    code, _ = world.call("POST", f"/{env.qid}/release")
    assert code == 200
    world.clock.advance(0)
    assert len(world.deliverer.calls) == before + 1
    code, _ = world.call("POST", f"/{env.qid}/retry")
    world.clock.advance(0)
    assert code == 200 and len(world.deliverer.calls) == before + 2


def test_delete_records_outcomes_and_forgets(world: World) -> None:
    env = world.accept(["me@home.test"])
    code, body = world.call("DELETE", f"/{env.qid}")
    assert code == 200 and body["status"] == "deleted"
    assert world.call("GET", "/")[1]["total"] == 0
    assert world.spool.queued_ids() == []
    assert Spool(world.spool.root).load() == []
    assert world.call("GET", f"/{env.qid}")[0] == 404


def test_bounce_sends_a_failure_report(world: World) -> None:
    env = world.accept(["me@home.test"], sender="writer@outside.test")
    code, body = world.call("POST", f"/{env.qid}/bounce")
    assert code == 200 and body["status"] == "bounced"
    queued = world.call("GET", "/")[1]["messages"]
    [dsn] = queued
    assert dsn["kind"] == "dsn" and dsn["sender"] == "" and dsn["recipients"] == [env.sender]
    report = email.message_from_bytes(world.spool.read(dsn["id"]))
    assert report.get_content_type() == "multipart/report"
    assert "Returned to sender" in report.as_string()


def test_bad_input(world: World) -> None:
    code, body = world.call("GET", "/../../etc")
    assert code in (400, 404) and set(body) == {"error", "code", "statusCode", "action"}
    code, body = world.call("GET", "/not-a-queue-id")
    assert code == 400 and body["code"] == "invalid_queue_id"
    code, body = world.call("GET", "/0660C790C37DDB44B36CE2")
    assert code == 404 and body["code"] == "message_not_found"
    code, body = world.call("GET", "?state=bogus")
    assert code == 400
    code, body = world.call("GET", "?color=blue")
    assert code == 400
