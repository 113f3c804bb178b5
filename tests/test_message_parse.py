"""Tests for maildir.message: decoding, attachments, robustness and file name sanitising."""

from __future__ import annotations

import base64

import pytest

from maildir.message import (
    AttachmentNotFound,
    get_attachment,
    parse_detail,
    read_header,
    sanitize_filename,
    summarize,
)

CRLF = b"\r\n"


def msg(*lines: bytes) -> bytes:
    return CRLF.join(lines) + CRLF


MIXED = msg(
    b"From: =?iso-8859-1?q?J=E9r=F4me?= <jerome@example.com>",
    b'To: alice@example.com, "Bob, Jr" <bob@example.com>',
    b"Cc: carol@example.com",
    b"Subject: =?utf-8?b?w4dhIHZhIGJpZW4/?= =?utf-8?q?_et_vous?=",
    b"Date: Fri, 03 Apr 2026 18:30:00 +0000",
    b"Message-ID: <m1@example.com>",
    b"In-Reply-To: <m0@example.com>",
    b"References: <a@example.com>\r\n <m0@example.com>",
    b"X-Tailpost-Queue-ID: msg_01ABC",
    b"Authentication-Results: edge.example.net; spf=pass smtp.mailfrom=example.com",
    b"MIME-Version: 1.0",
    b'Content-Type: multipart/mixed; boundary="outer"',
    b"",
    b"--outer",
    b'Content-Type: multipart/alternative; boundary="alt"',
    b"",
    b"--alt",
    b"Content-Type: text/plain; charset=iso-8859-1",
    b"Content-Transfer-Encoding: quoted-printable",
    b"",
    b"Voil=E0   le\r\n  rapport.",
    b"--alt",
    b"Content-Type: text/html; charset=utf-8",
    b"",
    b"<p>Voil\xc3\xa0 <b>le</b> rapport.</p>",
    b"--alt--",
    b"--outer",
    b"Content-Type: application/pdf",
    b"Content-Disposition: attachment; filename*=UTF-8''r%C3%A9sum%C3%A9%20final.pdf",
    b"Content-Transfer-Encoding: base64",
    b"",
    base64.b64encode(b"%PDF-1.4 fake"),
    b"--outer",
    b"Content-Type: image/png",
    b'Content-Disposition: inline; filename="=?utf-8?q?gr=C3=BC=C3=9Fe.png?="',
    b"Content-Transfer-Encoding: base64",
    b"",
    base64.b64encode(b"\x89PNG\r\n\x1a\n"),
    b"--outer--",
)


def test_summary_decodes_rfc2047_headers_and_addresses() -> None:
    s = summarize(MIXED)
    assert s.subject == "Ça va bien? et vous"
    assert s.from_ == "Jérôme <jerome@example.com>"
    assert s.to == ["alice@example.com", '"Bob, Jr" <bob@example.com>']
    assert s.cc == ["carol@example.com"]
    assert s.date == "Fri, 03 Apr 2026 18:30:00 +0000"
    assert s.message_id == "<m1@example.com>"
    assert s.queue_id == "msg_01ABC"
    assert s.preview == "Voilà le rapport."


def test_detail_bodies_charsets_and_threading() -> None:
    d = parse_detail(MIXED)
    assert d.body_text == "Voilà   le\r\n  rapport."
    assert d.body_html == "<p>Voilà <b>le</b> rapport.</p>"
    assert d.in_reply_to == "<m0@example.com>"
    assert d.references == ["<a@example.com>", "<m0@example.com>"]
    assert d.headers.startswith("From: =?iso-8859-1?q?J=E9r=F4me?= <jerome@example.com>\r\n")
    assert "References: <a@example.com>\r\n <m0@example.com>\r\n" in d.headers
    assert d.headers.endswith('boundary="outer"\r\n')
    assert "\n" not in d.headers.replace("\r\n", "")
    assert d.authentication_results == ["edge.example.net; spf=pass smtp.mailfrom=example.com"]


def test_attachments_rfc2231_and_encoded_filenames() -> None:
    d = parse_detail(MIXED)
    assert [(a.index, a.filename, a.content_type, a.size_bytes) for a in d.attachments] == [
        (0, "résumé final.pdf", "application/pdf", len(b"%PDF-1.4 fake")),
        (1, "grüße.png", "image/png", 8),
    ]
    info, content = get_attachment(MIXED, 0)
    assert content == b"%PDF-1.4 fake"
    assert info == d.attachments[0]
    assert get_attachment(MIXED, 1)[1] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(AttachmentNotFound):
        get_attachment(MIXED, 2)
    with pytest.raises(AttachmentNotFound):
        get_attachment(MIXED, -1)


def test_html_only_preview_strips_tags_scripts_and_entities() -> None:
    data = msg(
        b"Subject: html",
        b"Content-Type: text/html; charset=utf-8",
        b"",
        b"<html><head><style>p{color:red}</style></head><body><script>evil()</script>"
        b"<p>Hello&nbsp;&amp;   welcome</p><p>" + b"x" * 500 + b"</p></body></html>",
    )
    s = summarize(data)
    assert s.preview.startswith("Hello & welcome x")
    assert "evil" not in s.preview and "color" not in s.preview
    assert len(s.preview) == 200
    assert parse_detail(data).attachments == []


def test_unknown_and_non_text_charsets_fall_back_to_utf8() -> None:
    for charset in (b"x-no-such-charset", b"zlib_codec", b"base64"):
        data = msg(
            b"Content-Type: text/plain; charset=" + charset,
            b"",
            "naïve café".encode(),
        )
        assert parse_detail(data).body_text == "naïve café\r\n"


