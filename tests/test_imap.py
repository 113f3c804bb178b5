"""IMAP server tests: a real listening server driven by imaplib."""

from __future__ import annotations

import imaplib
import re
import socket
import time
from collections.abc import Callable, Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import reactor

from connector.imap import make_imap_factory
from maildir import Maildir

SIMPLE = (
    b"From: Alice <alice@example.org>\r\n"
    b"To: bob@example.org\r\n"
    b"Subject: Hello there\r\n"
    b"Message-ID: <m1@example.org>\r\n"
    b"Date: Mon, 01 Jan 2024 10:00:00 +0000\r\n"
    b"\r\n"
    b"Line one\r\nLine two\r\n"
)


def _multipart() -> bytes:
    m = EmailMessage()
    m["From"] = "carol@example.org"
    m["To"] = "bob@example.org"
    m["Subject"] = "With attachment"
    m.set_content("See attached.\n")
    m.add_attachment(
        b"\x00\x01binary" * 10, maintype="application", subtype="pdf", filename="doc.pdf"
    )
    return m.as_bytes(policy=m.policy.clone(linesep="\r\n"))


def _auth(user: str, password: str) -> bool:
    return (user, password) == ("bob", "secret")


class Server:
    def __init__(self, in_reactor: Any, root: Path, **kw: Any) -> None:
        self.in_reactor = in_reactor
        self.root = root
        self.kw = kw
        self.start()

    def start(self) -> None:
        self.maildir = Maildir(self.root, hostname="testhost")
        factory = make_imap_factory(self.maildir, _auth, **self.kw)
        self.factory: Any = factory
        self.port = self.in_reactor(
            lambda: reactor.listenTCP(0, factory, interface="127.0.0.1")  # type: ignore[attr-defined,arg-type]
        )
        self.portno = self.port.getHost().port

    def stop(self) -> None:
        self.in_reactor(self.port.stopListening)

    def client(self, login: bool = True) -> imaplib.IMAP4:
        c = imaplib.IMAP4("127.0.0.1", self.portno, timeout=10)
        if login:
            c.login("bob", "secret")
        return c


@pytest.fixture
def server(in_reactor: Any, tmp_path: Path) -> Iterator[Server]:
    s = Server(in_reactor, tmp_path / "mail")
    yield s
    s.stop()


@pytest.fixture
def client(server: Server) -> Iterator[imaplib.IMAP4]:
    c = server.client()
    yield c
    try:
        c.logout()
    except Exception:
        pass


def _ok(result: tuple[str, Any]) -> Any:
    typ, data = result
    assert typ == "OK", (typ, data)
    return data


def _fetch_literal(data: list[Any]) -> bytes:
    parts = [d for d in data if isinstance(d, tuple)]
    assert parts, data
    return parts[0][1]


def test_capability_and_login(server: Server) -> None:
    c = server.client(login=False)
    caps = c.capabilities
    assert "IMAP4REV1" in caps and "AUTH=PLAIN" in caps and "IDLE" in caps
    with pytest.raises(imaplib.IMAP4.error, match=r"AUTHENTICATIONFAILED"):
        c.login("bob", "wrong")
    assert _ok(c.login("bob", "secret"))
    c.logout()


def test_authenticate_plain(server: Server) -> None:
    c = server.client(login=False)
    typ, _ = c.authenticate("PLAIN", lambda _: b"\0bob\0secret")
    assert typ == "OK"
    assert c.state == "AUTH"
    c.logout()
    c = server.client(login=False)
    with pytest.raises(imaplib.IMAP4.error, match=r"AUTHENTICATIONFAILED"):
        c.authenticate("PLAIN", lambda _: b"\0bob\0nope")
    c.logout()


def test_list_and_lsub(client: imaplib.IMAP4) -> None:
    lines = [x.decode() for x in _ok(client.list())]
    names = [re.search(r'"\." "?([^"]*)"?$', line).group(1) for line in lines]  # type: ignore[union-attr]
    assert names == ["INBOX", "Drafts", "Junk", "Sent", "Trash"]
    assert any("\\Trash" in line and "Trash" in line for line in lines)
    assert len(_ok(client.lsub())) == 5
    delim = _ok(client.list('""', '""'))
    assert b'"."' in delim[0]


