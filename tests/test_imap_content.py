"""IMAP answers every FETCH item of every message, whatever the message holds.

A real server on 127.0.0.1 and real clients (imaplib, or a raw socket where the exact
response bytes matter): 8-bit headers and bodies, broken or missing MIME structure, bogus
fields, LF-only files, no header/body separator, empty files. 8-bit values must go out
as literals; files with bare LFs are served with CRLF, and every size reported is of
what is served. A message that cannot be read at all is left out with a tagged NO; the
connection never breaks.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.imapraw import Line, RawIMAP
from tests.test_imap import Server

ITEMS = [
    "ENVELOPE",
    "BODY",
    "BODYSTRUCTURE",
    "BODY.PEEK[]",
    "BODY.PEEK[HEADER]",
    "BODY.PEEK[TEXT]",
    "BODY.PEEK[1]",
    "BODY.PEEK[1.MIME]",
    "BODY.PEEK[1.1]",
    "BODY.PEEK[2]",
    "BODY.PEEK[2.MIME]",
    "BODY.PEEK[2.HEADER]",
    "BODY.PEEK[2.TEXT]",
    "BODY.PEEK[2.1]",
    "BODY.PEEK[9]",
    "BODY.PEEK[HEADER.FIELDS (SUBJECT FROM)]",
    "BODY.PEEK[HEADER.FIELDS.NOT (SUBJECT)]",
    "BODY.PEEK[2.HEADER.FIELDS (SUBJECT)]",
    "BODY.PEEK[]<5.10>",
    "BODY.PEEK[TEXT]<2.3>",
    "BODY.PEEK[1]<1.2>",
    "BODY.PEEK[]<100000.10>",
    "RFC822",
    "RFC822.HEADER",
    "RFC822.TEXT",
    "RFC822.SIZE",
    "FLAGS",
    "INTERNALDATE",
    "UID",
    "ALL",
    "FULL",
    "(ENVELOPE BODYSTRUCTURE BODY.PEEK[] BODY.PEEK[1.MIME] RFC822.SIZE)",
]

UTF8_HEADERS = (
    "From: Jérôme Ünal <jerome@example.org>\r\n"
    'To: "Zoë \\"Q\\" Ω" <zoe@example.org>, bob@example.org\r\n'
    'Subject: Grüße "quoted" \\ back «ok»\r\n'
    "Message-ID: <m1@example.org>\r\n"
    "\r\n"
    "Hallo Welt, schöne Grüße\r\n"
).encode()

MESSAGES: dict[str, bytes] = {
    "utf8-headers": UTF8_HEADERS,
    "utf8-body-no-charset": b"From: a@example.org\r\nSubject: x\r\n\r\nh\xc3\xa9llo \xff\xfe\r\n",
    "latin1-8bit-headers": b"From: J\xe9r\xf4me <j@example.org>\r\nSubject: caf\xe9\r\n\r\nbody\r\n",
    "encoded-words": (
        b"From: =?utf-8?q?J=C3=A9r=C3=B4me?= <j@example.org>\r\n"
        b"Subject: =?utf-8?b?w4dhIHZh?=\r\n\r\nbody\r\n"
    ),
    "8bit-params": (
        'From: a@example.org\r\nContent-Type: text/plain; name="fü.txt"; charset=utf-8\r\n'
        'Content-Disposition: attachment; filename="fü.txt"\r\n'
        "Content-Description: Beschreibung ä\r\n\r\nhello\r\n"
    ).encode(),
    "rfc2231-params": (
        b"From: a@example.org\r\nContent-Type: application/pdf;\r\n"
        b" name*0*=UTF-8''r%C3%A9sum;\r\n name*1*=%C3%A9.pdf\r\n"
        b"Content-Disposition: attachment; filename*=UTF-8''r%C3%A9sum%C3%A9.pdf\r\n"
        b"\r\nJVBERi0=\r\n"
    ),
    "multipart-8bit-nested-message": (
        "From: a@example.org\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n"
        "--b\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Description: ü\r\n\r\n"
        "ü\r\n--b\r\nContent-Type: message/rfc822\r\n\r\n"
        "Subject: ä\r\nFrom: ö <x@y>\r\nContent-Type: multipart/alternative; boundary=c\r\n\r\n"
        "--c\r\nContent-Type: text/plain\r\n\r\ninner ü\r\n--c--\r\n"
        "\r\n--b--\r\n"
    ).encode(),
    "multipart-without-boundary": (
        b"From: a@example.org\r\nContent-Type: multipart/mixed\r\n\r\nhello\r\n"
    ),
    "multipart-without-delimiters": (
        b"From: a@example.org\r\nContent-Type: multipart/mixed; boundary=zz\r\n\r\nhello\r\n"
    ),
    "multipart-without-close": (
        b"From: a@example.org\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n"
        b"--b\r\nContent-Type: text/plain\r\n\r\none\r\n--b\r\n\r\ntwo\r\n"
    ),
    "bogus-fields": (
        b"From: a@example.org\r\nContent-Type: text\r\nContent-Transfer-Encoding: b\xc3\xb6gus\r\n"
        b"Content-Disposition: ;;;=\r\nContent-Language: \xc3\xa9\r\n\r\nhello\r\n"
    ),
    "bogus-charset": (
        b"From: a@example.org\r\nContent-Type: text/plain; charset=x-no-such\xff\r\n\r\nhi\r\n"
    ),
    "empty-content-type": b"From: a@example.org\r\nContent-Type: /\r\n\r\nhi\r\n",
    "lf-only-multipart": (
        b"From: a@example.org\nSubject: lf\nContent-Type: multipart/mixed; boundary=b\n\n"
        b"--b\nContent-Type: text/plain\n\none\ntwo\n--b\n\nthree\n--b--\n"
    ),
    "mixed-line-ends": b"From: a@example.org\r\nSubject: mixed\n\r\nline\nline\r\nlone\rcr\n",
    "no-separator": b"From: a@example.org\r\nSubject: no body\r\n",
    "no-header": b"just a line of text\r\nand another\r\n",
    "empty": b"",
    "controls-in-headers": b"From: a@example.org\r\nSubject: a\x00b\x01c\x7f\r\n\r\nx\r\n",
    "binary-garbage": bytes(range(256)) * 4,
    "long-subject": b"Subject: " + b"x" * 5000 + b"\r\nFrom: a@example.org\r\n\r\nx\r\n",
}


@pytest.fixture
def server(in_reactor: Any, tmp_path: Path) -> Iterator[Server]:
    s = Server(in_reactor, tmp_path / "mail")
    yield s
    s.stop()


@pytest.fixture
def raw(server: Server) -> Iterator[RawIMAP]:
    """A logged-in session; tests SELECT once their messages are in place."""
    c = RawIMAP(server.portno)
    c.login()
    yield c
    c.close()


def select(c: RawIMAP) -> None:
    _, done = c.command(b"S", b"SELECT INBOX")
    assert done.text.startswith(b"S OK"), done


def crlf(data: bytes) -> bytes:
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def assert_well_formed(lines: list[Line]) -> None:
    """Outside literals a response is 7-bit text: 8-bit values came as literals."""
    for line in lines:
        assert all(b < 0x80 for b in line.text), line.text
        assert line.text.endswith(b"\r\n")
        inner = line.text[:-2].replace(b"}\r\n", b"}")
        assert b"\r" not in inner and b"\n" not in inner


def fetch(c: RawIMAP, seq: int, item: str) -> list[Line]:
    untagged, done = c.command(b"F", b"FETCH %d %s" % (seq, item.encode()))
    assert done.text.startswith(b"F OK"), (item, done.text)
    assert untagged, item
    assert_well_formed(untagged)
    return untagged


def literal_of(lines: list[Line], label: bytes) -> bytes:
    for line in lines:
        head = line.text.split(label + b" {", 1)
        if len(head) == 2:
            return line.literals[head[0].count(b"}\r\n")]
    raise AssertionError(f"no {label!r} in {lines!r}")


@pytest.mark.parametrize("name", sorted(MESSAGES))
def test_every_fetch_item_answers_for_every_message(
    server: Server, raw: RawIMAP, name: str
) -> None:
    data = MESSAGES[name]
    server.maildir.deliver(data)
    select(raw)
    for item in ITEMS:
        fetch(raw, 1, item)
    served = crlf(data)
    whole = fetch(raw, 1, "(BODY.PEEK[] BODY.PEEK[HEADER] BODY.PEEK[TEXT] RFC822.SIZE)")
    assert literal_of(whole, b"BODY[]") == served
    assert literal_of(whole, b"BODY[HEADER]") + literal_of(whole, b"BODY[TEXT]") == served
    assert b"RFC822.SIZE %d" % len(served) in whole[0].text
    _, done = raw.command(b"N", b"NOOP")
    assert done.text.startswith(b"N OK")


def test_8bit_header_values_are_literals_and_encoded_words_stay(
    server: Server, raw: RawIMAP
) -> None:
    server.maildir.deliver(UTF8_HEADERS)
    server.maildir.deliver(MESSAGES["encoded-words"])
    select(raw)
    env = fetch(raw, 1, "ENVELOPE")[0]
    assert 'Grüße "quoted" \\ back «ok»'.encode() in env.literals
    assert "Jérôme Ünal".encode() in env.literals
    assert b'"jerome" "example.org"' in env.text
    env2 = fetch(raw, 2, "ENVELOPE")[0]
    assert b'"=?utf-8?b?w4dhIHZh?="' in env2.text
    assert b'"=?utf-8?q?J=C3=A9r=C3=B4me?="' in env2.text


def test_8bit_bodystructure_and_parts(server: Server, raw: RawIMAP) -> None:
    data = MESSAGES["multipart-8bit-nested-message"]
    server.maildir.deliver(data)
    select(raw)
    structure = fetch(raw, 1, "BODYSTRUCTURE")[0]
    assert "ü".encode() in structure.literals  # the part's Content-Description
    assert "ä".encode() in structure.literals  # the attached message's Subject
    assert b'"message" "rfc822"' in structure.text
    assert b'"alternative"' in structure.text
    assert literal_of(fetch(raw, 1, "BODY.PEEK[1]"), b"BODY[1]") == "ü".encode()
    assert literal_of(fetch(raw, 1, "BODY.PEEK[1.MIME]"), b"BODY[1.MIME]") == (
        "Content-Type: text/plain; charset=utf-8\r\nContent-Description: ü\r\n\r\n".encode()
    )
    head = literal_of(fetch(raw, 1, "BODY.PEEK[2.HEADER]"), b"BODY[2.HEADER]")
    assert head.startswith("Subject: ä\r\nFrom: ö <x@y>\r\n".encode()) and head.endswith(
        b"\r\n\r\n"
    )
    inner = literal_of(fetch(raw, 1, "BODY.PEEK[2.1]"), b"BODY[2.1]")
    assert inner == "inner ü".encode()
    params = fetch(raw, 1, "BODYSTRUCTURE")[0]
    assert b'"boundary" "b"' in params.text


def _same_but_seq(a: list[Line], b: list[Line]) -> None:
    assert [re.sub(rb"^\* \d+ ", b"", x.text) for x in a] == [
        re.sub(rb"^\* \d+ ", b"", x.text) for x in b
    ]
    assert [x.literals for x in a] == [x.literals for x in b]


def test_lf_only_file_is_served_exactly_as_its_crlf_form(server: Server, raw: RawIMAP) -> None:
    lf = MESSAGES["lf-only-multipart"] + b"epilogue line\n"
    server.maildir.deliver(crlf(lf))
    server.maildir.deliver(lf)
    select(raw)
    for item in ITEMS:
        if item in ("UID", "ALL", "FULL", "INTERNALDATE", "FLAGS"):
            continue
        _same_but_seq(fetch(raw, 1, item), fetch(raw, 2, item))
    size = fetch(raw, 2, "RFC822.SIZE")[0].text
    assert b"RFC822.SIZE %d" % len(crlf(lf)) in size
    # A listing FETCH, answered from the listing once the size is known, agrees.
    listing = fetch(raw, 2, "(FLAGS RFC822.SIZE)")[0].text
    assert b"RFC822.SIZE %d" % len(crlf(lf)) in listing


def test_lf_sizes_in_a_listing_fetch_and_search(server: Server, raw: RawIMAP) -> None:
    lf = b"From: a@example.org\nSubject: s\n\n" + b"line\n" * 50
    info = server.maildir.deliver(lf)
    select(raw)
    served = len(crlf(lf))
    for _ in range(2):  # the first reads the file; the second answers from the listing
        lines = fetch(raw, 1, "(UID FLAGS RFC822.SIZE)")
        assert b"RFC822.SIZE %d" % served in lines[0].text
    untagged, done = raw.command(b"S", b"SEARCH LARGER %d" % info.size)
    assert done.text.startswith(b"S OK")
    assert untagged[0].text == b"* SEARCH 1\r\n"


def test_large_files_in_both_forms(server: Server, raw: RawIMAP) -> None:
    """Large literals: a CRLF file byte for byte (streamed from the file), an LF-only one
    converted, with the sizes announced matching what follows."""
    body = b"".join(b"line %07d of a large message\n" % i for i in range(40_000))
    lf = b"From: a@example.org\nSubject: big\n\n" + body
    server.maildir.deliver(crlf(lf))
    server.maildir.deliver(lf)
    select(raw)
    for seq in (1, 2):
        lines = fetch(raw, seq, "(RFC822.SIZE BODY.PEEK[] BODY.PEEK[TEXT]<1000.70000>)")
        assert literal_of(lines, b"BODY[]") == crlf(lf)
        assert literal_of(lines, b"BODY[TEXT]<1000>") == crlf(body)[1000:71000]
        assert b"RFC822.SIZE %d" % len(crlf(lf)) in lines[0].text


def _replace_with_directory(server: Server, msg_id: str) -> None:
    info = server.maildir.folder("INBOX").get(msg_id)
    os.unlink(info.path)
    os.mkdir(info.path)


def test_an_unreadable_message_is_left_out_with_a_tagged_no(server: Server) -> None:
    ids = [server.maildir.deliver(MESSAGES["utf8-headers"]).id for _ in range(3)]
    c = RawIMAP(server.portno)
    try:
        c.login()
        c.command(b"S", b"SELECT INBOX")
        _replace_with_directory(server, ids[1])
        untagged, done = c.command(b"F", b"FETCH 1:3 (BODY.PEEK[] BODYSTRUCTURE)")
        assert done.text.startswith(b"F NO [SERVERBUG]"), done.text
        assert [line.text.split(b" ", 2)[1] for line in untagged] == [b"1", b"3"]
        assert_well_formed(untagged)
        assert b"rror" not in done.text and b"directory" not in done.text.lower()
        untagged, done = c.command(b"N", b"NOOP")
        assert done.text.startswith(b"N OK")
        # Any other command that trips on it answers too, never with the exception's text.
        untagged, done = c.command(b"C", b"COPY 2 Trash")
        assert done.text.startswith(b"C NO [SERVERBUG]"), done.text
        assert b"directory" not in done.text.lower()
        untagged, done = c.command(b"T", b"SEARCH TEXT hallo")
        assert done.text.startswith(b"T NO [SERVERBUG]"), done.text
        _, done = c.command(b"N", b"NOOP")
        assert done.text.startswith(b"N OK")
    finally:
        c.close()


def test_imaplib_reads_the_8bit_answers(server: Server) -> None:
    """What a stock client library does with these answers: every item parses."""
    for message in MESSAGES.values():
        server.maildir.deliver(message)
    c = server.client()
    try:
        typ, _ = c.select("INBOX")
        assert typ == "OK"
        typ, answers = c.fetch("1:*", "(ENVELOPE BODYSTRUCTURE RFC822.SIZE)")
        assert typ == "OK"
        heads = [d[0] if isinstance(d, tuple) else d for d in answers]
        starts = [h for h in heads if isinstance(h, bytes) and re.match(rb"\d+ \(", h)]
        assert len(starts) == len(MESSAGES)
        assert c.noop()[0] == "OK"
    finally:
        c.logout()


def test_imaplib_fetch_of_a_literal_size_matches(server: Server) -> None:
    server.maildir.deliver(MESSAGES["lf-only-multipart"])
    c = server.client()
    try:
        c.select("INBOX")
        typ, data = c.fetch("1", "(BODY.PEEK[])")
        assert typ == "OK"
        assert isinstance(data[0], tuple)
        assert data[0][1] == crlf(MESSAGES["lf-only-multipart"])
    finally:
        c.logout()


def test_a_long_fetch_reaches_a_slow_reader_whole(server: Server) -> None:
    """More messages than one rendering batch, each with a large part sent inline and the
    whole message streamed, to a client with a small receive window: the server pauses
    and resumes many times, and every byte arrives."""
    body = b"".join(b"line %06d\r\n" % i for i in range(24_000))  # 288 KB
    data = b"From: a@example.org\r\nSubject: long\r\n\r\n" + body
    for _ in range(70):
        server.maildir.deliver(data)
    c = RawIMAP(server.portno, rcvbuf=32768)
    try:
        c.login()
        select(c)
        untagged, done = c.command(b"F", b"FETCH 1:* (BODY.PEEK[1] BODY.PEEK[])")
        assert done.text.startswith(b"F OK"), done.text
        assert len(untagged) == 70
        assert all(line.literals == [body, data] for line in untagged)
    finally:
        c.close()
