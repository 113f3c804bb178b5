"""The loopback API's changes and device endpoints: mark, delete, spam and ham reports, spam
rules through the edge, status, enable/disable, client settings and recent events."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock

from connector.events import EventLog, InboundEvents
from connector.mailservice import LinkState, MailService
from maildir import Maildir, MessageInfo
from tests.test_localapi import BASE, MESSAGES, RICH, TOKEN, Client, assert_error, plain, run_now
from webapi.local.app import LocalAPI
from webapi.local.device import DeviceInfo

MAIL = "/localapi/v0/mail"
SPAM = plain(
    "cheap pills", sender="Spammer <Spam@Bad.Example>", extra="X-Tailpost-Queue-ID: q9\r\n"
)


class FakeEdge:
    """Stands in for the edge's /v1 API (outside the device): records calls, answers."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, Any]] = []
        self.replies: dict[tuple[str, str], tuple[int, Any]] = {}
        self.down = False

    def request(self, method: str, path: str, json: Any = None) -> defer.Deferred[tuple[int, Any]]:
        self.calls.append((method, path, json))
        if self.down:
            return defer.fail(ConnectionRefusedError("edge down"))
        default = (201, {"id": "rule_1", **(json or {})}) if method == "POST" else (200, {})
        return defer.succeed(self.replies.get((method, path), default))


class FakeTrainer:
    def __init__(self, result: bool = True) -> None:
        self.result = result
        self.learned: list[tuple[str, bytes]] = []

    async def learn(self, kind: str, data: bytes) -> bool:
        self.learned.append((kind, data))
        return self.result


class Setup:
    def __init__(self, tmp_path: Path, **kwargs: Any) -> None:
        self.maildir = Maildir(tmp_path / "Maildir", hostname="testhost")
        self.clock = Clock()
        self.clock.advance(1_775_243_544)
        self.events = InboundEvents(
            EventLog(tmp_path / "events.jsonl", self.clock.seconds), self.maildir, run_now
        )
        self.service = MailService(tmp_path / "mail-state.json", [], run_now)
        self.link = LinkState(self.clock.seconds)
        self.edge = FakeEdge()
        self.changed: list[tuple[str, ...]] = []
        self.device = DeviceInfo(
            "box.example",
            device_id="dev_1",
            addresses=["alice@example.com"],
            imap_addr="127.0.0.1:1143",
            submission_addr="127.0.0.1:1587",
            maildir_root=str(self.maildir.root),
            imap_password={"alice@example.com": "imap-pw"}.get,
        )
        options: dict[str, Any] = dict(
            base_url=BASE,
            run_blocking=run_now,
            events=self.events,
            mail_service=self.service,
            link=self.link,
            device=self.device,
            edge=self.edge,
            clock=self.clock,
            on_change=lambda folders: self.changed.append(tuple(folders)),
        )
        options.update(kwargs)
        self.api = LocalAPI(self.maildir, TOKEN, **options)
        self.client = Client(self.api)

    def deliver(self, data: bytes, folder: str = "INBOX") -> MessageInfo:
        info = self.maildir.deliver(data, folder)
        self.events.delivered(info)
        return info


@pytest.fixture
def s(tmp_path: Path) -> Setup:
    return Setup(tmp_path)


# -- mark --------------------------------------------------------------------------------------


def test_mark_read_and_unread(s: Setup) -> None:
    info = s.deliver(RICH)
    reply = s.client.post(f"{MESSAGES}/{info.id}/mark", {"read": True})
    assert reply.code == 200
    assert reply.json() == {"status": "ok", "id": info.id, "mailbox": "INBOX", "flags": ["\\Seen"]}
    assert s.maildir.folder("INBOX").get(info.id).flags == {"\\Seen"}
    assert s.changed == [("INBOX",)]
    assert s.client.post(f"{MESSAGES}/{info.id}/mark", {"read": False}).json()["flags"] == []
    assert s.maildir.folder("INBOX").get(info.id).flags == frozenset()


def test_mark_keeps_other_flags_and_accepts_aliases(s: Setup) -> None:
    info = s.maildir.deliver(RICH, flags=["\\Flagged"])
    reply = s.client.post(f"{MESSAGES}/msg_01KNA97WGYC1ATSWR92GZW40CN/mark", {"read": True})
    assert reply.json()["flags"] == ["\\Flagged", "\\Seen"]
    assert reply.json()["id"] == info.id


