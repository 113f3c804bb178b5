"""Over real sockets: the SSE stream (order, pings, resume with Last-Event-ID), IMAP and the
API seeing each other's changes (IDLE clients told at once), and Rspamd training."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from klein import Klein
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.web.iweb import IRequest
from twisted.web.server import Site

from connector.events import EventLog, InboundEvents
from connector.imap import IMAPFactory, make_imap_factory
from maildir import Maildir
from tests.test_localapi import MESSAGES, RICH, TOKEN, plain
from webapi.local.app import LocalAPI
from webapi.local.spam import RspamdTrainer

STREAM = "/localapi/v0/mail/stream"


class Raw:
    """A blocking HTTP/1.0 client that reads an event stream frame by frame."""

    def __init__(self, port: int, path: str, headers: dict[str, str] | None = None) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        lines = [f"GET {path} HTTP/1.0", "Host: 127.0.0.1", f"Authorization: Bearer {TOKEN}"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        self.buffer = b""
        head = self.read_until(b"\r\n\r\n")
        self.status = int(head.split(b" ", 2)[1])
        self.headers = head.decode("latin-1").lower()

    def read_until(self, marker: bytes, timeout: float = 10.0) -> bytes:
        deadline = time.monotonic() + timeout
        while marker not in self.buffer:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError(self.buffer)
            self.buffer += chunk
        frame, _, self.buffer = self.buffer.partition(marker)
        return frame

    def frame(self) -> str:
        return self.read_until(b"\n\n").decode()

    def event(self) -> tuple[int, dict[str, Any]]:
        """The next data event (comments and the retry hint skipped)."""
        while True:
            fields: dict[str, str] = {}
            for line in self.frame().split("\n"):
                name, _, value = line.partition(": ")
                if name in ("id", "data", "event"):
                    fields[name] = value
            if "data" in fields and "event" not in fields:
                return int(fields["id"]), json.loads(fields["data"])

    def nothing_within(self, seconds: float) -> bool:
        self.sock.settimeout(seconds)
        try:
            chunk = self.sock.recv(65536)
        except TimeoutError:
            return True
        self.buffer += chunk
        return False

    def close(self) -> None:
        self.sock.close()


class Device:
    def __init__(self, in_reactor: Any, root: Path, keep: int = 1000) -> None:
        self.in_reactor = in_reactor
        self.maildir = Maildir(root / "Maildir", hostname="testhost")
        self.events = InboundEvents(
            EventLog(root / "events.jsonl", time.time, keep=keep), self.maildir, self._threads
        )
        self.ping_clock = Clock()
        imap = make_imap_factory(self.maildir, lambda u, p: (u, p) == ("bob", "secret"))
        assert isinstance(imap, IMAPFactory)
        self.imap_factory = imap
        self.api = LocalAPI(
            self.maildir,
            TOKEN,
            events=self.events,
            clock=self.ping_clock,
            on_change=imap.notify_changed,
        )
        reactor = in_reactor.reactor
        self.http = in_reactor(reactor.listenTCP, 0, Site(self.api.resource()), 50, "127.0.0.1")
        self.imap = in_reactor(reactor.listenTCP, 0, imap, 50, "127.0.0.1")
        self.port = self.http.getHost().port
        self.api.base_url = f"http://127.0.0.1:{self.port}"

    @staticmethod
    def _threads(fn: Any, *args: Any) -> defer.Deferred[Any]:
        from twisted.internet.threads import deferToThread

        return deferToThread(fn, *args)

    def deliver(self, subject: str) -> str:
        info = self.maildir.deliver(plain(subject))
        self.in_reactor(self.events.delivered, info)
        return info.id

    def subscribers(self) -> int:
        return len(self.events._subscribers)

    def stop(self) -> None:
        self.in_reactor(self.http.stopListening)
        self.in_reactor(self.imap.stopListening)


@pytest.fixture
def device(in_reactor: Any, tmp_path: Path) -> Iterator[Device]:
    d = Device(in_reactor, tmp_path)
    yield d
    d.stop()


def wait_until(predicate: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


# -- the stream --------------------------------------------------------------------------------


def test_stream_delivers_events_in_order_with_pings(device: Device) -> None:
    device.deliver("before anyone listens")
    client = Raw(device.port, STREAM)
    assert client.status == 200
    assert "content-type: text/event-stream" in client.headers
    assert "cache-control: no-store" in client.headers
    assert client.frame() == "retry: 3000\n: connected"
    first = device.deliver("one")
    second = device.deliver("two")
    assert client.event() == (2, client_event(device, 2))
    event_id, body = client.event()
    assert event_id == 3 and body["mailbox_id"] == second
    assert body["subject"] == "two"
    assert body["message_url"] == f"http://127.0.0.1:{device.port}{MESSAGES}/{second}"
    assert first != second

    device.in_reactor(device.ping_clock.advance, 15)
    assert client.frame() == ": ping"
    device.in_reactor(device.ping_clock.advance, 15)
    assert client.frame() == ": ping"
    client.close()
    wait_until(lambda: device.subscribers() == 0)
    assert device.ping_clock.getDelayedCalls() == []


def client_event(device: Device, event_id: int) -> dict[str, Any]:
    [event] = [e for e in device.events.log.after(event_id - 1) if e.event_id == event_id]
    from webapi.local.events import event_item

    return event_item(event, device.api.links)


def test_reconnect_with_last_event_id_misses_nothing(device: Device) -> None:
    client = Raw(device.port, STREAM)
    device.deliver("m1")
    assert client.event()[0] == 1
    client.close()
    wait_until(lambda: device.subscribers() == 0)
    device.deliver("m2")  # while disconnected
    device.deliver("m3")

    again = Raw(device.port, STREAM, {"Last-Event-ID": "1"})
    assert [again.event()[1]["subject"] for _ in range(2)] == ["m2", "m3"]
    device.deliver("m4")
    assert again.event()[0] == 4
    assert again.nothing_within(0.3)  # no repeats
    again.close()

    by_query = Raw(device.port, f"{STREAM}?last_event_id=2")
    assert [by_query.event()[0] for _ in range(2)] == [3, 4]
    by_query.close()


def test_concurrent_deliveries_arrive_once_each(device: Device) -> None:
    client = Raw(device.port, STREAM)
    for i in range(30):
        info = device.maildir.deliver(plain(f"burst {i}"))
        device.in_reactor(device.events.delivered, info)  # recorded in worker threads
    ids = [client.event()[0] for _ in range(30)]
    assert ids == list(range(1, 31))
    assert client.nothing_within(0.3)
    client.close()


def test_resume_beyond_what_is_kept_says_so(in_reactor: Any, tmp_path: Path) -> None:
    device = Device(in_reactor, tmp_path, keep=2)
    try:
        for i in range(5):
            device.deliver(f"m{i}")
        client = Raw(device.port, STREAM, {"Last-Event-ID": "1"})
        client.frame()  # retry + connected
        gap = client.frame()
        assert gap.startswith("event: gap\ndata: ")
        assert json.loads(gap.split("data: ", 1)[1]) == {"missed_from": 2, "resumed_at": 4}
        assert [client.event()[0] for _ in range(2)] == [4, 5]
        client.close()
    finally:
        device.stop()


@pytest.mark.parametrize("value", ["abc", "-1", "1.5", "9" * 30])
def test_bad_last_event_id(device: Device, value: str) -> None:
    client = Raw(device.port, STREAM, {"Last-Event-ID": value})
    assert client.status == 400
    assert device.subscribers() == 0
    client.close()


def test_stream_refuses_foreign_hosts(device: Device) -> None:
    sock = socket.create_connection(("127.0.0.1", device.port), timeout=10)
    sock.sendall(
        f"GET {STREAM} HTTP/1.0\r\nHost: rebind.example\r\nAuthorization: Bearer {TOKEN}\r\n\r\n".encode()
    )
    assert sock.recv(100).startswith(b"HTTP/1.0 403")
    sock.close()
    assert device.subscribers() == 0


# -- IMAP and the API --------------------------------------------------------------------------


class RawIMAP:
    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.buffer = b""
        self.line()  # greeting

    def line(self, timeout: float = 10.0) -> bytes:
        deadline = time.monotonic() + timeout
        while b"\r\n" not in self.buffer:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\r\n")
        return line

    def command(self, tag: bytes, text: bytes) -> list[bytes]:
        self.sock.sendall(tag + b" " + text + b"\r\n")
        lines = []
        while True:
            line = self.line()
            lines.append(line)
            if line.startswith(tag + b" "):
                assert line.startswith(tag + b" OK"), lines
                return lines


def test_api_changes_reach_an_idle_imap_client_at_once(device: Device) -> None:
    first = device.maildir.deliver(RICH)
    second = device.maildir.deliver(plain("to delete"))
    imap = RawIMAP(device.imap.getHost().port)
    imap.command(b"a1", b"LOGIN bob secret")
    imap.command(b"a2", b"SELECT INBOX")
    imap.sock.sendall(b"a3 IDLE\r\n")
    assert imap.line().startswith(b"+")

    started = time.monotonic()
    status = http_post(device.port, f"{MESSAGES}/{first.id}/mark", {"read": True})
    assert status == 200
    assert imap.line(timeout=5) == b"* 1 FETCH (FLAGS (\\Seen))"
    status = http_delete(device.port, f"{MESSAGES}/{second.id}")
    assert status == 200
    assert imap.line(timeout=5) == b"* 2 EXPUNGE"
    assert time.monotonic() - started < 8  # well before the 10 s IDLE poll
    imap.sock.sendall(b"DONE\r\n")
    while not (line := imap.line()).startswith(b"a3 "):
        assert line.startswith(b"* ")
    assert line.startswith(b"a3 OK")
    imap.sock.close()


def test_imap_changes_show_in_the_api(device: Device) -> None:
    info = device.maildir.deliver(RICH)
    imap = RawIMAP(device.imap.getHost().port)
    imap.command(b"a1", b"LOGIN bob secret")
    imap.command(b"a2", b"SELECT INBOX")
    imap.command(b"a3", b"STORE 1 +FLAGS (\\Seen \\Flagged)")
    detail = http_json(device.port, f"{MESSAGES}/{info.id}")
    assert detail["flags"] == ["\\Flagged", "\\Seen"]
    listing = http_json(device.port, f"{MESSAGES}?unread_only=true")
    assert listing["total"] == 0
    imap.command(b"a5", b"COPY 1 Trash")
    imap.command(b"a6", b"STORE 1 +FLAGS (\\Deleted)")
    imap.command(b"a7", b"EXPUNGE")
    assert http_json(device.port, MESSAGES)["total"] == 0
    trash = http_json(device.port, f"{MESSAGES}?mailbox=Trash")
    assert [m["subject"] for m in trash["messages"]] == ["Invoice für April"]
    imap.sock.close()


def _http(port: int, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    import urllib.error
    import urllib.request

    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        data=data,
        method=method,
        headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def http_post(port: int, path: str, body: Any) -> int:
    return _http(port, "POST", path, body)[0]


def http_delete(port: int, path: str) -> int:
    return _http(port, "DELETE", path)[0]


def http_json(port: int, path: str) -> Any:
    status, body = _http(port, "GET", path)
    assert status == 200, body
    return body


# -- Rspamd training ---------------------------------------------------------------------------


class FakeRspamd:
    """A stand-in for Rspamd's controller (outside tailpost) on 127.0.0.1."""

    app = Klein()

    def __init__(self) -> None:
        self.learned: list[tuple[str, bytes, str | None]] = []
        self.status = 200

    @app.route("/learn<kind>", methods=["POST"])
    def learn(self, request: IRequest, kind: str) -> bytes:
        password = request.getHeader(b"password")
        content = request.content.read() if request.content is not None else b""
        self.learned.append((kind, content, password.decode() if password else None))
        request.setResponseCode(self.status)
        request.setHeader(b"Content-Type", b"application/json")
        return json.dumps({"success": self.status == 200}).encode()


