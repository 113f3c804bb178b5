"""End to end with real processes: SMTP in at the edge, out over IMAP and HTTP at the device."""

from __future__ import annotations

import email
import imaplib
import json
import shutil
import smtplib
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edge.spool.scan import recoverable
from tests.processes import (
    Process,
    allinone_config,
    edge_and_device,
    host_port,
    maildir_new,
    spool_queue,
    wait_for,
)


@pytest.fixture(scope="module")
def allinone(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Process, dict[str, str]]]:
    # The installed package, as `make run` starts it: a file missing from the package fails here.
    proc = Process("tailpost", tmp_path_factory.mktemp("aio"), allinone_config(), installed=True)
    listeners = proc.start()
    yield proc, listeners
    proc.stop()


def credentials(proc: Process) -> dict[str, Any]:
    return json.loads((proc.data_dir / "device" / "credentials.json").read_text())


def http_get(listeners: dict[str, str], path: str, token: str | None) -> tuple[int, Any]:
    req = urllib.request.Request(f"http://{listeners['http']}{path}")
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def imap_login(proc: Process, listeners: dict[str, str]) -> imaplib.IMAP4:
    host, port = host_port(listeners["imap"])
    imap = imaplib.IMAP4(host, port)
    imap.login("demo@example.test", credentials(proc)["imap"]["demo@example.test"])
    return imap


def find_by_subject(imap: imaplib.IMAP4, subject: str) -> bytes | None:
    imap.select("INBOX")
    _typ, data = imap.uid("SEARCH", "SUBJECT", f'"{subject}"')  # type: ignore[arg-type]
    uids = data[0].split() if data and data[0] else []
    if not uids:
        return None
    assert len(uids) == 1, f"{subject!r} stored {len(uids)} times"
    _typ, fetched = imap.uid("FETCH", uids[0], "(BODY.PEEK[])")
    for item in fetched:
        if isinstance(item, tuple):
            return item[1]
    return None


def test_first_start_secrets_are_private(allinone: tuple[Process, dict[str, str]]) -> None:
    proc, _ = allinone
    path = proc.data_dir / "device" / "credentials.json"
    assert path.stat().st_mode & 0o777 == 0o600
    creds = credentials(proc)
    assert creds["local_api_token"] and creds["imap"]["demo@example.test"]
    assert (proc.data_dir / "tls" / "cert.pem").exists()
    assert (proc.data_dir / "tls" / "key.pem").stat().st_mode & 0o777 == 0o600
    assert creds["imap"]["demo@example.test"] in proc.log()  # printed once, on first start


def test_smtp_in_imap_and_http_out(allinone: tuple[Process, dict[str, str]]) -> None:
    proc, listeners = allinone
    host, port = host_port(listeners["mx"])
    body = (
        b"From: Jane <jane@sender.test>\r\nTo: demo@example.test\r\nSubject: e2e hello\r\n"
        b"Message-ID: <e2e-1@sender.test>\r\n\r\nHello through the edge.\r\n"
    )
    with smtplib.SMTP(host, port) as smtp:
        code, _ = smtp.ehlo("sender.test")
        assert code == 250
        refused = smtp.sendmail("jane@sender.test", ["demo@example.test"], body)
        assert refused == {}
    imap = imap_login(proc, listeners)
    raw = wait_for(lambda: find_by_subject(imap, "e2e hello"))
    msg = email.message_from_bytes(raw)
    assert msg["Subject"] == "e2e hello"
    assert "by mx.tailpost.test (tailpost)" in msg["Received"]
    assert raw.endswith(b"\r\n\r\nHello through the edge.\r\n")
    imap.logout()

    token = credentials(proc)["local_api_token"]
    status, listing = http_get(listeners, "/localapi/v0/mail/messages?search=e2e", token)
    assert status == 200
    assert listing["total"] == 1
    item = listing["messages"][0]
    assert item["subject"] == "e2e hello" and item["from"] == "Jane <jane@sender.test>"
    status, detail = http_get(listeners, f"/localapi/v0/mail/messages/{item['id']}", token)
    assert status == 200
    assert detail["body_text"].strip() == "Hello through the edge."
    assert detail["message_id"] == "<e2e-1@sender.test>"


def test_unknown_recipient_is_refused_at_rcpt(allinone: tuple[Process, dict[str, str]]) -> None:
    _proc, listeners = allinone
    host, port = host_port(listeners["mx"])
    with smtplib.SMTP(host, port) as smtp:
        smtp.ehlo("sender.test")
        smtp.mail("jane@sender.test")
        code, text = smtp.rcpt("nobody@example.test")
        assert (code, text[:5]) == (550, b"5.1.1")
        code, _ = smtp.rcpt("someone@elsewhere.test")
        assert code == 550
        code, _ = smtp.docmd("DATA")
        assert code == 554  # no valid recipients: DATA never starts


