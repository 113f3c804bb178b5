"""Fuzzing the IMAP server: random lines and mutations of valid commands, before and after
login, on a real server. Every response line must be well-formed, every command with a
valid tag must get exactly one tagged OK/NO/BAD, the server must not hang up except on
LOGOUT, and nothing may reach the log as a traceback or an unhandled error."""

from __future__ import annotations

import re
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.logger import globalLogPublisher

from tests.test_imap import SIMPLE, Server
from tests.test_imap_abuse import LogCapture

_TAG = re.compile(rb"[\x21\x23\x24\x26\x27\x2c-\x5b\x5d-\x7a\x7c\x7e]+")
_TAGGED = re.compile(rb"([^ ]+) (OK|NO|BAD)( [\x20-\x7e]*)?\r\n")
_UNTAGGED = re.compile(rb"\* [\x20-\x7e]*\r\n")
_CONTINUATION = re.compile(rb"\+( [\x20-\x7e]*)?\r\n")
_LITERAL_AT_END = re.compile(rb"\{([0-9]+)\}\r\n$")
_ANNOUNCED = re.compile(rb"\{([0-9]+)\}$")

VALID = [
    b"NOOP",
    b"CAPABILITY",
    b"LOGIN bob secret",
    b'LOGIN "bob" {6}',
    b"AUTHENTICATE PLAIN",
    b"SELECT INBOX",
    b'EXAMINE "INBOX"',
    b'LIST "" "*"',
    b'LSUB "" "%"',
    b"STATUS INBOX (MESSAGES UNSEEN UIDNEXT)",
    b"CREATE Foo.Bar",
    b"RENAME Foo Baz",
    b"SUBSCRIBE Junk",
    b"FETCH 1:* (FLAGS UID RFC822.SIZE INTERNALDATE)",
    b"UID FETCH 1:* (FLAGS)",
    b"FETCH 1 (BODY.PEEK[HEADER.FIELDS (SUBJECT FROM)] BODYSTRUCTURE ENVELOPE)",
    b"FETCH 1 (BODY[1.MIME] BODY.PEEK[TEXT]<0.10>)",
    b'SEARCH OR FROM "alice" NOT (SUBJECT x) SINCE 1-Feb-2020',
    b"UID SEARCH CHARSET UTF-8 TEXT {3}",
    b"SEARCH UID 1:*,2 LARGER 10 HEADER Subject hello",
    b"STORE 1 +FLAGS.SILENT (\\Seen \\Flagged)",
    b"UID STORE 1 -FLAGS (\\Deleted)",
    b"COPY 1 Trash",
    b"UID COPY 1:* Junk",
    b'APPEND INBOX (\\Seen) "01-Jan-2024 10:00:00 +0000" {12}',
    b"APPEND Drafts {0}",
    b"IDLE",
    b"CHECK",
    b"NAMESPACE",
    b"CLOSE",
    b"EXPUNGE",
    b"UNSELECT",
]
SPECIAL = list(b'(){}[]"\\*%+:,.<> -&0123456789\x00\x7f\x80\xff\r\n\t') + list(b"AZaz")


@st.composite
def mutated(draw: Any) -> bytes:
    line = bytearray(b"T1 " + draw(st.sampled_from(VALID)))
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.sampled_from(["insert", "delete", "replace", "repeat"]))
        at = draw(st.integers(0, len(line)))
        byte = draw(st.sampled_from(SPECIAL) | st.integers(0, 255))
        if kind == "insert":
            line.insert(at, byte)
        elif kind == "delete" and at < len(line):
            del line[at]
        elif kind == "replace" and at < len(line):
            line[at] = byte
        elif kind == "repeat":
            piece = bytes(line[at : at + draw(st.integers(1, 8))])
            line[at:at] = piece * draw(st.integers(1, 200))
    return bytes(line)


LINES = st.one_of(
    mutated(),
    st.binary(max_size=120),
    st.builds(lambda b: b"T1 " + b, st.binary(max_size=60)),
)


class Session:
    """One raw connection that checks every byte the server sends."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.file = self.sock.makefile("rb")
        greeting = self.response()
        assert greeting.startswith(b"* OK"), greeting

    def response(self) -> bytes:
        """One response line (literals read and left out), checked for form."""
        text = b""
        while True:
            raw = self.file.readline()
            if not raw:
                raise ConnectionError("the server hung up")
            text += raw
            m = _LITERAL_AT_END.search(raw)
            if m is None:
                break
            data = self.file.read(int(m.group(1)))
            assert len(data) == int(m.group(1))
        assert raw.endswith(b"\r\n") and b"\r" not in raw[:-2], raw
        flat = re.sub(rb"\{[0-9]+\}\r\n", b"{}", text)
        assert (
            _TAGGED.fullmatch(flat) or _UNTAGGED.fullmatch(flat) or _CONTINUATION.fullmatch(flat)
        ), text
        return text

    def command(self, line: bytes) -> list[bytes]:
        """Send `line` and answer continuations until its tagged answer (or, for a line
        without a valid tag, an untagged BAD); all responses read."""
        self.sock.sendall(line + b"\r\n")
        tag = line.split(b" ", 1)[0]
        valid_tag = _TAG.fullmatch(tag) is not None and b"\x00" not in tag
        last = line
        seen: list[bytes] = []
        while True:
            text = self.response()
            seen.append(text)
            if text.startswith(b"+"):
                m = _ANNOUNCED.search(last)
                if m is not None:
                    last = b"x" * int(m.group(1))
                    self.sock.sendall(last + b"\r\n")
                elif b"IDLE" in line.upper():
                    self.sock.sendall(b"DONE\r\n")
                else:
                    self.sock.sendall(b"*\r\n")
                continue
            if valid_tag and text.startswith(tag + b" "):
                return seen
            if not valid_tag and text.startswith(b"* BAD"):
                return seen

    def check(self, line: bytes) -> None:
        seen = self.command(line)
        seen += self.command(b"ZZ NOOP")  # anything late or doubled arrives before this
        tag = line.split(b" ", 1)[0]
        if _TAG.fullmatch(tag) is not None and tag != b"ZZ":
            answers = [t for t in seen if t.startswith(tag + b" ")]
            assert len(answers) == 1, seen
            assert _TAGGED.fullmatch(answers[0]), answers

    def close(self) -> None:
        self.file.close()
        self.sock.close()


@pytest.fixture
def server(in_reactor: Any, tmp_path: Path) -> Iterator[Server]:
    s = Server(
        in_reactor,
        tmp_path / "mail",
        max_message_size=64 * 1024,
        max_sessions_per_user=0,
        max_sessions_per_address=0,
    )
    s.maildir.deliver(SIMPLE)
    yield s
    s.stop()


@pytest.fixture
def logged() -> Iterator[LogCapture]:
    capture = LogCapture()
    globalLogPublisher.addObserver(capture)
    yield capture
    globalLogPublisher.removeObserver(capture)


@settings(
    max_examples=400,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(state=st.sampled_from(["unauth", "auth", "select"]), line=LINES)
def test_fuzz_lines(server: Server, logged: LogCapture, state: str, line: bytes) -> None:
    line = line.replace(b"\r\n", b"  ")
    if line.endswith(b"\r"):
        line = line[:-1] + b" "
    s = Session(server.portno)
    try:
        if state != "unauth":
            s.command(b"L LOGIN bob secret")
        if state == "select":
            s.command(b"S SELECT INBOX")
        parts = line.split(b" ", 2)
        if len(parts) > 1 and parts[1].upper() == b"LOGOUT":
            return
        s.check(line)
    finally:
        s.close()
    assert logged.problems() == []