@pytest.mark.parametrize(
    "body",
    [b"", b"not json", b"[]", b'{"read": "yes"}', b'{"read": 1}', b'{"read": true, "x": 1}', b"{}"],
)
def test_mark_bad_bodies(s: Setup, body: bytes) -> None:
    info = s.deliver(RICH)
    reply = s.client.post(f"{MESSAGES}/{info.id}/mark", body)
    assert reply.code == 400, reply.body
    assert reply.json()["code"] in ("invalid_json", "invalid_parameter")
    assert s.maildir.folder("INBOX").get(info.id).flags == frozenset()


def test_mark_errors(s: Setup) -> None:
    assert_error(
        s.client.post(f"{MESSAGES}/1.M1P1.nohost/mark", {"read": True}), 404, "message_not_found"
    )
    assert_error(
        s.client.post(f"{MESSAGES}/..%2Fx/mark", {"read": True}), 400, "invalid_message_id"
    )
    info = s.deliver(RICH)
    reply = s.client.post(f"{MESSAGES}/{info.id}/mark?mailbox=Nope", {"read": True})
    assert_error(reply, 404, "mailbox_not_found")
    assert_error(s.client.request("GET", f"{MESSAGES}/{info.id}/mark"), 405, "method_not_allowed")


# -- delete ------------------------------------------------------------------------------------


def test_delete_moves_to_trash_then_removes(s: Setup) -> None:
    info = s.deliver(RICH)
    reply = s.client.delete(f"{MESSAGES}/{info.id}")
    assert reply.json() == {
        "status": "ok",
        "message": "Message moved to Trash.",
        "id": info.id,
        "mailbox": "Trash",
    }
    assert s.maildir.folder("INBOX").messages() == []
    assert [m.id for m in s.maildir.folder("Trash").messages()] == [info.id]
    assert s.changed == [("INBOX", "Trash")]
    assert_error(s.client.delete(f"{MESSAGES}/{info.id}"), 404, "message_not_found")
    reply = s.client.delete(f"{MESSAGES}/{info.id}?mailbox=Trash")
    assert reply.json() == {"status": "ok", "message": "Message deleted.", "id": info.id}
    assert s.maildir.folder("Trash").messages() == []


def test_delete_recreates_a_missing_trash(s: Setup) -> None:
    s.maildir.delete_folder("Trash")
    info = s.deliver(RICH)
    assert s.client.delete(f"{MESSAGES}/{info.id}").json()["mailbox"] == "Trash"
    assert [m.id for m in s.maildir.folder("Trash").messages()] == [info.id]


def test_delete_bad_ids(s: Setup) -> None:
    s.deliver(RICH)
    for ref in ("..%2F..%2Fetc", "%00", "a..b"):
        assert_error(s.client.delete(f"{MESSAGES}/{ref}"), 400, "invalid_message_id")
    assert len(s.maildir.folder("INBOX").messages()) == 1


# -- spam and ham ------------------------------------------------------------------------------


def test_report_spam_moves_blocks_sender_and_trains(tmp_path: Path) -> None:
    trainer = FakeTrainer()
    s = Setup(tmp_path, trainer=trainer)
    info = s.deliver(SPAM)
    reply = s.client.post(f"{MESSAGES}/{info.id}/report-spam")
    body = reply.json()
    assert reply.code == 200
    assert body["status"] == "ok" and body["warnings"] == []
    assert body["mailbox"] == "Junk" and body["id"] == info.id
    assert body["trained"] is True
    assert [m.id for m in s.maildir.folder("Junk").messages()] == [info.id]
    assert s.maildir.folder("INBOX").messages() == []
    rule = {
        "kind": "sender",
        "value": "spam@bad.example",
        "action": "reject",
        "note": "reported as spam on the device",
        "source_message_ids": ["q9"],
    }
    assert s.edge.calls == [("POST", "/v1/mail/spam-rules", rule)]
    assert body["rule"] == {"id": "rule_1", **rule}
    assert trainer.learned == [("spam", SPAM)]
    assert ("INBOX", "Junk") in s.changed
    assert s.link.status == "online"


@pytest.mark.parametrize("how", ["body", "query"])
def test_report_spam_block_domain(s: Setup, how: str) -> None:
    # The edge authenticated the From domain (see tests/test_report_spam_domains.py).
    info = s.deliver(
        b"Authentication-Results: mx.test; dmarc=pass header.from=bad.example\r\n"
        b"X-Tailpost-Verdict: action=accept; dmarc=pass\r\n" + SPAM
    )
    if how == "body":
        reply = s.client.post(f"{MESSAGES}/{info.id}/report-spam", {"block_domain": True})
    else:
        reply = s.client.post(f"{MESSAGES}/{info.id}/report-spam?block_domain=true")
    assert reply.json()["rule"]["kind"] == "domain"
    assert s.edge.calls[0][2]["value"] == "bad.example"
    assert reply.json()["trained"] is None  # no Rspamd configured


