"""POST /localapi/v0/mail/messages/{id}/reply, Idempotency-Key on send and reply, and the
outbound events (recent, stream), through the real Klein app and the real outbound queue."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.web.server import Site

from connector.idempotency import DeviceKeys
from connector.outbound.compose import reply_subject
from maildir import MessageInfo
from tests.test_local_send import ALIAS, ALICE, BOB, CAROL, SEND, Setup
from tests.test_localapi import TOKEN, assert_error
from tests.test_localapi_stream import Raw

MESSAGES = "/localapi/v0/mail/messages"
OUT = "/localapi/v0/mail/outbound"

ORIGINAL = (
    "From: Bob Example <bob@example.net>\r\n"
    "Reply-To: Bob's Desk <desk@example.net>\r\n"
    f"To: Alice <{ALICE}>, {CAROL}, {ALIAS}\r\n"
    "Cc: dave@example.com, Alice Again <ALICE@example.test>\r\n"
    "Subject: RE: Re: Quarterly numbers\r\n"
    "Date: Fri, 03 Apr 2026 18:30:00 +0000\r\n"
    "Message-ID: <orig-3@example.net>\r\n"
    "References: <root-1@example.net> <orig-2@example.net>\r\n"
    "Content-Type: text/plain; charset=utf-8\r\n\r\nNumbers attached.\r\n"
).encode()


@pytest.fixture
def s(tmp_path: Path) -> Setup:
    return Setup(tmp_path)


def deliver(s: Setup, data: bytes = ORIGINAL, folder: str = "INBOX") -> MessageInfo:
    if folder != "INBOX" and folder not in s.maildir.list_folders():
        s.maildir.create_folder(folder)
    return s.maildir.deliver(data, folder)


def addresses(header: Any) -> list[str]:
    return [a.addr_spec for a in header.addresses] if header is not None else []


# -- reply ------------------------------------------------------------------------------------


def test_reply_goes_to_reply_to_with_thread_headers(s: Setup) -> None:
    info = deliver(s)
    reply = s.client.post(f"{MESSAGES}/{info.id}/reply", {"body_text": "Thanks!"})
    assert reply.code == 200, reply.body
    body = reply.json()
    q = s.only()
    msg = q.msg
    assert addresses(msg["To"]) == ["desk@example.net"]
    assert msg["Cc"] is None
    assert msg["Subject"] == "Re: Quarterly numbers"
    assert msg["In-Reply-To"] == "<orig-3@example.net>"
    assert msg["References"] == "<root-1@example.net> <orig-2@example.net> <orig-3@example.net>"
    assert msg["Message-ID"] == body["message_id"]
    assert msg.get_content().strip() == "Thanks!"
    assert q.envelope["sender"] == ALICE  # the address the original was sent to
    assert q.envelope["recipients"] == ["desk@example.net"]


def test_reply_all_adds_to_and_cc_less_own_addresses(s: Setup) -> None:
    info = deliver(s)
    reply = s.client.post(
        f"{MESSAGES}/{info.id}/reply",
        {"body_text": "All", "body_html": "<p>All</p>", "reply_all": True},
    )
    assert reply.code == 200, reply.body
    q = s.only()
    assert addresses(q.msg["To"]) == ["desk@example.net"]
    assert addresses(q.msg["Cc"]) == [CAROL, "dave@example.com"]
    assert q.envelope["recipients"] == ["desk@example.net", CAROL, "dave@example.com"]
    assert q.msg.get_content_type() == "multipart/alternative"


def test_reply_without_reply_to_goes_to_from_and_carries_attachments(s: Setup) -> None:
    data = ORIGINAL.replace(b"Reply-To: Bob's Desk <desk@example.net>\r\n", b"")
    data = data.replace(b"References: <root-1@example.net> <orig-2@example.net>\r\n", b"")
    info = deliver(s, data)
    attachment = {"filename": "n.csv", "content_type": "text/csv", "content_base64": "YSxi"}
    reply = s.client.post(
        f"{MESSAGES}/{info.id}/reply", {"body_text": "x", "attachments": [attachment]}
    )
    assert reply.code == 200, reply.body
    msg = s.only().msg
    assert addresses(msg["To"]) == [BOB]
    assert msg["References"] == "<orig-3@example.net>"
    assert [a.get_content() for a in msg.iter_attachments()] == ["a,b"]


def test_reply_to_our_own_message_goes_to_its_recipients(s: Setup) -> None:
    own = (
        f"From: {ALIAS}\r\nTo: {BOB}\r\nSubject: hello\r\nMessage-ID: <o@example.test>\r\n\r\nx\r\n"
    ).encode()
    info = deliver(s, own, "Sent")
    reply = s.client.post(f"{MESSAGES}/{info.id}/reply?mailbox=Sent", {"body_text": "again"})
    assert reply.code == 200, reply.body
    q = s.only()
    assert addresses(q.msg["To"]) == [BOB] and q.msg["Subject"] == "Re: hello"
    assert q.envelope["sender"] == ALICE  # not sent to us: the default address


def test_reply_to_a_note_to_ourselves_goes_to_ourselves(s: Setup) -> None:
    note = (
        f"From: {ALICE}\r\nTo: {ALICE}\r\nSubject: note\r\nMessage-ID: <n@example.test>\r\n\r\nx\r\n"
    ).encode()
    info = deliver(s, note)
    reply = s.client.post(f"{MESSAGES}/{info.id}/reply", {"body_text": "noted", "reply_all": True})
    assert reply.code == 200, reply.body
    q = s.only()
    assert addresses(q.msg["To"]) == [ALICE] and q.msg["Cc"] is None
    assert q.envelope["sender"] == ALICE


def test_reply_by_message_id_and_in_another_mailbox(s: Setup) -> None:
    deliver(s, folder="Archive")
    ref = "%3Corig-3%40example.net%3E"
    assert_error(
        s.client.post(f"{MESSAGES}/{ref}/reply", {"body_text": "x"}), 404, "message_not_found"
    )
    reply = s.client.post(f"{MESSAGES}/{ref}/reply?mailbox=Archive", {"body_text": "x"})
    assert reply.code == 200, reply.body


def test_reply_errors(s: Setup) -> None:
    info = deliver(s)
    url = f"{MESSAGES}/{info.id}/reply"
    assert_error(
        s.client.post(f"{MESSAGES}/1.2.nohost/reply", {"body_text": "x"}), 404, "message_not_found"
    )
    assert_error(
        s.client.post(f"{MESSAGES}/../reply", {"body_text": "x"}), 400, "invalid_message_id"
    )
    assert_error(s.client.post(f"{url}?mailbox=Nope", {"body_text": "x"}), 404, "mailbox_not_found")
    assert_error(s.client.post(url, {"reply_all": True}), 400, "body_required")
    assert_error(s.client.post(url, {"body_text": "x", "to": BOB}), 400, "invalid_parameter")
    assert_error(
        s.client.post(url, {"body_text": "x", "reply_all": "yes"}), 400, "invalid_parameter"
    )
    assert_error(s.client.get(url), 405, "method_not_allowed")
    nobody = deliver(s, b"Subject: orphan\r\n\r\nno addresses\r\n")
    reply = s.client.post(f"{MESSAGES}/{nobody.id}/reply", {"body_text": "x"})
    assert_error(reply, 422, "no_reply_recipient")
    assert s.queued() == []


def test_reply_subject() -> None:
    assert reply_subject("Hello") == "Re: Hello"
    assert reply_subject("Re: Hello") == "Re: Hello"
    assert reply_subject("RE: re:Hello") == "Re: Hello"
    assert reply_subject("Re[2]: Hello") == "Re: Hello"
    assert reply_subject("") == "Re:"
    assert reply_subject("Regarding x") == "Re: Regarding x"


# -- Idempotency-Key --------------------------------------------------------------------------


def test_same_key_twice_sends_once(s: Setup) -> None:
    body = {"to": BOB, "body_text": "once"}
    headers = {"Idempotency-Key": "send-1"}
    first = s.client.post(SEND, body, extra=headers)
    second = s.client.post(SEND, body, extra=headers)
    assert first.code == second.code == 200
    assert first.json() == second.json()
    assert second.header("Idempotent-Replayed") == "true"
    assert len(s.queued()) == 1
    # Another key is another message.
    assert s.client.post(SEND, body, extra={"Idempotency-Key": "send-2"}).code == 200
    assert len(s.queued()) == 2


def test_same_key_other_body_or_path_is_409(s: Setup) -> None:
    headers = {"Idempotency-Key": "k"}
    assert s.client.post(SEND, {"to": BOB, "body_text": "a"}, extra=headers).code == 200
    reply = s.client.post(SEND, {"to": BOB, "body_text": "b"}, extra=headers)
    assert_error(reply, 409, "idempotency_key_reuse")
    info = deliver(s)
    reply = s.client.post(f"{MESSAGES}/{info.id}/reply", {"body_text": "a"}, extra=headers)
    assert_error(reply, 409, "idempotency_key_reuse")
    assert len(s.queued()) == 1


def test_bad_keys_are_refused(s: Setup) -> None:
    for key in ("", "a b", "x" * 256):
        reply = s.client.post(SEND, {"to": BOB, "body_text": "a"}, extra={"Idempotency-Key": key})
        assert_error(reply, 400, "invalid_idempotency_key")
    assert s.queued() == []


def test_an_error_answer_is_replayed_too(s: Setup) -> None:
    headers = {"Idempotency-Key": "bad"}
    body = {"from": "ceo@example.test", "to": BOB, "body_text": "x"}
    assert_error(s.client.post(SEND, body, extra=headers), 403, "sender_not_owned")
    replay = s.client.post(SEND, body, extra=headers)
    assert_error(replay, 403, "sender_not_owned")
    assert replay.header("Idempotent-Replayed") == "true"


def test_keys_survive_a_restart(tmp_path: Path) -> None:
    s = Setup(tmp_path)
    info = deliver(s)
    headers = {"Idempotency-Key": "reply-1"}
    url = f"{MESSAGES}/{info.id}/reply"
    first = s.client.post(url, {"body_text": "once"}, extra=headers)
    assert first.code == 200
    s.keys.close()
    again = Setup(tmp_path)  # a new process: new queue, key store and app over the same files
    replay = again.client.post(url, {"body_text": "once"}, extra=headers)
    assert replay.code == 200 and replay.json() == first.json()
    assert replay.header("Idempotent-Replayed") == "true"
    assert len(again.queued()) == 1


def test_an_unfinished_claim_is_released_at_start(tmp_path: Path) -> None:
    path = tmp_path / "keys.sqlite3"
    keys = DeviceKeys(path, lambda: 100.0)
    assert keys.claim_idempotency_key("s", "k", "POST", "/p", "h", 60).state == "new"
    assert keys.claim_idempotency_key("s", "k", "POST", "/p", "h", 60).state == "in_progress"
    keys.close()
    keys = DeviceKeys(path, lambda: 100.0)
    assert keys.claim_idempotency_key("s", "k", "POST", "/p", "h", 60).state == "new"
    keys.finish_idempotency_key("s", "k", 200, "{}")
    assert keys.claim_idempotency_key("s", "k", "POST", "/p", "h", 60).state == "replay"
    expired = DeviceKeys(path, lambda: 1000.0)
    assert expired.claim_idempotency_key("s", "k", "POST", "/p", "h2", 60).state == "new"


# -- outbound events --------------------------------------------------------------------------


def test_outbound_recent(s: Setup) -> None:
    sent = [
        s.client.post(SEND, {"to": BOB, "subject": f"n{i}", "body_text": "x"}).json()
        for i in range(3)
    ]
    events = s.client.get(f"{OUT}/recent").json()["events"]
    assert [e["subject"] for e in events] == ["n2", "n1", "n0"]
    first = events[-1]
    assert first["direction"] == "outbound" and first["status"] == "submitted"
    assert first["proxy_message_id"] == sent[0]["proxy_message_id"]
    assert first["internet_message_id"] == sent[0]["message_id"]
    assert first["recipients"] == [BOB] and first["from"] == ALICE
    limited = s.client.get(f"{OUT}/recent?limit=1").json()["events"]
    assert [e["subject"] for e in limited] == ["n2"]
    after = s.client.get(f"{OUT}/recent?after={first['event_id']}&limit=1").json()["events"]
    assert [e["subject"] for e in after] == ["n1"]
    from webapi.local import openapi as o

    o.OutboundEventListBody.model_validate(s.client.get(f"{OUT}/recent").json())
    o.Sent.model_validate(sent[0])
    for bad in ("limit=0", "limit=x", "after=-1", "nope=1"):
        assert_error(s.client.get(f"{OUT}/recent?{bad}"), 400, "invalid_parameter")


def test_outbound_stream(in_reactor: Any, tmp_path: Path) -> None:
    s = Setup(tmp_path)
    s.api.clock = Clock()  # pings never come by themselves
    http = in_reactor(in_reactor.reactor.listenTCP, 0, Site(s.api.resource()), 50, "127.0.0.1")
    try:
        port = http.getHost().port

        def submit(subject: str) -> defer.Deferred[Any]:
            return s.queue.submit(
                ALICE, [BOB], f"Subject: {subject}\r\n\r\nx\r\n".encode(), source="t"
            )

        in_reactor(submit, "before")
        stream = Raw(port, f"{OUT}/stream")
        assert stream.status == 200 and "text/event-stream" in stream.headers
        in_reactor(submit, "live")
        event_id, event = stream.event()
        assert event["subject"] == "live" and event["direction"] == "outbound"
        stream.close()
        # Resuming with Last-Event-ID gets what came since, in order.
        in_reactor(submit, "missed")
        again = Raw(port, f"{OUT}/stream", {"Last-Event-ID": str(event_id - 1)})
        assert [again.event()[1]["subject"] for _ in range(2)] == ["live", "missed"]
        again.close()
    finally:
        in_reactor(http.stopListening)


def test_send_answers_only_after_submit_fired(tmp_path: Path) -> None:
    """With the queue's disk work held back, the request has no answer yet."""
    held: list[tuple[defer.Deferred[Any], Any, tuple[Any, ...]]] = []

    def later(fn: Any, *args: Any) -> defer.Deferred[Any]:
        d: defer.Deferred[Any] = defer.Deferred()
        held.append((d, fn, args))
        return d

    s = Setup(tmp_path)
    s.queue.run = later
    d = s.client.stub.request(
        "POST",
        f"http://127.0.0.1:18080{SEND}",
        headers={
            "Host": "127.0.0.1:18080",
            "Authorization": f"Bearer {TOKEN}",
            "Content-Type": "application/json",
        },
        data=json.dumps({"to": BOB, "body_text": "x"}).encode(),
    )
    s.client.stub.flush()
    answered: list[Any] = []
    d.addCallback(answered.append)
    assert held and not answered and s.queued() == []
    waiting, fn, args = held.pop()
    waiting.callback(fn(*args))  # the disk work runs; submit fires
    s.client.stub.flush()
    assert answered and answered[0].code == 200 and len(s.queued()) == 1
