"""What the MX takes as a path (RFC 5321 section 4.1.2, RFC 6531 with SMTPUTF8): exactly
the paths the delivery client can send on verbatim; everything else is refused at MAIL or
RCPT with a 5xx, never accepted and then stuck."""

from __future__ import annotations

import pytest

from edge.smtp.address import parse_mail_from, parse_rcpt_to
from edge.smtp.replies import SMTPReplyError

SIZE = 10_000_000


@pytest.mark.parametrize(
    ("arg", "address"),
    [
        ("<>", ""),
        ("<a@b.test>", "a@b.test"),
        ("<foo@[1.2.3.5]>", "foo@[1.2.3.5]"),
        ("<foo@[IPv6:2001:db8::1]>", "foo@[IPv6:2001:db8::1]"),
        ("<foo@[ipv6:::ffff:192.0.2.1]>", "foo@[ipv6:::ffff:192.0.2.1]"),
        ('<"john doe"@example.net>', '"john doe"@example.net'),
        ('<"a\\"b"@example.net>', '"a\\"b"@example.net'),
        ('<""@example.net>', '""@example.net'),
        ("<@relay.test,@other.test:user@example.net>", "user@example.net"),
        ("<ü@bücher.example> SMTPUTF8", "ü@bücher.example"),
        ('<"jö rg"@example.net> SMTPUTF8', '"jö rg"@example.net'),
        ("<a.ü.b@例え.テスト> SMTPUTF8", "a.ü.b@例え.テスト"),
    ],
)
def test_paths_taken_as_received(arg: str, address: str) -> None:
    assert parse_mail_from("FROM:" + arg, max_size=SIZE).address == address
    smtputf8 = "SMTPUTF8" in arg
    if address:
        rcpt = arg.replace(" SMTPUTF8", "")
        assert parse_rcpt_to("TO:" + rcpt, smtputf8=smtputf8).address == address


@pytest.mark.parametrize(
    ("arg", "code", "enhanced"),
    [
        # No local part: not a Mailbox. It was taken as the null sender at MAIL.
        ("<@example.net>", 501, "5.1.7"),
        ("<@a.test:>", 501, "5.1.7"),
        ("<@a.test,b.test:u@c.test>", 501, "5.1.7"),
        ("<@exa mple.net:u@c.test>", 501, "5.1.7"),
        ("<a..b@example.net>", 501, "5.1.7"),
        ("<.a@example.net>", 501, "5.1.7"),
        ('<"a"b"@example.net>', 501, "5.1.7"),
        ("<a b@example.net>", 501, "5.1.7"),
        ("<a@example..net>", 501, "5.1.7"),
        # A final dot is no part of an RFC 5321 Domain; the next host refuses it.
        ("<a@example.net.>", 501, "5.1.7"),
        ("<a@[1.2.3.4].>", 501, "5.1.7"),
        ("<ü@bücher.example.> SMTPUTF8", 501, "5.1.7"),
        ("<a@-example.net>", 501, "5.1.7"),
        ("<a@[1.2.3.256]>", 501, "5.1.7"),
        ("<a@[1.2.3]>", 501, "5.1.7"),
        ("<a@[IPv6:1:2:3]>", 501, "5.1.7"),
        ("<a@[IPv6:fe80::1%eth0]>", 501, "5.1.7"),
        ("<a@[tag:anything]>", 501, "5.1.7"),
        ("<a@[1.2.3.4>", 501, "5.1.7"),
        ("<ü@bücher.example>", 553, "5.6.7"),  # UTF-8 without SMTPUTF8
        ("<u\u0085@example.net> SMTPUTF8", 501, "5.1.7"),  # a C1 control character
        ("<u\u2028@example.net> SMTPUTF8", 501, "5.1.7"),  # a line separator
        ('<"\u2029"@example.net> SMTPUTF8', 501, "5.1.7"),  # a paragraph separator
        ("<a@b ü.test> SMTPUTF8", 501, "5.1.7"),
        ("<a@xn--.test> SMTPUTF8", 501, "5.1.7"),
        ("<" + "a" * 65 + "@example.net>", 501, "5.1.7"),
        ("<a@" + "b" * 250 + ".test>", 501, "5.1.7"),
    ],
)
def test_what_is_no_path_is_refused_at_mail_and_rcpt(arg: str, code: int, enhanced: str) -> None:
    with pytest.raises(SMTPReplyError) as refused:
        parse_mail_from("FROM:" + arg, max_size=SIZE)
    assert (refused.value.reply.code, refused.value.reply.enhanced) == (code, enhanced)
    rcpt = arg.replace(" SMTPUTF8", "")
    with pytest.raises(SMTPReplyError) as refused:
        parse_rcpt_to("TO:" + rcpt, smtputf8="SMTPUTF8" in arg)
    assert refused.value.reply.code >= 500