def test_report_spam_with_the_edge_down_still_moves(s: Setup) -> None:
    s.edge.down = True
    info = s.deliver(SPAM)
    body = s.client.post(f"{MESSAGES}/{info.id}/report-spam").json()
    assert body["status"] == "partial" and body["rule"] is None
    assert "edge could not be reached" in body["warnings"][0]
    assert [m.id for m in s.maildir.folder("Junk").messages()] == [info.id]


def test_report_spam_edge_refuses_or_absent(tmp_path: Path) -> None:
    s = Setup(tmp_path)
    s.edge.replies[("POST", "/v1/mail/spam-rules")] = (403, {"error": "no"})
    info = s.deliver(SPAM)
    body = s.client.post(f"{MESSAGES}/{info.id}/report-spam").json()
    assert body["status"] == "partial" and "HTTP 403" in body["warnings"][0]

    alone = Setup(tmp_path / "alone", edge=None, trainer=FakeTrainer(result=False))
    info = alone.deliver(plain("no from", sender=""))
    body = alone.client.post(f"{MESSAGES}/{info.id}/report-spam").json()
    assert body["mailbox"] == "Junk" and body["trained"] is False
    assert len(body["warnings"]) == 2  # no From address; Rspamd failed


def test_report_spam_errors(s: Setup) -> None:
    info = s.deliver(SPAM)
    url = f"{MESSAGES}/{info.id}/report-spam"
    assert_error(s.client.post(url, {"block_domain": "yes"}), 400, "invalid_parameter")
    assert_error(s.client.post(url, {"other": 1}), 400, "invalid_parameter")
    assert_error(s.client.post(url, b"{"), 400, "invalid_json")
    assert_error(s.client.post(f"{url}?block_domain=maybe"), 400, "invalid_parameter")
    assert_error(s.client.post(f"{MESSAGES}/1.M1P1.x/report-spam"), 404, "message_not_found")
    assert s.edge.calls == [] and len(s.maildir.folder("INBOX").messages()) == 1


def test_report_ham_moves_back_and_trains(tmp_path: Path) -> None:
    trainer = FakeTrainer()
    s = Setup(tmp_path, trainer=trainer)
    info = s.deliver(SPAM, "Junk")
    reply = s.client.post(f"{MESSAGES}/{info.id}/report-ham")
    assert reply.json() == {
        "status": "ok",
        "id": info.id,
        "mailbox": "INBOX",
        "trained": True,
        "warnings": [],
    }
    assert [m.id for m in s.maildir.folder("INBOX").messages()] == [info.id]
    assert trainer.learned == [("ham", SPAM)]
    # already in INBOX: found there, stays there, trained again
    assert s.client.post(f"{MESSAGES}/{info.id}/report-ham").json()["mailbox"] == "INBOX"
    # an explicit mailbox is the only place looked in
    reply = s.client.post(f"{MESSAGES}/{info.id}/report-ham?mailbox=Junk")
    assert_error(reply, 404, "message_not_found")


# -- spam rules through the edge ---------------------------------------------------------------


def test_spam_rules_pass_through(s: Setup) -> None:
    listing = {"rules": [{"id": "rule_1", "kind": "sender", "value": "a@b.example"}]}
    s.edge.replies[("GET", "/v1/mail/spam-rules")] = (200, listing)
    assert s.client.get(f"{MAIL}/spam-rules").json() == listing
    s.edge.replies[("DELETE", "/v1/mail/spam-rules/rule_1")] = (200, {"status": "ok"})
    assert s.client.delete(f"{MAIL}/spam-rules/rule_1").json() == {"status": "ok"}
    missing = {"error": "no such rule", "code": "not_found", "statusCode": 404, "action": "x"}
    s.edge.replies[("DELETE", "/v1/mail/spam-rules/rule_2")] = (404, missing)
    assert_error(s.client.delete(f"{MAIL}/spam-rules/rule_2"), 404, "not_found")
    assert_error(s.client.delete(f"{MAIL}/spam-rules/..%2Fx"), 400, "invalid_rule_id")
    assert_error(s.client.delete(f"{MAIL}/spam-rules/a%20b"), 400, "invalid_rule_id")