def test_role_addresses_reach_the_operator(allinone: tuple[Process, dict[str, str]]) -> None:
    """In the all-in-one, the demo address is the operator's: the bare postmaster and the
    demo domain's postmaster@ and abuse@ are delivered to it, each named in Delivered-To."""
    proc, listeners = allinone
    host, port = host_port(listeners["mx"])
    rcpts = ["Postmaster", "postmaster@example.test", "abuse@EXAMPLE.test"]
    with smtplib.SMTP(host, port) as smtp:
        smtp.ehlo("sender.test")
        for n, rcpt in enumerate(rcpts):
            body = f"Subject: role mail {n}\r\n\r\nfor the operator\r\n".encode()
            assert smtp.sendmail("jane@sender.test", [rcpt], body) == {}
    imap = imap_login(proc, listeners)
    for n, rcpt in enumerate(rcpts):
        raw = wait_for(lambda n=n: find_by_subject(imap, f"role mail {n}"))
        assert email.message_from_bytes(raw)["Delivered-To"].lower() == rcpt.lower()
    imap.logout()


def test_bad_input_errors(allinone: tuple[Process, dict[str, str]]) -> None:
    proc, listeners = allinone
    host, port = host_port(listeners["mx"])
    with smtplib.SMTP(host, port) as smtp:
        smtp.ehlo("sender.test")
        code, _ = smtp.docmd("MAIL FROM:<not an address>")
        assert code == 501
        smtp.mail("jane@sender.test")
        code, _ = smtp.docmd("RCPT TO:<a@b@c>")
        assert code == 501
    imap_host, imap_port = host_port(listeners["imap"])
    imap = imaplib.IMAP4(imap_host, imap_port)
    with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
        imap.login("demo@example.test", "wrong password")
    status, body = http_get(listeners, "/localapi/v0/mail/messages", None)
    assert status == 401 and set(body) == {"error", "code", "statusCode", "action"}
    token = credentials(proc)["local_api_token"]
    status, body = http_get(listeners, "/localapi/v0/mail/messages/1234.nope.host", token)
    assert status == 404 and body["statusCode"] == 404
    for bad in ("..%2F..%2Fcredentials.json", "a%00b", ".."):
        status, body = http_get(listeners, f"/localapi/v0/mail/messages/{bad}", token)
        assert status in (400, 404) and set(body) == {"error", "code", "statusCode", "action"}


@pytest.mark.skipif(shutil.which("swaks") is None, reason="swaks is not installed")
def test_swaks_message_reaches_imap(allinone: tuple[Process, dict[str, str]]) -> None:
    proc, listeners = allinone
    host, port = host_port(listeners["mx"])
    out = subprocess.run(
        [
            "swaks",
            "--server",
            host,
            "--port",
            str(port),
            "--from",
            "sw@sender.test",
            "--to",
            "demo@example.test",
            "--header",
            "Subject: via swaks",
            "--body",
            "swaks body",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    imap = imap_login(proc, listeners)
    raw = wait_for(lambda: find_by_subject(imap, "via swaks"))
    assert b"swaks body" in raw
    imap.logout()


def test_acknowledged_message_survives_sigkill_and_arrives_once(tmp_path: Path) -> None:
    """250, then SIGKILL before delivery (the device is down): after restart, exactly once."""
    edge, device = edge_and_device(tmp_path)
    listeners = edge.start()
    try:
        host, port = host_port(listeners["mx"])
        with smtplib.SMTP(host, port) as smtp:
            smtp.sendmail("a@sender.test", ["me@home.test"], b"Subject: crash test\r\n\r\nbody\r\n")
        edge.kill()
        assert len(recoverable(spool_queue(edge).parent)) == 1
        [segment] = spool_queue(edge).glob("*.seg")

        device.start()
        edge.start()
        new = maildir_new(device)
        wait_for(lambda: list(new.iterdir()))
        wait_for(lambda: not recoverable(spool_queue(edge).parent))
        wait_for(lambda: not segment.exists())  # sealed by the restart, then finished
        # A further restart must not deliver it again.
        edge.stop()
        edge.start()
        stored = list(new.iterdir())
        assert len(stored) == 1
        assert b"Subject: crash test" in stored[0].read_bytes()
    finally:
        edge.stop()
        device.stop()


def test_delivery_events_are_kept_in_the_store(allinone: tuple[Process, dict[str, str]]) -> None:
    proc, listeners = allinone
    host, port = host_port(listeners["mx"])
    with smtplib.SMTP(host, port) as smtp:
        smtp.sendmail("ev@sender.test", ["demo@example.test"], b"Subject: events\r\n\r\nx\r\n")
    key = next(
        line
        for line in (proc.data_dir / "edge" / "admin.key").read_text().splitlines()
        if line and not line.startswith("#")
    )

    def events() -> list[dict[str, Any]]:
        req = urllib.request.Request(
            f"http://{listeners['control']}/v1/queue/events?recipient=demo@example.test",
            headers={"Authorization": f"Bearer {key}"},
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            found: list[dict[str, Any]] = json.loads(resp.read())["events"]
        return found

    found = wait_for(lambda: [e for e in events() if e["event"] == "delivered"])
    qids = {e["queue_id"] for e in found}
    accepted = [e for e in events() if e["event"] == "accepted" and e["queue_id"] in qids]
    assert accepted and all(e["recipient"] == "demo@example.test" for e in accepted)
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"http://{listeners['control']}/v1/queue/events", timeout=10)
    assert refused.value.code == 401
    with urllib.request.urlopen(f"http://{listeners['control']}/metrics", timeout=10) as resp:
        metrics = resp.read().decode()
    assert 'tailpost_delivery_events_total{event="delivered"}' in metrics
