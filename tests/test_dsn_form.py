"""A DSN stays a well-formed report (RFC 3464, RFC 6533) whatever a host replied: a
multi-line reply, control characters, a reply longer than a line."""

from __future__ import annotations

import email
from email import policy
from email.parser import BytesHeaderParser

import pytest

from edge.delivery.dsn import RecipientStatus, build_dsn
from edge.spool.spool import Envelope

HOSTILE = [
    # How the client reads a multi-line reply: its lines joined with LF.
    "550 5.1.1 The account does not exist.\n5.1.1 Please check the address.",
    # A host writing fields of its own into the report.
    "550 5.1.1 no\r\nAction: delivered\r\nStatus: 2.0.0\r\n\r\nFinal-Recipient: rfc822; x@y",
    "550 5.1.1 nul\x00 and\x0bvertical\x85next\u2028line",
    "550 5.1.1 " + "long " * 600,
]


def blocks(data: bytes) -> list[email.message.Message]:
    """The per-message and per-recipient field blocks of the report's status part, read
    from its octets (the parser would read only the first block of a message/* part)."""
    msg = email.message_from_bytes(data, policy=policy.SMTPUTF8)
    assert msg.get_content_type() == "multipart/report"
    start = data.index(b"\r\nReporting-MTA:") + 2
    end = data.index(b"\r\n--", start)
    parser = BytesHeaderParser(policy=policy.SMTPUTF8)
    return [parser.parsebytes(b + b"\r\n") for b in data[start:end].strip().split(b"\r\n\r\n")]


@pytest.mark.parametrize("reply", HOSTILE)
@pytest.mark.parametrize("rcpt", ["alice@example.com", "ünï@example.com"])
def test_a_hosts_reply_stays_in_its_one_field(reply: str, rcpt: str) -> None:
    env = Envelope("Q1", "carol@sender.test", [rcpt], 0.0)
    statuses = [RecipientStatus(rcpt, reply, "mx.example.com:25")]
    data = build_dsn(
        env, statuses, b"Subject: x\r\n\r\nbody\r\n", action="failed", reporting_mta="e", now=0
    )

    assert all(len(line) <= 998 for line in data.split(b"\r\n"))
    per_message, *per_recipient = blocks(data)
    assert str(per_message["Reporting-MTA"]).strip() == "dns; e"
    [block] = per_recipient
    assert [str(v).strip() for v in block.get_all("Action") or []] == ["failed"]
    assert [str(v).strip() for v in block.get_all("Status") or []] == ["5.1.1"]
    assert str(block["Final-Recipient"]).strip().endswith(rcpt)
    diagnostic = str(block["Diagnostic-Code"]).strip()
    assert diagnostic.startswith("smtp; 550 5.1.1 ")
    assert "\n" not in diagnostic.replace("\r\n ", "").replace("\r\n\t", "")
    if "Please" in reply:
        assert "Please check the address." in diagnostic  # the second line is kept