def test_spam_rules_without_edge(tmp_path: Path) -> None:
    s = Setup(tmp_path, edge=None)
    assert_error(s.client.get(f"{MAIL}/spam-rules"), 503, "edge_not_configured")
    down = Setup(tmp_path / "down")
    down.edge.down = True
    assert_error(down.client.get(f"{MAIL}/spam-rules"), 502, "edge_unavailable")


# -- status, enable/disable, client settings ---------------------------------------------------


def test_status(s: Setup) -> None:
    body = s.client.get("/localapi/v0/status").json()
    assert body["device"]["hostname"] == "box.example"
    assert body["device"]["device_id"] == "dev_1"
    assert body["connector"] == {"status": "unknown", "last_seen": None, "edge_url": ""}
    assert body["mail"] == {
        "status": "enabled",
        "imap_addr": "127.0.0.1:1143",
        "smtp_submission_addr": "127.0.0.1:1587",
        "maildir_root": str(s.maildir.root),
    }
    assert body["addresses"] == ["alice@example.com"]
    s.link.touch()  # what a delivery from the edge does
    body = s.client.get("/localapi/v0/status").json()
    assert body["connector"]["status"] == "online"
    assert body["connector"]["last_seen"] == "2026-04-03T19:12:24Z"
    assert_error(s.client.get("/localapi/v0/status?x=1"), 400, "invalid_parameter")


def test_enable_disable(s: Setup) -> None:
    reply = s.client.post(f"{MAIL}/disable")
    assert reply.json()["status"] == "ok" and reply.json()["mail"] == "disabled"
    assert s.client.get("/localapi/v0/status").json()["mail"]["status"] == "disabled"
    assert_error(s.client.get(f"{MAIL}/client-config"), 409, "mail_disabled")
    assert_error(s.client.get(f"{MAIL}/autoconfig.xml"), 409, "mail_disabled")
    info = s.deliver(RICH)  # the Maildir itself stays readable
    assert s.client.get(f"{MESSAGES}/{info.id}").code == 200
    assert s.client.post(f"{MAIL}/enable").json()["mail"] == "enabled"
    assert s.client.get(f"{MAIL}/client-config").code == 200
    assert_error(s.client.get(f"{MAIL}/enable"), 405, "method_not_allowed")


def test_enable_without_a_mail_service(tmp_path: Path) -> None:
    s = Setup(tmp_path, mail_service=None)
    assert_error(s.client.post(f"{MAIL}/enable"), 501, "not_supported")


def test_client_config(s: Setup) -> None:
    body = s.client.get(f"{MAIL}/client-config").json()
    assert body["account_name"] == "alice@example.com"
    assert body["imap"] == {
        "host": "127.0.0.1",
        "port": 1143,
        "security": "none",
        "auth_method": "password",
        "username": "alice@example.com",
        "password": "imap-pw",
    }
    assert body["smtp"] == {
        "host": "127.0.0.1",
        "port": 1587,
        "security": "none",
        "auth_method": "password",
        "auth_mechanisms": ["PLAIN", "LOGIN"],
        "username": "alice@example.com",
        "password": "imap-pw",
    }
    s.device.submission_starttls = True
    assert s.client.get(f"{MAIL}/client-config").json()["smtp"]["security"] == "starttls"
    assert body["identity"] == {"email": "alice@example.com", "display_name": ""}
    assert body["autoconfig_url"] == f"{BASE}/localapi/v0/mail/autoconfig.xml"
    same = s.client.get(f"{MAIL}/client-config?address=ALICE@example.com").json()
    assert same["account_name"] == "alice@example.com"
    reply = s.client.get(f"{MAIL}/client-config?address=bob@example.com")
    assert_error(reply, 404, "address_not_assigned")
    assert_error(s.client.get(f"{MAIL}/client-config?address=nope"), 400, "invalid_parameter")


def test_client_config_needs_an_address_choice(tmp_path: Path) -> None:
    s = Setup(tmp_path)
    s.device.addresses = ["a@example.com", "b@example.com"]
    assert_error(s.client.get(f"{MAIL}/client-config"), 400, "address_required")
    body = s.client.get(f"{MAIL}/client-config?address=b@example.com").json()
    assert body["account_name"] == "b@example.com"
    s.device.addresses = []
    assert_error(s.client.get(f"{MAIL}/client-config"), 409, "no_addresses")
    s.device.addresses = ["a@example.com"]
    s.device.submission_addr = ""
    assert s.client.get(f"{MAIL}/client-config").json()["smtp"] is None


