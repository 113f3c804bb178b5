"""POST /localapi/v0/mail/send through the real Klein app into the real outbound queue.

What the queue got is read back from its directory (envelope line, then the message) and
parsed with the standard library, so each test checks the message as the edge would get it.
Disk work runs synchronously (`run_now`); time is a `Clock`.
"""

from __future__ import annotations

import base64
import email
import json
from dataclasses import dataclass
from email import policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.task import Clock

from connector.idempotency import DeviceKeys
from connector.outbound.events import OutboundEventLog, OutboundEvents
from connector.outbound.queue import OutboundQueue
from maildir import Maildir
from tests.test_localapi import BASE, TOKEN, Client, Reply, assert_error, run_now
from webapi.local.app import LocalAPI
from webapi.local.device import DeviceInfo

SEND = "/localapi/v0/mail/send"
ALICE = "alice@example.test"
ALIAS = "sales@example.test"
BOB = "bob@example.net"
CAROL = "carol@example.org"
MIB = 1024 * 1024


@dataclass
class Queued:
    envelope: dict[str, Any]
    data: bytes

    @property
    def msg(self) -> EmailMessage:
        # As text: UTF-8 headers (RFC 6532) read as such; CRLF-only is checked on its own.
        lf = self.data.replace(b"\r\n", b"\n").decode("utf-8")
        parsed = email.message_from_string(lf, policy=policy.default)
        assert isinstance(parsed, EmailMessage)
        return parsed


class Setup:
    """A device under `root`: Maildir, outbound queue and events, key store, API."""

    def __init__(
        self, root: Path, addresses: list[str] | None = None, default: str = ALICE
    ) -> None:
        self.root = root
        self.clock = Clock()
        self.clock.advance(1_765_000_000)
        self.maildir = Maildir(root / "Maildir", hostname="device.test")
        self.events = OutboundEvents(
            OutboundEventLog(root / "device" / "outbound-events.jsonl", self.clock.seconds),
            run_now,
        )
        self.queue = OutboundQueue(
            root / "device" / "outbound",
            self.maildir,
            self.events,
            clock=self.clock,
            run_blocking=run_now,
            hostname="device.test",
        )
        self.keys = DeviceKeys(root / "device" / "idempotency.sqlite3", self.clock.seconds)
        device = DeviceInfo(
            "device.test",
            addresses=addresses if addresses is not None else [ALICE, ALIAS],
            default_address=default,
        )
        self.api = LocalAPI(
            self.maildir,
            TOKEN,
            base_url=BASE,
            run_blocking=run_now,
            device=device,
            clock=self.clock,
            outbound_queue=self.queue,
            send_keys=self.keys,
            outbound_events=self.events,
        )
        self.client = Client(self.api)

    def send(self, body: Any, **kwargs: Any) -> Reply:
        return self.client.post(SEND, body, **kwargs)

    def queued(self) -> list[Queued]:
        directory = self.root / "device" / "outbound" / "queue"
        out = []
        for path in sorted(directory.glob("*.msg")):
            head, _, data = path.read_bytes().partition(b"\n")
            out.append(Queued(json.loads(head), data))
        return out

    def only(self) -> Queued:
        queued = self.queued()
        assert len(queued) == 1, queued
        return queued[0]


@pytest.fixture
def s(tmp_path: Path) -> Setup:
    return Setup(tmp_path)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# -- the message ------------------------------------------------------------------------------


def test_text_only_is_on_disk_when_answered(s: Setup) -> None:
    reply = s.send({"to": [BOB], "subject": "Daily summary", "body_text": "All done.\n"})
    body = reply.json()
    assert reply.code == 200 and body["status"] == "ok"
    q = s.only()
    msg = q.msg
    assert msg.get_content_type() == "text/plain"
    assert msg.get_content() == "All done.\n"
    assert msg["From"] == ALICE and msg["To"] == BOB and msg["Subject"] == "Daily summary"
    assert msg["Message-ID"] == body["message_id"]
    assert body["message_id"].endswith("@example.test>")
    assert msg["Date"] == "Sat, 06 Dec 2025 05:46:40 +0000"  # the injected clock
    assert q.envelope["sender"] == ALICE and q.envelope["recipients"] == [BOB]
    assert q.envelope["id"] == body["proxy_message_id"]
    assert b"\r\n" in q.data and b"\n" not in q.data.replace(b"\r\n", b"")
    # The queue keeps the Sent copy.
    sent = s.maildir.folder("Sent").messages()
    assert len(sent) == 1


def test_html_only(s: Setup) -> None:
    assert s.send({"to": BOB, "body_html": "<p>Hi</p>"}).code == 200
    msg = s.only().msg
    assert msg.get_content_type() == "text/html"
    assert msg.get_content().strip() == "<p>Hi</p>"