def test_rspamd_training(in_reactor: Any) -> None:
    fake = FakeRspamd()
    port = in_reactor(in_reactor.reactor.listenTCP, 0, Site(fake.app.resource()), 50, "127.0.0.1")
    url = f"http://127.0.0.1:{port.getHost().port}"
    try:
        trainer = RspamdTrainer(url + "/", password="pw")

        def learn(kind: str, data: bytes) -> defer.Deferred[bool]:
            return defer.ensureDeferred(trainer.learn(kind, data))

        assert in_reactor(learn, "spam", RICH) is True
        assert fake.learned == [("spam", RICH, "pw")]
        assert in_reactor(learn, "ham", b"x") is True
        assert fake.learned[-1][0] == "ham"
        fake.status = 208  # learned already: still what was asked
        assert in_reactor(learn, "spam", b"x") is True
        fake.status = 500
        assert in_reactor(learn, "spam", b"x") is False
        no_password = RspamdTrainer(url)
        fake.status = 200
        assert in_reactor(lambda: defer.ensureDeferred(no_password.learn("ham", b"y"))) is True
        assert fake.learned[-1][2] is None
    finally:
        in_reactor(port.stopListening)
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        closed = unused.getsockname()[1]
    down = RspamdTrainer(f"http://127.0.0.1:{closed}", timeout=2)
    assert in_reactor(lambda: defer.ensureDeferred(down.learn("spam", b"x"))) is False
    with pytest.raises(ValueError):
        RspamdTrainer("ftp://rspamd.example")