def test_raw_8bit_headers_become_text() -> None:
    data = msg(b"Subject: caf\xc3\xa9 \xff", b"From: \xe9ric <e@example.com>", b"", b"body")
    s = summarize(data)
    assert s.subject == "café \ufffd"
    assert "\udcff" not in s.subject
    s.subject.encode("utf-8")
    s.from_.encode("utf-8")


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00\xff\xfe garbage without headers",
        b'Content-Type: multipart/mixed; boundary="\r\n\r\n--\r\n',
        b"Content-Type: multipart/mixed; boundary=x\r\n\r\n--x\r\nno end boundary",
        b"From: <<<@@>>>\r\nTo: ,,,;;;\r\nSubject: =?bogus?x?zz?=\r\nDate: yesterday\r\n\r\n\xff",
        b"Content-Type: text/plain\r\nContent-Transfer-Encoding: base64\r\n\r\n!!!not base64",
        b"Content-Type: application/pdf; name*=bogus'''%%%\r\n\r\nx",
        b"Content-Type: message/rfc822\r\n\r\nnot really a message",
        b"Content-Type: multipart/alternative\r\n\r\nno boundary at all",
        b"Subject: " + b"a" * 20000 + b"\r\n\r\n",
        b"Content-Type: multipart/mixed; boundary=b\r\n\r\n"
        + b"--b\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n" * 200,
    ],
)
def test_malformed_messages_never_raise(data: bytes) -> None:
    summary = summarize(data)
    detail = parse_detail(data)
    assert isinstance(summary.preview, str)
    for attachment in detail.attachments:
        assert get_attachment(data, attachment.index)[0] == attachment
    read_header(data, "Subject")


def test_single_part_non_text_message_is_an_attachment() -> None:
    data = msg(
        b"Subject: scan",
        b"Content-Type: application/pdf",
        b"Content-Transfer-Encoding: base64",
        b"",
        base64.b64encode(b"%PDF"),
    )
    d = parse_detail(data)
    assert d.body_text == "" and d.body_html == ""
    assert [(a.filename, a.content_type) for a in d.attachments] == [
        ("attachment-1.pdf", "application/pdf")
    ]
    assert get_attachment(data, 0)[1] == b"%PDF"


def test_attached_message_is_one_attachment() -> None:
    data = msg(
        b"Content-Type: multipart/mixed; boundary=b",
        b"",
        b"--b",
        b"Content-Type: text/plain",
        b"",
        b"see attached",
        b"--b",
        b"Content-Type: message/rfc822",
        b"",
        b"Subject: inner",
        b"Content-Type: multipart/mixed; boundary=c",
        b"",
        b"--c",
        b"Content-Type: application/zip; name=inner.zip",
        b"",
        b"PK",
        b"--c--",
        b"--b--",
    )
    d = parse_detail(data)
    assert d.body_text == "see attached"
    assert [(a.filename, a.content_type) for a in d.attachments] == [
        ("attachment-1.eml", "message/rfc822")
    ]
    assert b"Subject: inner" in get_attachment(data, 0)[1]


def test_text_part_with_attachment_disposition_is_not_the_body() -> None:
    data = msg(
        b"Content-Type: multipart/mixed; boundary=b",
        b"",
        b"--b",
        b"Content-Type: text/plain",
        b"",
        b"the body",
        b"--b",
        b"Content-Type: text/plain; charset=utf-8",
        b'Content-Disposition: attachment; filename="notes.txt"',
        b"",
        b"attached notes",
        b"--b--",
    )
    d = parse_detail(data)
    assert d.body_text == "the body"
    assert [a.filename for a in d.attachments] == ["notes.txt"]
    assert get_attachment(data, 0)[1] == b"attached notes"


def test_read_header() -> None:
    assert read_header(MIXED, "x-tailpost-queue-id") == "msg_01ABC"
    assert read_header(MIXED, "Message-ID") == "<m1@example.com>"
    assert read_header(MIXED, "X-Missing") == ""


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("invoice.pdf", "invoice.pdf"),
        ("../../etc/passwd", "passwd"),
        ("..\\..\\windows\\win.ini", "win.ini"),
        ("C:\\Users\\x\\evil.exe", "evil.exe"),
        (".bashrc", "bashrc"),
        ("...", "attachment"),
        ("", "attachment"),
        ("\x00\x01\x1f", "attachment"),
        ("a\x00b\nc.txt", "abc.txt"),
        ("invoice\u202efdp.exe", "invoicefdp.exe"),
        ('a<b>:c"d|e?f*.txt', "a_b__c_d_e_f_.txt"),
        ("CON.txt", "_CON.txt"),
        ("nul", "_nul"),
        ("report.pdf. . ", "report.pdf"),
        ("  many   spaces .doc", "many spaces .doc"),
        ("re\u0301sume\u0301.pdf", "résumé.pdf"),
    ],
)
def test_sanitize_filename(raw: str, expected: str) -> None:
    assert sanitize_filename(raw) == expected


def test_sanitize_filename_length_keeps_extension() -> None:
    long = sanitize_filename("a" * 300 + ".pdf")
    assert len(long) == 150 and long.endswith(".pdf")
    no_ext = sanitize_filename("b" * 300)
    assert no_ext == "b" * 150
    odd = sanitize_filename("c." + "d" * 300)
    assert len(odd) == 150