def test_text_and_html_are_alternatives(s: Setup) -> None:
    assert s.send({"to": BOB, "body_text": "Hi", "body_html": "<p>Hi</p>"}).code == 200
    msg = s.only().msg
    assert msg.get_content_type() == "multipart/alternative"
    parts = [p.get_content_type() for p in msg.iter_parts()]
    assert parts == ["text/plain", "text/html"]


def test_attachments_make_multipart_mixed(s: Setup) -> None:
    pdf, png = b"%PDF-1.7\x00\xff binary", bytes(range(256)) * 10
    reply = s.send(
        {
            "to": BOB,
            "body_text": "see attached",
            "body_html": "<p>see attached</p>",
            "attachments": [
                {
                    "filename": "a.pdf",
                    "content_type": "application/pdf",
                    "content_base64": b64(pdf),
                },
                {"filename": "b.png", "content_type": "image/PNG", "content_base64": b64(png)},
            ],
        }
    )
    assert reply.code == 200, reply.body
    msg = s.only().msg
    assert msg.get_content_type() == "multipart/mixed"
    parts = list(msg.iter_parts())
    assert [p.get_content_type() for p in parts] == [
        "multipart/alternative",
        "application/pdf",
        "image/png",
    ]
    assert parts[1].get_filename() == "a.pdf" and parts[1].get_content() == pdf
    assert parts[2].get_filename() == "b.png" and parts[2].get_content() == png
    assert parts[1].get_content_disposition() == "attachment"


def test_utf8_subject_names_and_filenames_are_encoded(s: Setup) -> None:
    reply = s.send(
        {
            "from": f"Jürgen Müller <{ALICE}>",
            "to": [f"Zoë Ångström <{BOB}>"],
            "subject": "Grüße aus Köln 🎉",
            "body_text": "Schöne Grüße",
            "attachments": [
                {"filename": "Rechnung März.pdf", "content_base64": b64(b"x")},
            ],
        }
    )
    assert reply.code == 200, reply.body
    q = s.only()
    assert q.data.isascii()  # encoded words and RFC 2231: nothing needs SMTPUTF8
    assert b"=?utf-8?" in q.data
    msg = q.msg
    assert msg["Subject"] == "Grüße aus Köln 🎉"
    assert msg["From"].addresses[0].display_name == "Jürgen Müller"
    assert msg["To"].addresses[0].display_name == "Zoë Ångström"
    attachment = list(msg.iter_attachments())[0]
    assert attachment.get_filename() == "Rechnung März.pdf"
    assert attachment.get_content_type() == "application/octet-stream"
    body = msg.get_body(("plain",))
    assert body is not None and body.get_content().strip() == "Schöne Grüße"


def test_smtputf8_addresses(s: Setup) -> None:
    reply = s.send({"to": "jøran@blåbær.no", "cc": ["用户@例子.广告"], "body_text": "hei"})
    assert reply.code == 200, reply.body
    q = s.only()
    assert q.envelope["recipients"] == ["jøran@blåbær.no", "用户@例子.广告"]
    assert "jøran@blåbær.no".encode() in q.data  # RFC 6532: UTF-8 in the header
    assert q.msg["To"].addresses[0].addr_spec == "jøran@blåbær.no"


def test_bcc_is_in_the_envelope_only(s: Setup) -> None:
    reply = s.send(
        {
            "to": f"Bob <{BOB}>, {CAROL}",
            "cc": "dave@example.com",
            "bcc": ["audit@example.com", BOB],
            "body_text": "hi",
        }
    )
    assert reply.code == 200
    q = s.only()
    assert q.envelope["recipients"] == [BOB, CAROL, "dave@example.com", "audit@example.com"]
    assert b"audit@" not in q.data and b"bcc" not in q.data.lower()
    msg = q.msg
    assert [a.addr_spec for a in msg["To"].addresses] == [BOB, CAROL]
    assert msg["Cc"] == "dave@example.com"


def test_thread_headers_of_a_send(s: Setup) -> None:
    body = {
        "to": BOB,
        "body_text": "x",
        "in_reply_to": "<a@example.net>",
        "references": "<root@example.net> <a@example.net>",
    }
    assert s.send(body).code == 200
    msg = s.only().msg
    assert msg["In-Reply-To"] == "<a@example.net>"
    assert msg["References"] == "<root@example.net> <a@example.net>"


# -- the sender -------------------------------------------------------------------------------


def test_from_defaults_to_the_device_address(tmp_path: Path) -> None:
    s = Setup(tmp_path, addresses=[BOB], default="")  # one address: that one
    assert s.send({"to": CAROL, "body_text": "x"}).code == 200
    assert s.only().envelope["sender"] == BOB