# -- spam rules through the real edge client ---------------------------------------------------


class FakeEdgeApp:
    """Stands in for the edge's /v1 spam-rule endpoints (outside the device) on 127.0.0.1."""

    app = Klein()

    def __init__(self) -> None:
        self.rules: dict[str, dict[str, Any]] = {}
        self.keys: list[str | None] = []

    def _key(self, request: IRequest) -> None:
        auth = request.getHeader(b"authorization")
        self.keys.append(auth.decode() if auth else None)
        request.setHeader(b"Content-Type", b"application/json")

    @app.route("/v1/mail/spam-rules", methods=["GET"])
    def list_rules(self, request: IRequest) -> bytes:
        self._key(request)
        return json.dumps({"rules": list(self.rules.values())}).encode()

    @app.route("/v1/mail/spam-rules", methods=["POST"])
    def create(self, request: IRequest) -> bytes:
        self._key(request)
        body = json.loads(request.content.read() if request.content is not None else b"")
        rule = {"id": f"rule_{len(self.rules) + 1}", **body, "active": True}
        self.rules[rule["id"]] = rule
        request.setResponseCode(201)
        return json.dumps(rule).encode()

    @app.route("/v1/mail/spam-rules/<ident>", methods=["DELETE"])
    def delete(self, request: IRequest, ident: str) -> bytes:
        self._key(request)
        if self.rules.pop(ident, None) is None:
            request.setResponseCode(404)
            error = {"error": "no such rule", "code": "not_found", "statusCode": 404}
            return json.dumps({**error, "action": "list_rules"}).encode()
        return json.dumps({"status": "deleted"}).encode()


