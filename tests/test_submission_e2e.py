"""Submission in the all-in-one, a real `twistd tailpost` process: listening.json names the
submission listener, a mail client sends through it with the demo address's IMAP password,
the device relays to its own edge (pointed at the relay's real port once it listens), the
edge delivers the message back to the demo address, and the device records it delivered.
"""

from __future__ import annotations

import imaplib
import json
import smtplib
import ssl
from collections.abc import Iterator
from typing import Any

import pytest

from tests.processes import Process, allinone_config, host_port, wait_for
from tests.test_e2e import credentials, find_by_subject, imap_login

DEMO = "demo@example.test"


@pytest.fixture(scope="module")
def allinone(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Process, dict[str, str]]]:
    proc = Process("tailpost", tmp_path_factory.mktemp("aio-submission"), allinone_config())
    listeners = proc.start()
    yield proc, listeners
    proc.stop()


def _events(proc: Process) -> list[dict[str, Any]]:
    path = proc.data_dir / "device" / "outbound-events.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_bytes().splitlines() if line.strip()]


def test_a_client_sends_through_submission_and_the_mail_comes_back(
    allinone: tuple[Process, dict[str, str]],
) -> None:
    proc, listeners = allinone
    assert "submission" in listeners and "relay" in listeners
    host, port = host_port(listeners["submission"])
    password = credentials(proc)["imap"][DEMO]
    message = (
        f"From: Demo <{DEMO}>\r\nTo: {DEMO}\r\nSubject: submitted to myself\r\n\r\n"
        "Through the submission listener, the queue and the relay.\r\n"
    ).encode()
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    with smtplib.SMTP(host, port, timeout=20) as client:
        client.starttls(context=context)
        client.login(DEMO, password)
        client.sendmail(DEMO, [DEMO], message)

    imap = imap_login(proc, listeners)
    assert wait_for(lambda: find_by_subject(imap, "submitted to myself") is not None)
    imap.select("Sent")
    _typ, data = imap.uid("SEARCH", "SUBJECT", '"submitted to myself"')  # type: ignore[arg-type]
    assert data[0] and len(data[0].split()) == 1
    _typ, flags = imap.uid("FETCH", data[0].split()[0], "(FLAGS)")
    assert b"\\Seen" in flags[0]  # type: ignore[operator]
    imap.logout()

    def statuses() -> list[str]:
        return [e["status"] for e in _events(proc) if e.get("subject") == "submitted to myself"]

    assert wait_for(lambda: "delivered" in statuses())
    assert statuses() == ["submitted", "relayed", "delivered"]
    assert list((proc.data_dir / "device" / "outbound" / "queue").iterdir()) == []


def test_a_wrong_password_is_535(allinone: tuple[Process, dict[str, str]]) -> None:
    _proc, listeners = allinone
    host, port = host_port(listeners["submission"])
    with smtplib.SMTP(host, port, timeout=20) as client:
        with pytest.raises(smtplib.SMTPAuthenticationError) as failed:
            client.login(DEMO, "not the password")
    assert failed.value.smtp_code == 535


def test_imap_sees_the_sent_folder(allinone: tuple[Process, dict[str, str]]) -> None:
    proc, listeners = allinone
    imap: imaplib.IMAP4 = imap_login(proc, listeners)
    typ, _data = imap.select("Sent")
    assert typ == "OK"
    imap.logout()