def test_from_another_own_address(s: Setup) -> None:
    assert s.send({"from": ALIAS.upper(), "to": BOB, "body_text": "x"}).code == 200
    assert s.only().envelope["sender"] == ALIAS.upper()


def test_from_not_owned_is_refused(s: Setup) -> None:
    reply = s.send({"from": "ceo@example.test", "to": BOB, "body_text": "x"})
    assert_error(reply, 403, "sender_not_owned")
    assert s.queued() == []


def test_several_addresses_without_default_need_from(tmp_path: Path) -> None:
    s = Setup(tmp_path, default="")
    assert_error(s.send({"to": BOB, "body_text": "x"}), 422, "from_required")
    s = Setup(tmp_path / "none", addresses=[], default="")
    assert_error(s.send({"to": BOB, "body_text": "x"}), 422, "no_sender_address")


# -- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"to": BOB}, "body_required"),
        ({"to": [], "body_text": "x"}, "invalid_parameter"),
        ({"to": "", "body_text": "x"}, "invalid_parameter"),
        ({"to": "not an address", "body_text": "x"}, "invalid_address"),
        ({"to": "a@b@c.example", "body_text": "x"}, "invalid_address"),
        ({"to": f"{BOB}, garbage", "body_text": "x"}, "invalid_address"),
        ({"to": "x@-bad-.example", "body_text": "x"}, "invalid_address"),
        ({"to": "Group: a@b.example;", "body_text": "x"}, "invalid_address"),
        ({"to": BOB, "cc": ["ok@example.net", "bad"], "body_text": "x"}, "invalid_address"),
        ({"to": BOB, "bcc": "bcc@", "body_text": "x"}, "invalid_address"),
        ({"to": "bob@example.net\r\nBcc: x@y.example", "body_text": "x"}, "invalid_address"),
        ({"to": BOB, "subject": "a\r\nBcc: x@y.example", "body_text": "x"}, "invalid_header"),
        ({"to": BOB, "body_text": "nul\x00"}, "invalid_body"),
        ({"to": BOB, "body_text": "x", "in_reply_to": "nope"}, "invalid_message_id"),
        ({"to": BOB, "body_text": "x", "references": ["<a@b>", "c"]}, "invalid_message_id"),
        ({"to": [f"r{i}@example.net" for i in range(101)], "body_text": "x"}, "invalid_parameter"),
        (
            {"to": ",".join(f"r{i}@example.net" for i in range(101)), "body_text": "x"},
            "too_many_recipients",
        ),
        ({"to": BOB, "body_text": 5}, "invalid_parameter"),
        ({"to": 5, "body_text": "x"}, "invalid_parameter"),
        ({"body_text": "x"}, "invalid_parameter"),
        ({"to": BOB, "body_text": "x", "sender": ALICE}, "invalid_parameter"),
        ({"from": "", "to": BOB, "body_text": "x"}, "invalid_address"),
        ({"from": f"{ALICE}, {ALIAS}", "to": BOB, "body_text": "x"}, "invalid_address"),
    ],
)
def test_bad_bodies_are_400(s: Setup, body: dict[str, Any], code: str) -> None:
    assert_error(s.send(body), 400, code)
    assert s.queued() == []


@pytest.mark.parametrize(
    ("attachment", "why"),
    [
        ({"filename": "a", "content_base64": "not base64!"}, "content_base64"),
        ({"filename": "a", "content_base64": "QUJD="}, "content_base64"),
        ({"filename": "a", "content_base64": "QUJ€"}, "content_base64"),
        ({"filename": "a", "content_type": "pdf", "content_base64": "QUJD"}, "type/subtype"),
        ({"filename": "a", "content_type": "a/b/c", "content_base64": "QUJD"}, "type/subtype"),
        ({"filename": "a", "content_type": "text/plain; x=1", "content_base64": "QUJD"}, "type"),
        ({"filename": "a", "content_type": "multipart/mixed", "content_base64": "QUJD"}, "multi"),
        ({"filename": "a", "content_type": "message/rfc822", "content_base64": "QUJD"}, "message"),
    ],
)
def test_bad_attachments_are_400(s: Setup, attachment: dict[str, str], why: str) -> None:
    body = {
        "to": BOB,
        "body_text": "x",
        "attachments": [{"filename": "ok"} | {"content_base64": ""}, attachment],
    }
    error = assert_error(s.send(body), 400, "invalid_attachment")
    assert error["error"].startswith("attachments[1]: ") and why in error["error"]


def test_attachment_base64_with_line_breaks_is_fine(s: Setup) -> None:
    encoded = base64.encodebytes(b"z" * 300).decode()  # MIME style: lines of 76
    body = {
        "to": BOB,
        "body_text": "x",
        "attachments": [{"filename": "z", "content_base64": encoded}],
    }
    assert s.send(body).code == 200
    assert list(s.only().msg.iter_attachments())[0].get_content() == b"z" * 300


