"""MAIL FROM / RCPT TO argument parsing: parsed paths are kept, shared and read-only."""

from __future__ import annotations

import pytest

from edge.smtp import replies
from edge.smtp.address import parse_mail_from, parse_rcpt_to
from edge.smtp.replies import SMTPReplyError

SIZE = 10_000_000


def test_a_path_parsed_again_is_the_same_read_only_object() -> None:
    first = parse_mail_from("FROM:<a@b.test> BODY=8BITMIME", max_size=SIZE)
    again = parse_mail_from("FROM:<a@b.test> BODY=8BITMIME", max_size=SIZE)
    assert again is first
    assert first.address == "a@b.test" and dict(first.params) == {"BODY": "8BITMIME"}
    with pytest.raises(TypeError):
        first.params["SIZE"] = "1"  # type: ignore[index]
    rcpt = parse_rcpt_to("TO:<c@d.test>", smtputf8=False)
    assert parse_rcpt_to("TO:<c@d.test>", smtputf8=False) is rcpt
    with pytest.raises(TypeError):
        rcpt.params["X"] = None  # type: ignore[index]


def test_the_limits_in_force_are_part_of_what_is_kept() -> None:
    assert parse_mail_from("FROM:<a@b.test> SIZE=5000", max_size=SIZE).address == "a@b.test"
    with pytest.raises(SMTPReplyError) as small:
        parse_mail_from("FROM:<a@b.test> SIZE=5000", max_size=4000)
    assert small.value.reply == replies.S552_TOO_BIG
    utf8 = "TO:<j\u00f6rg@b.test>"
    assert parse_rcpt_to(utf8, smtputf8=True).address == "j\u00f6rg@b.test"
    with pytest.raises(SMTPReplyError) as ascii_only:
        parse_rcpt_to(utf8, smtputf8=False)
    assert ascii_only.value.reply == replies.S553_NON_ASCII


def test_a_refused_path_is_refused_every_time() -> None:
    for _ in range(3):
        with pytest.raises(SMTPReplyError) as bad:
            parse_rcpt_to("TO:<not an address>", smtputf8=False)
        assert bad.value.reply == replies.S501_BAD_ADDRESS
