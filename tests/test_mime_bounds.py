"""MIME bombs: bounded parsing (maildir/mimetree.py) in IMAP and the local API.

A 64 KB message of 1,000 nested multiparts and a message of 50,000 parts are parsed to
at most the limits (depth, parts, header lines), the rest being one opaque part; IMAP
answers BODYSTRUCTURE and BODY[1] and the local API lists and reads them, while another
session is served.
"""

from __future__ import annotations

import json
import threading
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.threads import deferToThread
from twisted.web.server import Site

from maildir import Maildir
from maildir.message import get_attachment, parse_detail, summarize
from maildir.mimetree import DEFAULT_LIMITS, MIMELimits, Part, parse
from tests.imapraw import RawIMAP
from tests.test_imap import Server
from webapi.local.app import LocalAPI

TOKEN = "local-test-token"
MESSAGES = "/localapi/v0/mail/messages"


def nested(depth: int = 1000) -> bytes:
    out = [b"From: a@example.org\r\nTo: b@example.org\r\nSubject: nested\r\nMIME-Version: 1.0\r\n"]
    for i in range(depth):
        out.append(b'Content-Type: multipart/mixed; boundary="b%d"\r\n\r\n--b%d\r\n' % (i, i))
    out.append(b"Content-Type: text/plain\r\n\r\ninnermost\r\n")
    out.extend(b"--b%d--\r\n" % i for i in reversed(range(depth)))
    return b"".join(out)


def wide(parts: int = 50_000) -> bytes:
    out = [
        b"From: a@example.org\r\nTo: b@example.org\r\nSubject: wide\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n'
    ]
    out.extend(b"--b\r\nContent-Type: text/plain\r\n\r\npart %d\r\n" % i for i in range(parts))
    out.append(b"--b--\r\nepilogue\r\n")
    return b"".join(out)


def walk(part: Part) -> Iterator[Part]:
    yield part
    for child in part.children:
        yield from walk(child)


# -- the parser ---------------------------------------------------------------------------


def test_nested_bomb_stops_at_the_depth_limit() -> None:
    data = nested()
    assert 60_000 < len(data) < 70_000
    tree = parse(data)
    parts = list(walk(tree))
    assert max(p.depth for p in parts) == DEFAULT_LIMITS.max_depth
    deepest = [p for p in parts if p.depth == DEFAULT_LIMITS.max_depth]
    assert len(deepest) == 1 and deepest[0].opaque and not deepest[0].children
    assert deepest[0].content_type == "multipart/mixed"
    assert len(parts) == DEFAULT_LIMITS.max_depth + 1
    # The opaque part is everything inside its delimiters, up to its own close.
    assert data[deepest[0].end :].startswith(b"\r\n--b29--\r\n")


def test_wide_bomb_stops_at_the_part_limit() -> None:
    data = wide()
    tree = parse(data)
    assert tree.content_type == "multipart/mixed"
    limit = DEFAULT_LIMITS.max_parts
    assert len(tree.children) == limit  # the message, limit - 1 parts, one opaque rest
    assert not any(c.opaque for c in tree.children[:-1])
    rest = tree.children[-1]
    assert rest.opaque
    assert data[rest.start :].startswith(
        b"Content-Type: text/plain\r\n\r\npart %d\r\n" % (limit - 1)
    )
    assert data[rest.end :] == b"\r\n--b--\r\nepilogue\r\n"


def test_part_ranges_are_exact() -> None:
    data = (
        b"From: a\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\npreamble\r\n"
        b"--b\r\nContent-Type: text/plain\r\n\r\nhello\r\n--bogus\r\n"
        b"--b  \r\n\r\nno header\r\n"
        b"--b\r\nContent-Type: message/rfc822\r\n\r\nSubject: x\r\n"
        b"Content-Type: multipart/alternative; boundary=c\r\n\r\n--c\r\n\r\nalt\r\n--c--\r\n"
        b"\r\n--b--\r\nepilogue\r\n"
    )
    tree = parse(data)
    first, second, third = tree.children
    assert data[first.body : first.end] == b"hello\r\n--bogus"
    assert data[first.start : first.body] == b"Content-Type: text/plain\r\n\r\n"
    assert data[second.start : second.body] == b"\r\n"
    assert data[second.body : second.end] == b"no header"
    assert third.is_message
    inner = third.children[0]
    assert inner.content_type == "multipart/alternative"
    assert data[inner.children[0].body : inner.children[0].end] == b"alt"


