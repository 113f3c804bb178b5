"""End to end with the real all-in-one process: a message with an HTML part and a PDF comes in
through the edge's MX and is listed, read, downloaded, marked, reported and streamed through
the device's local API, with IMAP seeing the same Maildir."""

from __future__ import annotations

import imaplib
import json
import smtplib
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from email.message import EmailMessage
from typing import Any

import pytest

from tests.processes import Process, allinone_config, host_port, wait_for

PDF = b"%PDF-1.4\n" + bytes(range(256)) * 40 + b"\n%%EOF\n"
MAIL = "/localapi/v0/mail"
SENDER = "mallory@spam-sender.test"


@pytest.fixture(scope="module")
def aio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Process, dict[str, str]]]:
    proc = Process("tailpost", tmp_path_factory.mktemp("aio-api"), allinone_config())
    listeners = proc.start()
    yield proc, listeners
    proc.stop()


def creds(proc: Process) -> dict[str, Any]:
    return json.loads((proc.data_dir / "device" / "credentials.json").read_text())


class API:
    def __init__(self, proc: Process, listeners: dict[str, str]) -> None:
        self.base = f"http://{listeners['http']}"
        self.token = creds(proc)["local_api_token"]

    def call(
        self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(
            self.base + path,
            data=data,
            method=method,
            headers={
                "Authorization": f"Bearer {self.token}",
                "Content-Type": "application/json",
                **(headers or {}),
            },
        )
        try:
            with urllib.request.urlopen(request, timeout=15) as response:
                return response.status, dict(response.headers), response.read()
        except urllib.error.HTTPError as error:
            return error.code, dict(error.headers), error.read()

    def json(self, method: str, path: str, body: Any = None) -> Any:
        status, _headers, raw = self.call(method, path, body)
        assert status == 200, raw
        return json.loads(raw)


class Stream:
    """An open SSE connection read frame by frame."""

    def __init__(self, api: API, last_id: int | None = None) -> None:
        host, port = host_port(api.base.removeprefix("http://"))
        self.sock = socket.create_connection((host, port), timeout=20)
        extra = f"Last-Event-ID: {last_id}\r\n" if last_id is not None else ""
        self.sock.sendall(
            f"GET {MAIL}/stream HTTP/1.0\r\nHost: 127.0.0.1\r\n"
            f"Authorization: Bearer {api.token}\r\n{extra}\r\n".encode()
        )
        self.buffer = b""
        head = self._until(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.0 200"), head

    def _until(self, marker: bytes) -> bytes:
        while marker not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError(self.buffer)
            self.buffer += chunk
        frame, _, self.buffer = self.buffer.partition(marker)
        return frame

    def event(self) -> tuple[int, dict[str, Any]]:
        while True:
            fields = dict(
                line.split(": ", 1)
                for line in self._until(b"\n\n").decode().split("\n")
                if ": " in line and not line.startswith(":")
            )
            if "data" in fields and "event" not in fields:
                return int(fields["id"]), json.loads(fields["data"])

    def close(self) -> None:
        self.sock.close()


def message(subject: str, sender: str = "Jane <jane@sender.test>") -> bytes:
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = "demo@example.test"
    msg["Subject"] = subject
    msg["Message-ID"] = f"<{subject.replace(' ', '.')}@sender.test>"
    msg.set_content("Plain text body.\n")
    msg.add_alternative("<html><body><p>HTML <b>body</b></p></body></html>\n", subtype="html")
    msg.add_attachment(PDF, maintype="application", subtype="pdf", filename="report.pdf")
    return msg.as_bytes(policy=msg.policy.clone(linesep="\r\n"))


def send(listeners: dict[str, str], sender: str, data: bytes) -> dict[str, Any]:
    host, port = host_port(listeners["mx"])
    with smtplib.SMTP(host, port, timeout=20) as smtp:
        return smtp.sendmail(sender, ["demo@example.test"], data)


def find(api: API, subject: str, mailbox: str = "INBOX") -> dict[str, Any] | None:
    query = urllib.parse.urlencode({"mailbox": mailbox, "search": subject})
    listing = api.json("GET", f"{MAIL}/messages?{query}")
    return listing["messages"][0] if listing["total"] == 1 else None


def test_message_with_pdf_and_html_through_the_api(aio: tuple[Process, dict[str, str]]) -> None:
    proc, listeners = aio
    api = API(proc, listeners)
    stream = Stream(api)
    assert send(listeners, "jane@sender.test", message("quarterly report")) == {}

    event_id, event = stream.event()  # the stream was open before the message came
    assert event["subject"] == "quarterly report" and event["mailbox"] == "INBOX"
    item = wait_for(lambda: find(api, "quarterly"))
    assert event["mailbox_id"] == item["id"]
    assert event["message_url"] == f"{api.base}{MAIL}/messages/{item['id']}"
    assert item["from"] == "Jane <jane@sender.test>" and item["flags"] == []

    detail = api.json("GET", f"{MAIL}/messages/{item['id']}")
    assert detail["body_text"].strip() == "Plain text body."
    assert "<b>body</b>" in detail["body_html"]
    [attachment] = detail["attachments"]
    assert attachment["filename"] == "report.pdf"
    assert attachment["content_type"] == "application/pdf"
    assert attachment["size_bytes"] == len(PDF)
    status, headers, raw = api.call("GET", attachment["download_url"].removeprefix(api.base))
    assert status == 200 and raw == PDF  # byte-identical
    assert headers["Content-Type"] == "application/pdf"
    assert headers["Content-Disposition"] == 'attachment; filename="report.pdf"'
    recent = api.json("GET", f"{MAIL}/recent?limit=1")["events"][0]
    assert recent["event_id"] == event_id and recent["mailbox_id"] == item["id"]

    marked = api.json("POST", f"{MAIL}/messages/{item['id']}/mark", {"read": True})
    assert marked["flags"] == ["\\Seen"]
    host, port = host_port(listeners["imap"])
    imap = imaplib.IMAP4(host, port)
    imap.login("demo@example.test", creds(proc)["imap"]["demo@example.test"])
    imap.select("INBOX")
    _typ, found = imap.uid("SEARCH", "SUBJECT", '"quarterly report"')  # type: ignore[arg-type]
    _typ, flags = imap.uid("FETCH", found[0], "(FLAGS)")
    assert b"\\Seen" in flags[0]  # type: ignore[operator]
    imap.logout()
    stream.close()


def test_reconnecting_stream_misses_nothing(aio: tuple[Process, dict[str, str]]) -> None:
    proc, listeners = aio
    api = API(proc, listeners)
    stream = Stream(api)
    send(listeners, "jane@sender.test", message("resume one"))
    last_id, _ = stream.event()
    stream.close()
    for subject in ("resume two", "resume three"):  # nobody listening
        send(listeners, "jane@sender.test", message(subject))
    wait_for(lambda: find(api, "resume three"))
    wait_for(
        lambda: api.json("GET", f"{MAIL}/recent?limit=1")["events"][0]["event_id"] > last_id + 1
    )
    again = Stream(api, last_id)
    got = [again.event() for _ in range(2)]
    assert [i for i, _ in got] == [last_id + 1, last_id + 2]
    # Both, whichever the edge delivered first (two messages at once may overtake each other).
    assert sorted(e["subject"] for _, e in got) == ["resume three", "resume two"]
    again.close()


def test_report_spam_moves_to_junk_and_blocks_the_sender(
    aio: tuple[Process, dict[str, str]],
) -> None:
    proc, listeners = aio
    api = API(proc, listeners)
    send(listeners, SENDER, message("buy now", sender=f"Mallory <{SENDER}>"))
    item = wait_for(lambda: find(api, "buy"))
    report = api.json("POST", f"{MAIL}/messages/{item['id']}/report-spam")
    assert report["mailbox"] == "Junk" and report["id"] == item["id"]
    assert find(api, "buy") is None
    assert find(api, "buy", "Junk") is not None
    assert report["rule"]["kind"] == "sender" and report["rule"]["value"] == SENDER
    rules = api.json("GET", f"{MAIL}/spam-rules")["rules"]
    assert any(rule["value"] == SENDER for rule in rules)
    time.sleep(0.2)
    with pytest.raises(smtplib.SMTPException):
        send(listeners, SENDER, message("buy again", sender=f"Mallory <{SENDER}>"))


def test_report_spam_never_blocks_the_devices_own_domain(
    aio: tuple[Process, dict[str, str]],
) -> None:
    """A message whose unauthenticated From is at the device's own domain: block_domain
    blocks that address only, and the edge refuses a rule for the domain outright."""
    proc, listeners = aio
    api = API(proc, listeners)
    forger = "ceo@example.test"
    send(listeners, "x@elsewhere.test", message("wire money", sender=f"CEO <{forger}>"))
    item = wait_for(lambda: find(api, "wire money"))
    report = api.json("POST", f"{MAIL}/messages/{item['id']}/report-spam", {"block_domain": True})
    assert report["blocked"] == {"kind": "sender", "value": forger, "basis": "served_domain"}
    assert report["rule"]["kind"] == "sender" and report["rule"]["value"] == forger
    values = [rule["value"] for rule in api.json("GET", f"{MAIL}/spam-rules")["rules"]]
    assert "example.test" not in values and forger in values
    # Whatever the client sends, the edge refuses the domain (through the device's /v1).
    for domain in ("example.test", "tailpost.test", "mx.tailpost.test"):
        status, _headers, raw = api.call(
            "POST", "/v1/mail/spam-rules", {"kind": "domain", "value": domain}
        )
        assert status == 409 and json.loads(raw)["code"] == "served_domain", (domain, raw)
    # Mail from the owner's own domain still arrives.
    assert (
        send(listeners, "jane@example.test", message("still here", "Jane <jane@example.test>"))
        == {}
    )
    assert wait_for(lambda: find(api, "still here")) is not None