def test_autoconfig_xml(s: Setup) -> None:
    reply = s.client.get(f"{MAIL}/autoconfig.xml?emailaddress=alice@example.com")
    assert reply.code == 200
    assert reply.header("Content-Type") == "application/xml; charset=utf-8"
    root = ET.fromstring(reply.body)
    assert root.tag == "clientConfig" and root.get("version") == "1.1"
    provider = root.find("emailProvider")
    assert provider is not None
    assert [d.text for d in provider.findall("domain")] == ["example.com"]
    incoming = provider.find("incomingServer")
    assert incoming is not None and incoming.get("type") == "imap"
    assert incoming.findtext("hostname") == "127.0.0.1" and incoming.findtext("port") == "1143"
    assert incoming.findtext("username") == "%EMAILADDRESS%"
    outgoing = provider.find("outgoingServer")
    assert outgoing is not None and outgoing.findtext("port") == "1587"
    assert outgoing.get("type") == "smtp" and outgoing.findtext("socketType") == "plain"
    s.device.submission_starttls = True
    root = ET.fromstring(s.client.get(f"{MAIL}/autoconfig.xml?emailaddress=alice@example.com").body)
    outgoing = root.find("emailProvider/outgoingServer")
    assert outgoing is not None
    assert outgoing.findtext("socketType") == "STARTTLS"
    assert outgoing.findtext("username") == "%EMAILADDRESS%"
    assert outgoing.findtext("authentication") == "password-cleartext"
    assert outgoing.findtext("hostname") == "127.0.0.1"
    assert b"imap-pw" not in reply.body
    assert_error(
        s.client.get(f"{MAIL}/autoconfig.xml?address=x@y.example"), 404, "address_not_assigned"
    )


# -- recent events -----------------------------------------------------------------------------


def test_recent_events(s: Setup) -> None:
    s.maildir.create_folder("Work")
    first = s.deliver(RICH)
    second = s.deliver(plain("second"), "Work")
    body = s.client.get(f"{MAIL}/recent").json()
    events = body["events"]
    assert [e["mailbox_id"] for e in events] == [second.id, first.id]
    newest = events[0]
    assert newest["mailbox"] == "Work" and newest["subject"] == "second"
    assert newest["event_id"] == 2 and newest["direction"] == "inbound"
    assert newest["status"] == "accepted"
    assert newest["received_at"] == "2026-04-03T19:12:24Z"
    assert newest["message_url"] == f"{BASE}{MESSAGES}/{second.id}?mailbox=Work"
    assert newest["reply_url"] == f"{BASE}{MESSAGES}/{second.id}/reply?mailbox=Work"
    assert newest["delete_url"] == newest["message_url"]
    assert newest["mark_url"] == f"{BASE}{MESSAGES}/{second.id}/mark?mailbox=Work"
    oldest = events[1]
    assert oldest["proxy_message_id"] == "msg_01KNA97WGYC1ATSWR92GZW40CN"
    assert oldest["internet_message_id"] == "<rich/1@example.com>"
    assert oldest["recipients"] == ["agent@example.net", "boss@example.net"]
    assert oldest["from"] == "Jane Doe <jane@example.com>"
    assert oldest["message_url"] == f"{BASE}{MESSAGES}/{first.id}"
    # the URLs answer
    assert s.client.get(oldest["message_url"].removeprefix(BASE)).json()["id"] == first.id
    assert len(s.client.get(f"{MAIL}/recent?limit=1").json()["events"]) == 1
    for bad in ("limit=0", "limit=x", "limit=-1", "other=1"):
        assert_error(s.client.get(f"{MAIL}/recent?{bad}"), 400, "invalid_parameter")


def test_recent_follows_the_real_address(s: Setup) -> None:
    info = s.deliver(RICH)
    s.api.base_url = "http://127.0.0.1:40404/"
    event = s.client.get(f"{MAIL}/recent").json()["events"][0]
    assert event["message_url"] == f"http://127.0.0.1:40404{MESSAGES}/{info.id}"


def test_no_event_log(tmp_path: Path) -> None:
    s = Setup(tmp_path, events=None)
    assert_error(s.client.get(f"{MAIL}/recent"), 501, "not_supported")
    assert_error(s.client.get(f"{MAIL}/stream"), 501, "not_supported")


