"""Tests for the loopback API (/localapi/v0/mail/messages...) over a real Maildir."""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from treq.testing import StubTreq
from twisted.internet import defer
from twisted.web.server import Site

from maildir import Maildir, MessageInfo
from webapi.local.app import LocalAPI, content_disposition, served_content_type

TOKEN = "local-test-token"
BASE = "http://127.0.0.1:18080"
MESSAGES = "/localapi/v0/mail/messages"
ERROR_KEYS = {"error", "code", "statusCode", "action"}


def run_now(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> defer.Deferred[Any]:
    return defer.maybeDeferred(fn, *args, **kwargs)


@dataclass
class Reply:
    code: int
    headers: dict[str, list[str]]
    body: bytes

    def header(self, name: str) -> str:
        return self.headers[name.lower()][0]

    def json(self) -> Any:
        assert self.header("Content-Type") == "application/json"
        return json.loads(self.body)


def plain(
    subject: str,
    body: str = "hello",
    *,
    sender: str = "Jane Doe <jane@example.com>",
    extra: str = "",
) -> bytes:
    return (
        f"From: {sender}\r\nTo: agent@example.net\r\nSubject: {subject}\r\n"
        f"Date: Fri, 03 Apr 2026 18:30:00 +0000\r\nMessage-ID: <{subject.replace(' ', '-')}"
        f"@example.com>\r\n{extra}Content-Type: text/plain; charset=utf-8\r\n\r\n{body}\r\n"
    ).encode()


RICH = (
    b"From: Jane Doe <jane@example.com>\r\n"
    b"To: agent@example.net\r\nCc: boss@example.net\r\n"
    b"Subject: =?utf-8?q?Invoice_f=C3=BCr_April?=\r\n"
    b"Date: Fri, 03 Apr 2026 18:30:00 +0000\r\n"
    b"Message-ID: <rich/1@example.com>\r\nIn-Reply-To: <prev@example.com>\r\n"
    b"References: <root@example.com> <prev@example.com>\r\n"
    b"X-Tailpost-Queue-ID: msg_01KNA97WGYC1ATSWR92GZW40CN\r\n"
    b"Authentication-Results: edge.example.net; spf=fail smtp.mailfrom=example.com;"
    b" dkim=pass (good) header.d=example.com; dmarc=pass\r\n"
    b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=outer\r\n\r\n"
    b"--outer\r\nContent-Type: multipart/alternative; boundary=alt\r\n\r\n"
    b"--alt\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nPlease pay the invoice.\r\n"
    b"--alt\r\nContent-Type: text/html; charset=utf-8\r\n\r\n<p>Please pay</p>\r\n--alt--\r\n"
    b"--outer\r\nContent-Type: application/pdf\r\n"
    b"Content-Disposition: attachment; filename*=UTF-8''Rechnung%20M%C3%A4rz.pdf\r\n"
    b"Content-Transfer-Encoding: base64\r\n\r\n" + base64.b64encode(b"%PDF-1.7 data") + b"\r\n"
    b"--outer\r\nContent-Type: text/html\r\n"
    b'Content-Disposition: attachment; filename="../../page.html"\r\n\r\n'
    b"<script>alert(1)</script>\r\n"
    b"--outer\r\nContent-Type: application/pdf\r\n"
    b'Content-Disposition: attachment; filename="invoice.pdf.exe"\r\n'
    b"Content-Transfer-Encoding: base64\r\n\r\n" + base64.b64encode(b"MZ") + b"\r\n"
    b"--outer--\r\n"
)


class Client:
    def __init__(self, api: LocalAPI) -> None:
        self.stub: Any = StubTreq(api.resource())

    def get(
        self,
        path: str,
        *,
        token: str | None = TOKEN,
        header: str = "Authorization",
        host: str = "127.0.0.1:18080",
    ) -> Reply:
        return self.request("GET", path, token=token, header=header, host=host)

    def post(self, path: str, body: Any = None, **kwargs: Any) -> Reply:
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        if data is not None:
            kwargs["extra"] = {"Content-Type": "application/json", **kwargs.get("extra", {})}
        return self.request("POST", path, data=data, **kwargs)

    def delete(self, path: str, **kwargs: Any) -> Reply:
        return self.request("DELETE", path, **kwargs)

    def request(
        self,
        method: str,
        path: str,
        *,
        data: bytes | None = None,
        token: str | None = TOKEN,
        header: str = "Authorization",
        host: str = "127.0.0.1:18080",
        extra: dict[str, str] | None = None,
    ) -> Reply:
        headers: dict[str, str] = {"Host": host, **(extra or {})}
        if token is not None:
            headers[header] = f"Bearer {token}" if header == "Authorization" else token
        replies: list[Reply] = []
        failures: list[Any] = []

        def collect(response: Any) -> defer.Deferred[None]:
            raw = {
                k.decode().lower(): [v.decode() for v in vs]
                for k, vs in response.headers.getAllRawHeaders()
            }
            d = response.content()
            d.addCallback(lambda body: replies.append(Reply(response.code, raw, body)))
            return d

        d = self.stub.request(method, f"http://127.0.0.1:18080{path}", headers=headers, data=data)
        d.addCallback(collect)
        d.addErrback(failures.append)
        self.stub.flush()
        assert not failures, failures
        assert len(replies) == 1
        return replies[0]


@pytest.fixture
def mdir(tmp_path: Path) -> Maildir:
    return Maildir(tmp_path / "Maildir", hostname="testhost")


@pytest.fixture
def api(mdir: Maildir) -> LocalAPI:
    return LocalAPI(mdir, TOKEN, base_url=BASE, run_blocking=run_now)


@pytest.fixture
def client(api: LocalAPI) -> Client:
    return Client(api)


@pytest.fixture
def inbox(mdir: Maildir) -> list[MessageInfo]:
    """Five messages, oldest first; the third and fourth have been read."""
    infos = []
    for i in range(5):
        flags = ["\\Seen"] if i in (2, 3) else []
        subject = f"invoice {i}" if i % 2 == 0 else f"hello {i}"
        data = plain(subject, f"body number {i}")
        infos.append(mdir.deliver(data, flags=flags, internaldate=1_700_000_000 + i))
    return infos


def assert_error(reply: Reply, status: int, code: str) -> dict[str, Any]:
    assert reply.code == status, reply.body
    body = reply.json()
    assert set(body) == ERROR_KEYS
    assert body["statusCode"] == status
    assert body["code"] == code
    assert body["error"] and body["action"]
    assert b"Traceback" not in reply.body
    return body


# -- listing ---------------------------------------------------------------------------------


def test_list_newest_first_with_total(client: Client, inbox: list[MessageInfo]) -> None:
    body = client.get(MESSAGES).json()
    assert body["mailbox"] == "INBOX"
    assert body["total"] == 5
    assert [m["id"] for m in body["messages"]] == [i.id for i in reversed(inbox)]
    first = body["messages"][0]
    assert set(first) == {
        "id",
        "proxy_message_id",
        "mailbox",
        "subject",
        "from",
        "to",
        "date",
        "size_bytes",
        "flags",
        "preview",
    }
    assert first["subject"] == "invoice 4"
    assert first["from"] == "Jane Doe <jane@example.com>"
    assert first["to"] == ["agent@example.net"]
    assert first["date"] == "Fri, 03 Apr 2026 18:30:00 +0000"
    assert first["preview"] == "body number 4"
    assert first["size_bytes"] == inbox[4].size
    assert first["proxy_message_id"] == ""
    assert body["messages"][1]["flags"] == ["\\Seen"]


def test_list_limit_offset(client: Client, inbox: list[MessageInfo]) -> None:
    body = client.get(f"{MESSAGES}?limit=2&offset=1").json()
    assert body["total"] == 5
    assert [m["id"] for m in body["messages"]] == [inbox[3].id, inbox[2].id]
    assert client.get(f"{MESSAGES}?offset=10").json()["messages"] == []
    assert len(client.get(f"{MESSAGES}?limit=1000").json()["messages"]) == 5


def test_list_search_and_unread(client: Client, inbox: list[MessageInfo]) -> None:
    body = client.get(f"{MESSAGES}?search=INVOICE").json()
    assert body["total"] == 3
    assert [m["subject"] for m in body["messages"]] == ["invoice 4", "invoice 2", "invoice 0"]
    body = client.get(f"{MESSAGES}?search=invoice&unread_only=true&limit=1").json()
    assert body["total"] == 2
    assert [m["subject"] for m in body["messages"]] == ["invoice 4"]
    body = client.get(f"{MESSAGES}?search=number%203").json()  # preview text
    assert [m["subject"] for m in body["messages"]] == ["hello 3"]
    body = client.get(f"{MESSAGES}?search=jane%40example").json()  # from
    assert body["total"] == 5
    assert client.get(f"{MESSAGES}?unread_only=1").json()["total"] == 3
    assert client.get(f"{MESSAGES}?unread_only=0").json()["total"] == 5


def test_list_other_mailbox(client: Client, mdir: Maildir) -> None:
    mdir.create_folder("Archive")
    info = mdir.deliver(plain("archived"), "Archive")
    body = client.get(f"{MESSAGES}?mailbox=Archive").json()
    assert body["mailbox"] == "Archive"
    assert [m["id"] for m in body["messages"]] == [info.id]
    assert body["messages"][0]["mailbox"] == "Archive"
    assert client.get(MESSAGES).json()["total"] == 0


@pytest.mark.parametrize(
    "query",
    [
        "limit=abc",
        "limit=0",
        "limit=-1",
        "limit=1.5",
        "offset=-3",
        "unread_only=maybe",
        "limit=1&limit=2",
        "surprise=1",
        "mailbox=..%2F..%2Fetc",
        "mailbox=%00",
        "search=" + "a" * 300,
        "search=%FF",
    ],
)
def test_list_bad_parameters(client: Client, query: str) -> None:
    assert_error(client.get(f"{MESSAGES}?{query}"), 400, "invalid_parameter")


def test_list_unknown_mailbox(client: Client) -> None:
    assert_error(client.get(f"{MESSAGES}?mailbox=Nope"), 404, "mailbox_not_found")


# -- one message -----------------------------------------------------------------------------


def test_detail_text_html_attachments_and_risk(client: Client, mdir: Maildir) -> None:
    info = mdir.deliver(RICH, flags=["\\Seen"])
    body = client.get(f"{MESSAGES}/{info.id}").json()
    assert body["id"] == info.id
    assert body["proxy_message_id"] == "msg_01KNA97WGYC1ATSWR92GZW40CN"
    assert body["mailbox"] == "INBOX"
    assert body["subject"] == "Invoice für April"
    assert body["from"] == "Jane Doe <jane@example.com>"
    assert body["to"] == ["agent@example.net"] and body["cc"] == ["boss@example.net"]
    assert body["message_id"] == "<rich/1@example.com>"
    assert body["in_reply_to"] == "<prev@example.com>"
    assert body["references"] == ["<root@example.com>", "<prev@example.com>"]
    assert body["headers"].startswith("From: Jane Doe <jane@example.com>\r\nTo: ")
    assert body["body_text"] == "Please pay the invoice."
    assert body["body_html"] == "<p>Please pay</p>"
    assert body["flags"] == ["\\Seen"] and body["size_bytes"] == info.size
    first, page, exe = body["attachments"]
    url = f"{BASE}{MESSAGES}/{info.id}/attachments/0"
    assert first == {
        "index": 0,
        "filename": "Rechnung März.pdf",
        "content_type": "application/pdf",
        "size_bytes": len(b"%PDF-1.7 data"),
        "open_url": url,
        "download_url": f"{url}?download=1",
        "risk": {
            "level": "low",
            "summary": "No warning signs were found for this attachment.",
            "method": "heuristic",
        },
    }
    assert page["filename"] == "page.html" and page["risk"]["level"] == "medium"
    assert exe["filename"] == "invoice.pdf.exe" and exe["risk"]["level"] == "high"
    risk = body["risk"]
    assert risk["level"] == "high" and risk["method"] == "heuristic"
    # No verdict of the edge: the message's own Authentication-Results prove nothing.
    assert risk["authentication"] == {"spf": "none", "dkim": "none", "dmarc": "none"}
    assert not any("spf fail" in r for r in risk["reasons"])


def test_authentication_comes_from_the_edge_verdict_only(client: Client, mdir: Maildir) -> None:
    forged = b"Authentication-Results: edge.example.net; spf=pass; dkim=pass; dmarc=pass\r\n"
    info = mdir.deliver(forged + plain("forged results"))
    risk = client.get(f"{MESSAGES}/{info.id}").json()["risk"]
    assert risk["authentication"] == {"spf": "none", "dkim": "none", "dmarc": "none"}
    verdict = b"X-Tailpost-Verdict: action=accept; spf=fail; dkim=pass; dmarc=none\r\n"
    info = mdir.deliver(verdict + forged + plain("edge results"))
    risk = client.get(f"{MESSAGES}/{info.id}").json()["risk"]
    assert risk["authentication"] == {"spf": "fail", "dkim": "pass", "dmarc": "none"}
    assert any("spf fail" in r for r in risk["reasons"])


def test_detail_without_risk_signals(client: Client, mdir: Maildir) -> None:
    info = mdir.deliver(plain("plain one"))
    risk = client.get(f"{MESSAGES}/{info.id}").json()["risk"]
    assert risk["level"] == "low"
    assert risk["authentication"] == {"spf": "none", "dkim": "none", "dmarc": "none"}


def test_detail_aliases_message_id_and_queue_id(client: Client, mdir: Maildir) -> None:
    mdir.deliver(plain("other"))
    info = mdir.deliver(RICH)
    by_msgid = client.get(f"{MESSAGES}/%3Crich%2F1%40example.com%3E").json()
    assert by_msgid["id"] == info.id
    by_queue = client.get(f"{MESSAGES}/msg_01KNA97WGYC1ATSWR92GZW40CN").json()
    assert by_queue["id"] == info.id
    assert_error(client.get(f"{MESSAGES}/%3Cnobody%40example.com%3E"), 404, "message_not_found")


def test_detail_in_other_mailbox(client: Client, mdir: Maildir) -> None:
    mdir.create_folder("Work")
    info = mdir.deliver(RICH, "Work")
    body = client.get(f"{MESSAGES}/{info.id}?mailbox=Work").json()
    assert body["mailbox"] == "Work"
    assert body["attachments"][0]["open_url"].endswith("/attachments/0?mailbox=Work")
    assert body["attachments"][0]["download_url"].endswith("?mailbox=Work&download=1")
    assert_error(client.get(f"{MESSAGES}/{info.id}"), 404, "message_not_found")


def test_detail_unknown_id(client: Client, inbox: list[MessageInfo]) -> None:
    assert_error(client.get(f"{MESSAGES}/1700000000.M1P1.nohost"), 404, "message_not_found")


@pytest.mark.parametrize(
    "ref",
    [
        "..%2F..%2Fetc%2Fpasswd",
        "../../etc/passwd",
        "..",
        "a..b",
        "%2Fetc%2Fpasswd",
        "abc%00def",
        "%00",
        ".hidden",
        "a%20b",
        "..%5C..%5Cwin.ini",
    ],
)
def test_detail_traversal_ids_rejected(client: Client, inbox: list[MessageInfo], ref: str) -> None:
    assert_error(client.get(f"{MESSAGES}/{ref}"), 400, "invalid_message_id")
    assert_error(client.get(f"{MESSAGES}/{ref}/attachments/0"), 400, "invalid_message_id")


def test_detail_unknown_mailbox(client: Client, inbox: list[MessageInfo]) -> None:
    assert_error(client.get(f"{MESSAGES}/{inbox[0].id}?mailbox=Gone"), 404, "mailbox_not_found")


# -- attachments -----------------------------------------------------------------------------


def test_attachment_inline_and_download(client: Client, mdir: Maildir) -> None:
    info = mdir.deliver(RICH)
    reply = client.get(f"{MESSAGES}/{info.id}/attachments/0")
    assert reply.code == 200
    assert reply.body == b"%PDF-1.7 data"
    assert reply.header("Content-Type") == "application/pdf"
    assert reply.header("X-Content-Type-Options") == "nosniff"
    assert reply.header("Content-Disposition") == (
        "inline; filename=\"Rechnung M_rz.pdf\"; filename*=UTF-8''Rechnung%20M%C3%A4rz.pdf"
    )
    reply = client.get(f"{MESSAGES}/{info.id}/attachments/0?download=1")
    assert reply.header("Content-Disposition").startswith('attachment; filename="Rechnung')


def test_attachment_active_type_served_as_octet_stream(client: Client, mdir: Maildir) -> None:
    info = mdir.deliver(RICH)
    reply = client.get(f"{MESSAGES}/{info.id}/attachments/1")
    assert reply.code == 200
    assert reply.body == b"<script>alert(1)</script>"
    assert reply.header("Content-Type") == "application/octet-stream"
    assert reply.header("Content-Disposition") == 'inline; filename="page.html"'
    assert "sandbox" in reply.header("Content-Security-Policy")


@pytest.mark.parametrize("index", ["3", "99", "x", "-1", "1.0", "99999"])
def test_attachment_bad_index(client: Client, mdir: Maildir, index: str) -> None:
    info = mdir.deliver(RICH)
    assert_error(
        client.get(f"{MESSAGES}/{info.id}/attachments/{index}"), 404, "attachment_not_found"
    )


def test_attachment_unknown_message(client: Client) -> None:
    assert_error(client.get(f"{MESSAGES}/1.M2P3.host/attachments/0"), 404, "message_not_found")


def test_served_content_type_and_disposition_helpers() -> None:
    assert served_content_type("image/png") == b"image/png"
    for risky in (
        "text/html",
        "image/svg+xml",
        "application/javascript",
        "text/xml",
        "application/xhtml+xml",
        "multipart/mixed",
        "bogus",
        "a/b\r\nX: y",
    ):
        assert served_content_type(risky) == b"application/octet-stream", risky
    assert content_disposition("inline", "a.pdf") == b'inline; filename="a.pdf"'
    assert content_disposition("attachment", '100% "x".pdf') == (
        b"attachment; filename=\"100_ _x_.pdf\"; filename*=UTF-8''100%25%20%22x%22.pdf"
    )


# -- screening and errors --------------------------------------------------------------------


def test_missing_token(client: Client, inbox: list[MessageInfo]) -> None:
    reply = client.get(MESSAGES, token=None)
    assert_error(reply, 401, "auth_missing_token")
    assert reply.header("WWW-Authenticate").startswith("Bearer")


@pytest.mark.parametrize("header", ["Authorization", "X-Tailpost-Token"])
def test_wrong_token(client: Client, inbox: list[MessageInfo], header: str) -> None:
    body = assert_error(
        client.get(MESSAGES, token="wrong", header=header), 401, "auth_invalid_token"
    )
    assert "wrong" not in json.dumps(body)


def test_token_header_alternatives(client: Client, inbox: list[MessageInfo]) -> None:
    assert client.get(MESSAGES, header="X-Tailpost-Token").code == 200
    reply = client.get(MESSAGES, token=None, host="127.0.0.1")
    assert reply.code == 401
    stub_reply = client.get(MESSAGES, token=f"{TOKEN} extra")
    assert_error(stub_reply, 401, "auth_invalid_token")


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost:18080", "LOCALHOST", "[::1]:8080"])
def test_loopback_hosts_allowed(client: Client, host: str) -> None:
    assert client.get(MESSAGES, host=host).code == 200


@pytest.mark.parametrize(
    "host",
    ["evil.example", "evil.example:18080", "127.0.0.1.evil.example", "10.0.0.1", "localhost:abc"],
)
def test_foreign_host_forbidden(client: Client, inbox: list[MessageInfo], host: str) -> None:
    assert_error(client.get(MESSAGES, host=host), 403, "forbidden_host")
    assert_error(client.get(MESSAGES, host=host, token=None), 403, "forbidden_host")


def test_unknown_route_and_method(client: Client, api: LocalAPI) -> None:
    assert_error(client.get("/localapi/v0/nothing"), 404, "not_found")
    assert_error(client.get("/localapi/v0/nothing", token=None), 401, "auth_missing_token")
    replies: list[Any] = []
    d = client.stub.post(
        f"http://127.0.0.1{MESSAGES}", headers={"Authorization": f"Bearer {TOKEN}"}
    )
    d.addCallback(replies.append)
    client.stub.flush()
    assert replies[0].code == 405


def test_invalid_utf8_path(client: Client) -> None:
    assert_error(client.get(f"{MESSAGES}/%FF"), 400, "invalid_url")


def test_unexpected_error_is_generic_500(mdir: Maildir) -> None:
    def broken(fn: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
        return defer.fail(RuntimeError("secret detail /home/user/Maildir"))

    client = Client(LocalAPI(mdir, TOKEN, run_blocking=broken))
    reply = client.get(MESSAGES)
    body = assert_error(reply, 500, "internal_error")
    assert "secret" not in json.dumps(body)


def test_empty_token_refused(mdir: Maildir) -> None:
    with pytest.raises(ValueError):
        LocalAPI(mdir, "")


# -- a real server and real threads ----------------------------------------------------------


def test_real_server_with_threads(in_reactor: Any, mdir: Maildir) -> None:
    info = mdir.deliver(RICH)
    api = LocalAPI(mdir, TOKEN)  # default run_blocking: deferToThread

    def listen() -> Any:
        from twisted.internet import reactor

        tcp: Any = reactor
        return tcp.listenTCP(0, Site(api.resource()), interface="127.0.0.1")

    port = in_reactor(listen)
    try:
        url = f"http://127.0.0.1:{port.getHost().port}{MESSAGES}/{info.id}"
        request = urllib.request.Request(url, headers={"Authorization": f"Bearer {TOKEN}"})
        with urllib.request.urlopen(request, timeout=10) as response:
            body = json.loads(response.read())
        assert body["subject"] == "Invoice für April"
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(url, timeout=10)
        assert caught.value.code == 401
        assert set(json.loads(caught.value.read())) == ERROR_KEYS
    finally:
        in_reactor(port.stopListening)


def test_oversized_body_refused(mdir: Maildir) -> None:
    client = Client(LocalAPI(mdir, TOKEN, max_body=16, run_blocking=run_now))
    replies: list[Any] = []
    d = client.stub.post(
        f"http://127.0.0.1{MESSAGES}",
        headers={"Authorization": f"Bearer {TOKEN}"},
        data=b"x" * 17,
    )
    d.addCallback(replies.append)
    client.stub.flush()
    assert replies[0].code == 413
