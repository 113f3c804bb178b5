"""Address-mailbox mode: each assigned address has its own folder, in storage and in the API."""

from __future__ import annotations

from pathlib import Path

import pytest
from twisted.internet.task import Clock

from connector.receiver import ConnectorHandler
from edge.smtp.factory import SMTPServerFactory
from edge.smtp.server import Limits
from maildir import InvalidName, Maildir, MessageInfo, address_folder
from tests.test_connector_receiver import PASSWORD, USER, Conn, message, run_sync, traced
from tests.test_localapi import Client, run_now
from webapi.local.app import LocalAPI


class PerAddressDevice:
    def __init__(self, root: Path) -> None:
        self.maildir = Maildir(root / "mail", hostname="device.test")
        self.delivered: list[MessageInfo] = []
        self.clock = Clock()
        self.factory = SMTPServerFactory(
            lambda: ConnectorHandler(
                self.maildir, USER, PASSWORD, run_sync, self.delivered.append, per_address=True
            ),
            Limits(),
            "device.test",
            self.clock,
        )

    def connect(self) -> Conn:
        return Conn(self)  # type: ignore[arg-type]


def folder_files(maildir: Maildir, folder: str) -> list[bytes]:
    return [maildir.folder(folder).read(m.id) for m in maildir.folder(folder).messages()]


def test_address_folder_names() -> None:
    assert address_folder("Alerts@Example.COM") == "alerts@example_com"
    assert address_folder("first.last@mail.example.com") == "first_last@mail_example_com"
    assert address_folder("alerts@example_com") == "alerts@example_com"
    for bad in ("no-at-sign", "@example.com", "a@", "../x@y.z", "a/b@c.d"):
        with pytest.raises(InvalidName):
            address_folder(bad)


def test_each_recipient_gets_its_own_folder_once(tmp_path: Path) -> None:
    device = PerAddressDevice(tmp_path)
    conn = device.connect()
    assert conn.login() == [250, 235]
    data = message("0660C790C37DDB44B36CE2", "for two")
    rcpts = ("alerts@example.com", "Ops@Example.com")
    assert conn.transaction(data, rcpts)[-1].startswith("250")
    assert conn.transaction(data, rcpts)[-1].startswith("250")  # redelivered: stored once
    # Each folder's copy says which address it was delivered for.
    assert folder_files(device.maildir, "alerts@example_com") == [
        traced(data, "alerts@example.com")
    ]
    assert folder_files(device.maildir, "ops@example_com") == [traced(data, "ops@example.com")]
    assert folder_files(device.maildir, "INBOX") == []
    assert len(device.delivered) == 4  # two folders, each answered twice, stored once


def test_junk_goes_to_junk_once(tmp_path: Path) -> None:
    device = PerAddressDevice(tmp_path)
    conn = device.connect()
    conn.login()
    data = b"X-Tailpost-Queue-ID: 0660C790C37DDB44B36CE3\r\n" + (
        b"X-Tailpost-Verdict: action=junk; spam=Yes\r\nSubject: spam\r\n\r\nx\r\n"
    )
    conn.transaction(data, ("alerts@example.com", "ops@example.com"))
    assert folder_files(device.maildir, "Junk") == [
        traced(data, "alerts@example.com", "ops@example.com")
    ]
    assert "alerts@example_com" not in device.maildir.list_folders()


def test_api_takes_the_address_as_mailbox(tmp_path: Path) -> None:
    maildir = Maildir(tmp_path / "mail", hostname="testhost")
    maildir.create_folder(address_folder("alerts@example.com"))
    maildir.deliver(b"Subject: disk full\r\n\r\nsoon\r\n", "alerts@example_com")
    client = Client(LocalAPI(maildir, "local-test-token", run_blocking=run_now))
    reply = client.get("/localapi/v0/mail/messages?mailbox=alerts@example.com")
    assert reply.code == 200, reply.body
    assert [m["subject"] for m in reply.json()["messages"]] == ["disk full"]
    missing = client.get("/localapi/v0/mail/messages?mailbox=nobody@example.com")
    assert missing.code == 404