def test_new_routes_need_token_and_loopback(s: Setup) -> None:
    info = s.deliver(RICH)
    for method, path in [
        ("GET", "/localapi/v0/status"),
        ("POST", f"{MAIL}/disable"),
        ("GET", f"{MAIL}/recent"),
        ("GET", f"{MAIL}/stream"),
        ("POST", f"{MESSAGES}/{info.id}/mark"),
        ("DELETE", f"{MESSAGES}/{info.id}"),
        ("POST", f"{MESSAGES}/{info.id}/report-spam"),
        ("GET", f"{MAIL}/spam-rules"),
    ]:
        assert_error(s.client.request(method, path, token=None), 401, "auth_missing_token")
        assert_error(s.client.request(method, path, token="bad"), 401, "auth_invalid_token")
        reply = s.client.request(method, path, host="attacker.example")
        assert_error(reply, 403, "forbidden_host")
    assert s.service.enabled and s.edge.calls == []
    assert len(s.maildir.folder("INBOX").messages()) == 1


# -- risk from the edge's verdict --------------------------------------------------------------


def test_risk_uses_the_edges_verdict(s: Setup) -> None:
    data = (
        b"X-Tailpost-Verdict: action=tag; spf=fail; dkim=pass; dmarc=pass; spam=Yes;\r\n"
        b" score=7.4; spam-action=add header; symbols=PHISHING\r\n"
        b"Authentication-Results: forged.example; spf=pass; dkim=pass; dmarc=pass\r\n"
        + plain("verdict")
    )
    info = s.deliver(data)
    risk = s.client.get(f"{MESSAGES}/{info.id}").json()["risk"]
    assert risk["method"] == "header+heuristic"
    assert risk["level"] == "medium"
    assert risk["authentication"] == {"spf": "fail", "dkim": "pass", "dmarc": "pass"}
    assert risk["spam"] == {
        "verdict": "Yes",
        "score": "7.4",
        "action": "add header",
        "symbols": ["PHISHING"],
    }
    assert "spf fail" in risk["reasons"]


def test_risk_of_junk_without_spam_scan(s: Setup) -> None:
    data = b"X-Tailpost-Verdict: action=junk; reason=dmarc.quarantine; dmarc=fail\r\n" + plain("j")
    risk = s.client.get(f"{MESSAGES}/{s.deliver(data).id}").json()["risk"]
    assert risk["level"] == "medium" and "spam" not in risk
    assert any("junk: dmarc.quarantine" in r for r in risk["reasons"])


# -- the OpenAPI document ----------------------------------------------------------------------


def test_openapi_covers_every_route(s: Setup) -> None:
    doc = s.client.get("/localapi/v0/openapi.json").json()
    assert doc["openapi"] == "3.1.0" and doc["servers"] == [{"url": BASE}]
    documented = {(method, path) for path, item in doc["paths"].items() for method in item}
    served = set()
    for rule in LocalAPI.app.url_map.iter_rules():
        path = rule.rule.replace("<ref:ref>", "{id}").replace("<ref:rule_id>", "{id}")
        path = path.replace("<index>", "{index}")
        for method in rule.methods or ():
            if method not in ("HEAD", "OPTIONS"):
                served.add((method.lower(), path))
    assert served == documented
    listing = doc["paths"][MESSAGES]["get"]
    assert {p["name"] for p in listing["parameters"]} == {
        "mailbox",
        "limit",
        "offset",
        "search",
        "unread_only",
    }


def test_replies_match_the_documented_models(s: Setup) -> None:
    from webapi.local import openapi as o

    info = s.deliver(RICH)
    o.MessageList.model_validate(s.client.get(MESSAGES).json())
    o.MessageDetailBody.model_validate(s.client.get(f"{MESSAGES}/{info.id}").json())
    o.EventList.model_validate(s.client.get(f"{MAIL}/recent").json())
    o.Status.model_validate(s.client.get("/localapi/v0/status").json())
    o.ClientConfig.model_validate(s.client.get(f"{MAIL}/client-config").json())
    o.Marked.model_validate(s.client.post(f"{MESSAGES}/{info.id}/mark", {"read": True}).json())
    o.Reported.model_validate(s.client.post(f"{MESSAGES}/{info.id}/report-spam").json())
    o.Done.model_validate(s.client.delete(f"{MESSAGES}/{info.id}?mailbox=Junk").json())
    o.Done.model_validate(s.client.post(f"{MAIL}/enable").json())
    o.ErrorBody.model_validate(s.client.get(f"{MESSAGES}/nope.x?mailbox=Nope").json())
