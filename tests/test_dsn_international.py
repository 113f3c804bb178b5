"""DSNs about mail with UTF-8 addresses or header fields (RFC 6533); ASCII mail keeps the
RFC 3464 form."""

from __future__ import annotations

import email
from email import policy

from edge.delivery.dsn import RecipientStatus, build_dsn
from edge.spool.spool import Envelope

HEAD = "From: Jörg <jörg@bücher.example>\r\nSubject: grüße\r\n".encode()
ORIGINAL = HEAD + "\r\nder Text, der nie zurückgeht\r\n".encode()


def report(sender: str, rcpt: str, original: bytes) -> bytes:
    env = Envelope("Q1", sender, [rcpt], 0.0)
    statuses = [RecipientStatus(rcpt, "553 5.6.7 mx.test:25 does not offer SMTPUTF8")]
    return build_dsn(env, statuses, original, action="failed", reporting_mta="edge.test", now=0)


def parts(data: bytes) -> list[email.message.Message]:
    msg = email.message_from_bytes(data, policy=policy.SMTPUTF8)
    assert msg.get_content_type() == "multipart/report"
    return list(msg.iter_parts())  # type: ignore[attr-defined]


def test_utf8_sender_and_header_fields_get_the_global_types() -> None:
    data = report("jörg@bücher.example", "ünï@example.com", ORIGINAL)
    human, status, headers = parts(data)
    assert status.get_content_type() == "message/global-delivery-status"
    assert "Final-Recipient: utf-8; ünï@example.com\r\n".encode() in data
    assert b"Status: 5.6.7\r\n" in data
    assert headers.get_content_type() == "message/global-headers"
    assert HEAD in data  # the original header section, octet for octet
    assert b"der Text" not in data  # never the body
    assert "To: <jörg@bücher.example>\r\n".encode() in data
    assert human.get_content_type() == "text/plain"


def test_utf8_header_fields_alone_make_an_international_report() -> None:
    data = report("a@b.test", "c@d.test", ORIGINAL)
    _human, status, headers = parts(data)
    assert status.get_content_type() == "message/global-delivery-status"
    assert b"Final-Recipient: rfc822; c@d.test\r\n" in data
    assert headers.get_content_type() == "message/global-headers"
    assert HEAD in data


def test_ascii_mail_keeps_the_rfc_3464_form() -> None:
    data = report("a@b.test", "foo@[1.2.3.5]", b"Subject: plain\r\n\r\nbody\r\n")
    assert data.isascii()
    _human, status, headers = parts(data)
    assert status.get_content_type() == "message/delivery-status"
    assert headers.get_content_type() == "text/rfc822-headers"
    assert b"Final-Recipient: rfc822; foo@[1.2.3.5]" in data
