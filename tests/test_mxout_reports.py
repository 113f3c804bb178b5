"""Delivery reports (RFC 3464) read for the bounce match, and the DSN parameters' xtext."""

from __future__ import annotations

import pytest

from edge.delivery.bouncematch import is_report, read_report
from edge.delivery.clientsession import xtext

HEAD = b"X-Tailpost-Queue-ID: 0662AA\r\nFrom: MAILER-DAEMON@mx.test\r\n"


@pytest.mark.parametrize(
    ("sender", "data", "expected"),
    [
        ("", HEAD + b"Content-Type: multipart/report; report-type=x\r\n\r\nbody", True),
        ("", HEAD + b"content-type:\r\n\tMultipart/Report;\r\n\tboundary=b\r\n\r\n", True),
        ("bob@x.test", HEAD + b"Content-Type: multipart/report\r\n\r\n", False),  # not from <>
        (
            "",
            HEAD + b"Content-Type: multipart/mixed\r\n\r\nContent-Type: multipart/report\r\n",
            False,
        ),
        ("", HEAD + b"Content-Type: multipart/reports\r\n\r\n", False),
        ("", HEAD + b"X-Content-Type: multipart/report\r\n\r\n", False),
    ],
)
def test_only_a_report_from_the_null_sender_is_read(
    sender: str, data: bytes, expected: bool
) -> None:
    assert is_report(sender, data) is expected


GLOBAL = """\
Content-Type: multipart/report; report-type=delivery-status; boundary="b"

--b
Content-Type: text/plain

failed
--b
Content-Type: message/global-delivery-status
Content-Transfer-Encoding: 8bit

Reporting-MTA: dns; mx.test
Original-Envelope-Id: 0662A+2BB

Final-Recipient: utf-8; jürgen@x.test
Action: failed
Status: 5.1.1

Final-Recipient: rfc822; later@x.test
Action: delayed
Status: 4.4.1

Final-Recipient: rfc822; odd@x.test
Action: failed
Status: 4.4.7
--b--
"""


def test_a_global_report_gives_its_envelope_id_and_failed_recipients() -> None:
    envid, failed = read_report(GLOBAL.replace("\n", "\r\n").encode())
    assert envid == "0662A+B"  # xtext decoded
    # A delay, and a "failed" with a status that is not permanent, are no bounces.
    assert failed == [("jürgen@x.test", "5.1.1")]


def test_anything_but_a_delivery_status_report_gives_nothing() -> None:
    other = GLOBAL.replace("report-type=delivery-status", "report-type=feedback-report")
    assert read_report(other.encode()) == ("", [])
    assert read_report(b"Subject: hi\r\n\r\nhello\r\n") == ("", [])


def test_xtext() -> None:
    assert xtext(b"rfc822;a+b=c@x.test") == b"rfc822;a+2Bb+3Dc@x.test"
    assert xtext(b"sp ace\x7f") == b"sp+20ace+7F"