def test_attachment_file_names_and_fields(s: Setup) -> None:
    for attachment in (
        {"filename": "", "content_base64": "QUJD"},
        {"filename": "a\r\nb", "content_base64": "QUJD"},
        {"content_base64": "QUJD"},
        {"filename": "a"},
        {"filename": "a", "content_base64": "QUJD", "size": 3},
    ):
        reply = s.send({"to": BOB, "body_text": "x", "attachments": [attachment]})
        assert reply.code == 400, attachment
    assert s.queued() == []


def test_not_json_and_wrong_content_type(s: Setup) -> None:
    assert_error(s.send(b"{not json"), 400, "invalid_json")
    assert_error(s.send(b"[]"), 400, "invalid_json")
    assert_error(s.send(b""), 400, "invalid_json")
    reply = s.client.request("POST", SEND, data=b"{}", extra={"Content-Type": "text/plain"})
    assert_error(reply, 415, "unsupported_media_type")
    assert_error(
        s.client.post(f"{SEND}?x=1", {"to": BOB, "body_text": "x"}), 400, "invalid_parameter"
    )
    assert_error(s.client.get(SEND), 405, "method_not_allowed")


# -- limits -----------------------------------------------------------------------------------


def test_attachments_over_25_mib_are_413(s: Setup) -> None:
    half = b64(b"\x00" * (13 * MIB))
    attachments = [{"filename": f"{i}.bin", "content_base64": half} for i in range(2)]
    reply = s.send({"to": BOB, "body_text": "x", "attachments": attachments})
    assert_error(reply, 413, "attachments_too_large")
    assert s.queued() == []


def test_attachments_of_25_mib_are_sent(s: Setup) -> None:
    content = bytes(range(256)) * (25 * MIB // 256)
    body = {
        "to": BOB,
        "body_text": "x",
        "attachments": [{"filename": "big", "content_base64": b64(content)}],
    }
    reply = s.send(body)
    assert reply.code == 200, reply.body[:300]
    assert list(s.only().msg.iter_attachments())[0].get_content() == content


def test_send_bodies_may_exceed_the_general_cap(s: Setup) -> None:
    """Other routes keep the 1 MiB cap; send takes a body of attachments beyond it."""
    big = b64(b"y" * (2 * MIB))
    body = {"to": BOB, "body_text": "x", "attachments": [{"filename": "y", "content_base64": big}]}
    assert s.send(body).code == 200
    reply = s.client.post("/localapi/v0/mail/messages/x.y/mark", {"read": True, "pad": big})
    assert_error(reply, 413, "payload_too_large")


def test_disabled_api_without_queue(tmp_path: Path) -> None:
    api = LocalAPI(Maildir(tmp_path / "m", hostname="h"), TOKEN, run_blocking=run_now)
    client = Client(api)
    assert_error(client.post(SEND, {"to": BOB, "body_text": "x"}), 501, "not_supported")
    assert_error(client.get("/localapi/v0/mail/outbound/recent"), 501, "not_supported")
    with pytest.raises(ValueError):
        LocalAPI(api.mail.maildir, TOKEN, outbound_queue=object())  # type: ignore[arg-type]


def test_no_sending_while_mail_is_disabled(s: Setup) -> None:
    from connector.mailservice import MailService

    service = MailService(s.root / "mail-state.json", [], run_now)
    s.api.mail_service = service
    assert s.client.post("/localapi/v0/mail/disable").code == 200
    assert_error(s.send({"to": BOB, "body_text": "x"}), 409, "mail_disabled")
    assert s.client.post("/localapi/v0/mail/enable").code == 200
    assert s.send({"to": BOB, "body_text": "x"}).code == 200


def test_a_message_over_the_send_size_is_413_and_not_queued(tmp_path: Path) -> None:
    """Attachments within their 25 MiB still make a message too large for a device whose
    `max_send_size` is smaller (base64 grows them by a third): refused, never queued."""
    s = Setup(tmp_path)
    assert s.api.sending is not None
    s.api.sending.max_message = 4 * MIB
    content = b"z" * (3 * MIB + MIB // 2)  # 3.5 MiB: about 4.7 MiB encoded
    body = {
        "to": BOB,
        "body_text": "x",
        "attachments": [{"filename": "z", "content_base64": b64(content)}],
    }
    assert_error(s.send(body), 413, "message_too_large")
    assert s.queued() == []
    small = {
        "to": BOB,
        "body_text": "x",
        "attachments": [{"filename": "z", "content_base64": b64(content[: 2 * MIB])}],
    }
    assert s.send(small).code == 200