def test_lf_only_and_headerless_parts() -> None:
    data = b"From: a\nContent-Type: multipart/mixed; boundary=b\n\n--b\nhello\n--b--\n"
    (only,) = parse(data).children
    assert data[only.start : only.body] == b""  # a first line that is no header field
    assert data[only.body : only.end] == b"hello"


def test_lines_that_only_look_like_delimiters_are_bounded() -> None:
    body = b"--bx\r\n" * 1000
    data = b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n\r\n" + body + b"--b--\r\n"
    assert len(parse(data).children) == 1
    # With fewer steps than such lines, the part runs to the end instead: still answered.
    few = parse(data, MIMELimits(max_false_delimiters=10))
    assert len(few.children) == 1 and few.children[0].end == len(data)


def test_header_lines_are_bounded() -> None:
    many = b"".join(b"X-F%d: v\r\n" % i for i in range(50))
    data = (
        b"Content-Type: multipart/mixed; boundary=b\r\n\r\n"
        + b"".join(
            b"--b\r\n" + many + b"Content-Type: multipart/mixed; boundary=c%d\r\n\r\n"
            b"--c%d\r\n\r\nx\r\n--c%d--\r\n" % (i, i, i)
            for i in range(10)
        )
        + b"--b--\r\n"
    )
    tree = parse(data, MIMELimits(max_header_lines=200))
    parts = list(walk(tree))
    assert any(p.opaque for p in parts)
    assert len(parts) < 10 * 2 + 1


@pytest.mark.parametrize("seed", range(20))
def test_never_raises_on_garbage(seed: int) -> None:
    import random

    rng = random.Random(seed)
    pieces = [b"--b", b"\r\n", b"\n", b"Content-Type: multipart/mixed; boundary=b", b":", b"x"]
    pieces += [b"Content-Type: message/rfc822", b"--b--", b"\r", b"\x00\xff"]
    data = b"".join(rng.choice(pieces) for _ in range(400))
    tree = parse(data)
    for part in walk(tree):
        assert 0 <= part.start <= part.body <= part.end <= len(data)


# -- the local API's parsing ---------------------------------------------------------------


def test_message_parsing_of_bombs_is_bounded() -> None:
    for data in (nested(), wide()):
        summary = summarize(data)
        assert summary.subject in ("nested", "wide")
        detail = parse_detail(data)
        assert len(detail.attachments) <= DEFAULT_LIMITS.max_parts
        rest = detail.attachments[-1]
        assert rest.content_type == "application/octet-stream"
        info, content = get_attachment(data, rest.index)
        assert info == rest and len(content) == rest.size_bytes
    assert parse_detail(wide()).body_text == "part 0"


# -- IMAP ------------------------------------------------------------------------------------


@pytest.fixture
def server(in_reactor: Any, tmp_path: Path) -> Iterator[Server]:
    s = Server(in_reactor, tmp_path / "mail")
    yield s
    s.stop()


def _select(c: RawIMAP, count: int) -> None:
    untagged, done = c.command(b"S", b"SELECT INBOX")
    assert done.text.startswith(b"S OK"), done.text
    assert any(line.text == b"* %d EXISTS\r\n" % count for line in untagged)


def _check_bombs(c: RawIMAP) -> None:
    untagged, done = c.command(b"F", b"FETCH 1:2 (BODYSTRUCTURE BODY.PEEK[1])")
    assert done.text.startswith(b"F OK"), done.text
    assert len(untagged) == 2
    nested_answer, wide_answer = untagged
    assert nested_answer.text.count(b'"application" "octet-stream"') == 1
    assert nested_answer.text.count(b'"mixed"') == DEFAULT_LIMITS.max_depth
    assert wide_answer.text.count(b'("text" "plain"') == DEFAULT_LIMITS.max_parts - 1
    assert wide_answer.text.count(b'"application" "octet-stream"') == 1
    assert wide_answer.literals == [b"part 0"]