def test_spam_rules_through_the_edge_client(in_reactor: Any, tmp_path: Path) -> None:
    from connector.edgeclient import EdgeClient
    from webapi.local.spam import EdgeJSON

    fake = FakeEdgeApp()
    edge_port = in_reactor(
        in_reactor.reactor.listenTCP, 0, Site(fake.app.resource()), 50, "127.0.0.1"
    )
    device = Device(in_reactor, tmp_path)
    edge_url = f"http://127.0.0.1:{edge_port.getHost().port}"
    device.api.edge = EdgeJSON(EdgeClient(edge_url, lambda: "device-key"))
    try:
        info = device.maildir.deliver(plain("spam", sender="Eve <EVE@evil.example>"))
        status, report = _http(device.port, "POST", f"{MESSAGES}/{info.id}/report-spam", {})
        assert status == 200 and report["status"] == "ok"
        assert report["rule"]["value"] == "eve@evil.example"
        assert report["rule"]["id"] == "rule_1"
        assert fake.keys == ["Bearer device-key"]
        rules = http_json(device.port, "/localapi/v0/mail/spam-rules")["rules"]
        assert [r["kind"] for r in rules] == ["sender"]
        status, body = _http(device.port, "DELETE", "/localapi/v0/mail/spam-rules/rule_1")
        assert (status, body) == (200, {"status": "deleted"})
        status, body = _http(device.port, "DELETE", "/localapi/v0/mail/spam-rules/rule_1")
        assert status == 404 and body["code"] == "not_found"
    finally:
        in_reactor(edge_port.stopListening)
    status, body = _http(device.port, "GET", "/localapi/v0/mail/spam-rules")
    assert status == 502 and body["code"] == "edge_unavailable"
    other = device.maildir.deliver(plain("more spam", sender="eve@evil.example"))
    status, report = _http(device.port, "POST", f"{MESSAGES}/{other.id}/report-spam")
    assert status == 200 and report["status"] == "partial" and report["mailbox"] == "Junk"
    device.stop()