def test_select_status_and_uids(server: Server, client: imaplib.IMAP4) -> None:
    server.maildir.deliver(SIMPLE)
    server.maildir.deliver(SIMPLE)
    data = _ok(client.select("INBOX"))
    assert data == [b"2"]
    validity = server.maildir.folder("INBOX").uidvalidity
    assert client.untagged_responses["UIDVALIDITY"] == [str(validity).encode()]
    assert client.untagged_responses["UIDNEXT"] == [b"3"]
    st = _ok(client.status("INBOX", "(MESSAGES UNSEEN UIDNEXT UIDVALIDITY)"))[0]
    assert b"MESSAGES 2" in st and b"UNSEEN 2" in st and b"UIDNEXT 3" in st
    assert _ok(client.uid("SEARCH", "ALL")) == [b"1 2"]
    typ, _ = client.select("Nope")
    assert typ == "NO"


def test_fetch_items(server: Server, client: imaplib.IMAP4) -> None:
    info = server.maildir.deliver(SIMPLE, internaldate=1_700_000_000.0)
    _ok(client.select("INBOX"))
    data = _ok(client.fetch("1", "(FLAGS UID RFC822.SIZE INTERNALDATE)"))[0]
    assert b"UID 1" in data and b"RFC822.SIZE %d" % len(SIMPLE) in data
    assert b'INTERNALDATE "14-Nov-2023 22:13:20 +0000"' in data
    assert b"\\Recent" in data
    env = _ok(client.fetch("1", "(ENVELOPE)"))[0]
    assert b'"Hello there"' in env and b'(("Alice" NIL "alice" "example.org"))' in env
    assert b'"<m1@example.org>"' in env
    assert _fetch_literal(_ok(client.fetch("1", "(BODY.PEEK[])"))) == SIMPLE
    assert "\\Seen" not in server.maildir.folder("INBOX").get(info.id).flags
    header = _fetch_literal(_ok(client.fetch("1", "(BODY.PEEK[HEADER])")))
    assert header == SIMPLE.split(b"\r\n\r\n")[0] + b"\r\n\r\n"
    text = _fetch_literal(_ok(client.fetch("1", "(BODY.PEEK[TEXT])")))
    assert text == b"Line one\r\nLine two\r\n"
    subj = _fetch_literal(_ok(client.fetch("1", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")))
    assert subj == b"Subject: Hello there\r\n\r\n"
    partial = _ok(client.fetch("1", "(BODY.PEEK[]<0.4>)"))
    assert partial[0][0].endswith(b"BODY[]<0> {4}") and partial[0][1] == b"From"
    bs = _ok(client.fetch("1", "(BODYSTRUCTURE)"))[0]
    assert b'("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 20 2' in bs
    # BODY[] (not PEEK) on a read-write SELECT sets \Seen and reports it.
    full = _ok(client.fetch("1", "(BODY[])"))
    assert _fetch_literal(full) == SIMPLE
    assert b"\\Seen" in b"".join(x[0] if isinstance(x, tuple) else x for x in full)
    stored = server.maildir.folder("INBOX").get(info.id)
    assert stored.flags == {"\\Seen"} and stored.path.name.endswith(":2,S")
    assert _fetch_literal(_ok(client.fetch("1", "(RFC822)"))) == SIMPLE


def test_bodystructure_multipart(server: Server, client: imaplib.IMAP4) -> None:
    raw = _multipart()
    server.maildir.deliver(raw)
    _ok(client.select("INBOX"))
    bs = _ok(client.fetch("1", "(BODYSTRUCTURE)"))[0]
    assert b'("text" "plain" ("charset" "utf-8") NIL NIL "7bit"' in bs
    assert b'("application" "pdf" NIL NIL NIL "base64"' in bs
    assert b'("attachment" ("filename" "doc.pdf"))' in bs
    assert b'"mixed" ("boundary" ' in bs
    part2 = _fetch_literal(_ok(client.fetch("1", "(BODY.PEEK[2])")))
    import base64

    assert base64.b64decode(part2) == b"\x00\x01binary" * 10
    mime = _fetch_literal(_ok(client.fetch("1", "(BODY.PEEK[2.MIME])")))
    assert b"Content-Type: application/pdf" in mime and mime.endswith(b"\r\n\r\n")


def test_store_flags_rename_file(server: Server, client: imaplib.IMAP4) -> None:
    info = server.maildir.deliver(SIMPLE)
    _ok(client.select("INBOX"))
    data = _ok(client.store("1", "+FLAGS", "(\\Seen)"))
    assert b"\\Seen" in data[0]
    cur = server.maildir.folder("INBOX").get(info.id)
    assert cur.path.name == f"{info.id}:2,S" and cur.path.parent.name == "cur"
    _ok(client.store("1", "+FLAGS.SILENT", "(\\Flagged)"))
    assert server.maildir.folder("INBOX").get(info.id).path.name.endswith(":2,FS")
    _ok(client.store("1", "-FLAGS", "(\\Seen)"))
    assert server.maildir.folder("INBOX").get(info.id).path.name.endswith(":2,F")
    _ok(client.uid("STORE", "1", "FLAGS", "(\\Answered)"))
    assert server.maildir.folder("INBOX").get(info.id).flags == {"\\Answered"}
    assert _ok(client.search(None, "ANSWERED")) == [b"1"]
    assert _ok(client.search(None, "UNANSWERED")) == [b""]


def test_examine_is_read_only(server: Server, client: imaplib.IMAP4) -> None:
    info = server.maildir.deliver(SIMPLE)
    _ok(client.select("INBOX", readonly=True))
    assert _fetch_literal(_ok(client.fetch("1", "(BODY[])"))) == SIMPLE
    assert server.maildir.folder("INBOX").get(info.id).flags == frozenset()
    assert server.maildir.folder("INBOX").get(info.id).path.parent.name == "new"
    typ, data = client.store("1", "+FLAGS", "(\\Seen)")
    assert typ == "NO" and b"READ-ONLY" in data[0]


def test_delete_and_expunge(server: Server, client: imaplib.IMAP4) -> None:
    a = server.maildir.deliver(SIMPLE)
    b = server.maildir.deliver(SIMPLE)
    c = server.maildir.deliver(SIMPLE)
    _ok(client.select("INBOX"))
    _ok(client.store("1,3", "+FLAGS", "(\\Deleted)"))
    data = _ok(client.expunge())
    assert data == [b"3", b"1"]
    assert not a.path.exists() and not c.path.exists() and b.path.exists()
    assert [m.id for m in server.maildir.folder("INBOX").messages()] == [b.id]
    assert _ok(client.uid("SEARCH", "ALL")) == [b"2"]
    _ok(client.store("1", "+FLAGS", "(\\Deleted)"))
    _ok(client.close())
    assert server.maildir.folder("INBOX").messages() == []


def test_star_to_star_is_the_last_message(server: Server, client: imaplib.IMAP4) -> None:
    for _ in range(3):
        server.maildir.deliver(SIMPLE)
    _ok(client.select("INBOX"))
    # RFC 3501: "*" is the largest number in use, in a range as alone.
    assert _ok(client.uid("FETCH", "*:*", "(UID)")) == [b"3 (UID 3)"]
    assert _ok(client.fetch("*:*", "(UID)")) == [b"3 (UID 3)"]
    assert _ok(client.uid("FETCH", "2,*:*", "(UID)")) == [b"2 (UID 2)", b"3 (UID 3)"]
    assert _ok(client.uid("STORE", "*:*", "+FLAGS", "(\\Flagged)"))
    assert b"\\Flagged" in _ok(client.fetch("3", "(FLAGS)"))[0]
    with pytest.raises(imaplib.IMAP4.error, match="BAD"):
        client.fetch("0:*", "(UID)")


def test_a_listing_fetch_goes_in_slices_in_order_and_holds_later_commands(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    from connector.imap import server as imap_server

    monkeypatch.setattr(imap_server, "SLICE_SECONDS", 0.0)  # a new turn every 256 messages
    for n in range(600):
        server.maildir.deliver(SIMPLE, flags=("\\Seen",) if n % 2 else ())
    with socket.create_connection(("127.0.0.1", server.portno), timeout=10) as sock:
        sock.sendall(b"a LOGIN bob secret\r\nb SELECT INBOX\r\n")
        sock.sendall(b"c UID FETCH 1:* (FLAGS RFC822.SIZE)\r\nd NOOP\r\n")
        data = b""
        while b"\r\nd " not in data:
            chunk = sock.recv(65536)
            assert chunk, data[-200:]
            data += chunk
    lines = data.split(b"\r\n")
    fetched = [line for line in lines if b" FETCH (" in line]
    assert len(fetched) == 600
    size = len(SIMPLE)
    for n, line in enumerate(fetched, 1):
        match = re.fullmatch(
            rb"\* (\d+) FETCH \(FLAGS \(([^)]*)\) RFC822.SIZE (\d+) UID (\d+)\)", line
        )
        assert match, line
        assert [int(match[1]), int(match[3]), int(match[4])] == [n, size, n]
        assert (b"\\Seen" in match[2].split()) == (n % 2 == 0)  # \Recent too, on this select
    done = [line[:1] for line in lines if line[:2] in (b"c ", b"d ")]
    assert done == [b"c", b"d"]  # the NOOP waited for the whole FETCH
    assert lines.index(fetched[-1]) < next(i for i, x in enumerate(lines) if x.startswith(b"c OK"))


def test_a_listing_fetch_stops_when_the_client_leaves(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    import gc

    from connector.imap import server as imap_server

    monkeypatch.setattr(imap_server, "SLICE_SECONDS", 0.0)
    monkeypatch.setattr(imap_server, "SLICE_CHECK", 1)  # a turn per message
    for _ in range(1000):
        server.maildir.deliver(SIMPLE)
    was_enabled = gc.isenabled()
    gc.enable()
    try:
        with socket.create_connection(("127.0.0.1", server.portno), timeout=10) as sock:
            sock.sendall(b"a LOGIN bob secret\r\nb SELECT INBOX\r\n")
            data = b""
            while b"b OK" not in data:
                data += sock.recv(65536)
            [session] = server.factory.sessions
            sock.sendall(b"c UID FETCH 1:* (FLAGS)\r\n")
            sock.recv(1024)  # the first slice is on its way: leave now
        # The server notices, stops at its next slice, lets the collector run again, and
        # arms no idle timer for a connection that is gone.
        deadline = time.monotonic() + 10
        while not gc.isenabled() and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)
        assert gc.isenabled()
        assert session._TimeoutMixin__timeoutCall is None
    finally:
        (gc.enable if was_enabled else gc.disable)()


def test_uids_stable_across_restart(server: Server) -> None:
    for _ in range(3):
        server.maildir.deliver(SIMPLE)
    server.maildir.folder("INBOX").remove(server.maildir.folder("INBOX").messages()[0].id)
    c = server.client()
    _ok(c.select("INBOX"))
    before = _ok(c.fetch("1:*", "(UID)"))
    validity = c.untagged_responses["UIDVALIDITY"]
    c.logout()
    server.stop()
    server.start()
    c = server.client()
    _ok(c.select("INBOX"))
    assert _ok(c.fetch("1:*", "(UID)")) == before == [b"1 (UID 2)", b"2 (UID 3)"]
    assert c.untagged_responses["UIDVALIDITY"] == validity
    c.logout()


def test_append_and_copy(server: Server, client: imaplib.IMAP4) -> None:
    _ok(client.select("INBOX"))
    _ok(client.append("INBOX", "(\\Seen)", '"17-Jul-1996 02:44:25 -0700"', SIMPLE))
    assert client.untagged_responses.get("EXISTS")[-1] == b"1"  # type: ignore[index]
    (m,) = server.maildir.folder("INBOX").messages()
    assert m.flags == {"\\Seen"} and m.path.read_bytes() == SIMPLE
    assert m.internaldate == 837596665.0
    typ, data = client.append("Nope", None, None, SIMPLE)
    assert typ == "NO" and b"TRYCREATE" in data[0]
    _ok(client.copy("1", "Trash"))
    (t,) = server.maildir.folder("Trash").messages()
    assert t.path.read_bytes() == SIMPLE and t.flags == {"\\Seen"}
    _ok(client.uid("COPY", "1", "Junk"))
    assert len(server.maildir.folder("Junk").messages()) == 1
    typ, data = client.copy("1", "Nope")
    assert typ == "NO" and b"TRYCREATE" in data[0]


def test_append_too_big_is_refused_without_data(in_reactor: Any, tmp_path: Path) -> None:
    srv = Server(in_reactor, tmp_path / "m", max_message_size=1000)
    try:
        c = srv.client()
        assert "APPENDLIMIT=1000" in c.capabilities
        typ, data = c.append("INBOX", None, None, b"x" * 2000)
        assert typ == "NO" and b"TOOBIG" in data[0]
        assert _ok(c.noop()) is not None
        assert srv.maildir.folder("INBOX").messages() == []
        c.logout()
    finally:
        srv.stop()


def test_create_rename_delete(client: imaplib.IMAP4, server: Server) -> None:
    _ok(client.create("Work"))
    typ, _ = client.create("Work")
    assert typ == "NO"
    typ, _ = client.create("../evil")
    assert typ == "NO"
    _ok(client.rename("Work", "Jobs"))
    assert "Jobs" in server.maildir.list_folders()
    _ok(client.delete("Jobs"))
    assert "Jobs" not in server.maildir.list_folders()
    typ, _ = client.delete("INBOX")
    assert typ == "NO"


def test_noop_reports_new_and_expunged(server: Server, client: imaplib.IMAP4) -> None:
    first = server.maildir.deliver(SIMPLE)
    _ok(client.select("INBOX"))
    server.maildir.deliver(SIMPLE)
    server.maildir.folder("INBOX").remove(first.id)
    _ok(client.noop())
    assert client.untagged_responses.get("EXPUNGE") == [b"1"]
    assert client.untagged_responses.get("EXISTS")[-1] == b"1"  # type: ignore[index]
    assert _ok(client.fetch("1", "(UID)")) == [b"1 (UID 2)"]


def _raw(server: Server) -> tuple[socket.socket, Callable[[], bytes]]:
    s = socket.create_connection(("127.0.0.1", server.portno), timeout=10)
    f = s.makefile("rb")
    assert f.readline().startswith(b"* OK")

    def line() -> bytes:
        return f.readline()

    return s, line


def test_negative_literal_is_bad_and_connection_stays_sane(server: Server) -> None:
    s, line = _raw(server)
    try:
        s.sendall(b"a1 LOGIN {-100}\r\n")
        assert line().startswith(b"a1 BAD")
        s.sendall(b"a2 LOGIN {+5}\r\n")
        assert line().startswith(b"a2 BAD")
        s.sendall(b"a3 NOOP\r\n")
        assert line().startswith(b"a3 OK")
        s.sendall(b"a4 LOGIN bob secret\r\n")
        assert line().startswith(b"a4 OK")
        s.sendall(b"a5 APPEND INBOX {-1}\r\n")
        assert line().startswith(b"a5 BAD")
        s.sendall(b"a6 NOOP\r\n")
        assert line().startswith(b"a6 OK")
    finally:
        s.close()


def test_search(server: Server, client: imaplib.IMAP4) -> None:
    server.maildir.deliver(SIMPLE)
    server.maildir.deliver(_multipart(), flags=["\\Seen"])
    _ok(client.select("INBOX"))
    assert _ok(client.search(None, "SUBJECT", '"hello"')) == [b"1"]
    assert _ok(client.search(None, "FROM", "carol")) == [b"2"]
    assert _ok(client.search(None, "UNSEEN")) == [b"1"]
    assert _ok(client.search(None, "OR", "SEEN", "BODY", '"line two"')) == [b"1 2"]
    assert _ok(client.search(None, "NOT", "2")) == [b"1"]
    assert _ok(client.uid("SEARCH", "UID", "2:*")) == [b"2"]
    assert _ok(client.search(None, "SENTSINCE", "1-Jan-2024", "SENTBEFORE", "2-Jan-2024")) == [b"1"]
    with pytest.raises(imaplib.IMAP4.error, match="unsupported search key"):
        client.search(None, "BOGUS")
    assert _ok(client.noop()) is not None