def test_imap_answers_bombs_and_serves_another_session_meanwhile(server: Server) -> None:
    """Session A fetches both bombs and a 16 MB message but does not read; a FETCH can
    not finish before its client has read (16 MB do not fit in a 64 KB receive window
    and the server's send buffer), so A's FETCH is in progress while session B selects,
    fetches both bombs itself and gets NOOP answered; then A reads all of its answer."""
    big = b"From: a@example.org\r\nSubject: big\r\n\r\n" + (b"x" * 1022 + b"\r\n") * 16_384
    for data in (nested(), wide(), big):
        server.maildir.deliver(data)
    a = RawIMAP(server.portno, rcvbuf=65536)
    b = RawIMAP(server.portno)
    try:
        a.login()
        _select(a, 3)
        a.send(b"A FETCH 1:3 (BODYSTRUCTURE BODY.PEEK[1] BODY.PEEK[])")
        b.login()
        _select(b, 3)
        _check_bombs(b)
        _, done = b.command(b"N", b"NOOP")
        assert done.text.startswith(b"N OK")
        untagged, done = a.until_tagged(b"A")
        assert done.text.startswith(b"A OK"), done.text
        assert [line.text[:10] for line in untagged] == [
            b"* 1 FETCH ",
            b"* 2 FETCH ",
            b"* 3 FETCH ",
        ]
        assert untagged[2].literals[-1] == big
        _check_bombs(a)
    finally:
        a.close()
        b.close()


# -- the local API ---------------------------------------------------------------------------


def _get(port: int, path: str) -> tuple[int, Any]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", headers={"Authorization": f"Bearer {TOKEN}"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return response.status, json.loads(response.read())


def test_local_api_lists_and_reads_bombs_and_serves_another_request_meanwhile(
    in_reactor: Any, tmp_path: Path
) -> None:
    """The listing of a page with both bombs is parsed in a worker thread and held there
    (after parsing) until a second request, made meanwhile, has been answered."""
    mdir = Maildir(tmp_path / "Maildir", hostname="testhost")
    ids = [mdir.deliver(data).id for data in (nested(), wide())]
    small = mdir.deliver(b"From: a@example.org\r\nSubject: small\r\n\r\nhi\r\n").id
    parsed = threading.Event()
    release = threading.Event()

    def run_blocking(fn: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
        def work() -> Any:
            result = fn(*args)
            if getattr(fn, "__name__", "") == "list":
                parsed.set()
                release.wait(30)
            return result

        return deferToThread(work)

    api = LocalAPI(mdir, TOKEN, run_blocking=run_blocking)

    def listen() -> Any:
        from twisted.internet import reactor

        tcp: Any = reactor
        return tcp.listenTCP(0, Site(api.resource()), interface="127.0.0.1")

    port = in_reactor(listen)
    portno = port.getHost().port
    listing: list[tuple[int, Any]] = []
    lister = threading.Thread(target=lambda: listing.append(_get(portno, MESSAGES)))
    try:
        lister.start()
        assert parsed.wait(30)  # the listing is parsed, in a worker thread, and held
        status, body = _get(portno, f"{MESSAGES}/{small}")
        assert status == 200 and body["subject"] == "small"
        assert not listing  # the listing is not answered yet: it waits on `release`
        for msg_id, subject in zip(ids, ("nested", "wide"), strict=True):
            status, body = _get(portno, f"{MESSAGES}/{msg_id}")
            assert status == 200 and body["subject"] == subject
            assert body["attachments"][-1]["content_type"] == "application/octet-stream"
    finally:
        release.set()
        lister.join(30)
        in_reactor(port.stopListening)
    status, body = listing[0]
    assert status == 200 and body["total"] == 3
    assert {m["subject"] for m in body["messages"]} == {"nested", "wide", "small"}
