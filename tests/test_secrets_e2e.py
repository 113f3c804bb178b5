"""Secrets at rest in a real all-in-one: file modes, an encrypted store, a clear key error.

After a first start every directory holding secrets or mail is 0700 and every secret file
0600; a copy of the store (with its -wal) shows neither the connector password nor a DKIM
private key, in any column or anywhere in its bytes, while mail still reaches the device
over the connector, which only accepts the decrypted password. An older install's open
modes are narrowed on start (with a log line), and a wrong or missing store key stops the
start with an error that says so.
"""

from __future__ import annotations

import imaplib
import json
import shutil
import smtplib
import sqlite3
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

from edge.domains.scan import generate_dkim_keys
from edge.store import open_store
from edge.store.access import AccessStore
from edge.store.keyring import load_keys
from tests.processes import Process, allinone_config, host_port, wait_for

PRIVATE_DIRS = (
    "",
    "edge",
    "edge/spool",
    "edge/spool/queue",
    "edge/spool/tmp",
    "device",
    "device/Maildir",
    "device/Maildir/new",
    "device/Maildir/.Junk",
    "tls",
)
SECRET_FILES = (
    "edge/store.db",
    "edge/store.db-wal",
    "edge/store.db-shm",
    "edge/store.key",
    "edge/admin.key",
    "device/credentials.json",
    "device/edge-link.json",
    "tls/key.pem",
)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(scope="module")
def aio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Process]:
    proc = Process("tailpost", tmp_path_factory.mktemp("secrets"), allinone_config())
    proc.start()
    yield proc
    proc.stop()


def test_first_start_makes_secrets_and_mail_private(aio: Process) -> None:
    for name in PRIVATE_DIRS:
        assert _mode(aio.data_dir / name) == 0o700, name
    for name in SECRET_FILES:
        assert _mode(aio.data_dir / name) == 0o600, name


def test_a_copied_store_reveals_no_secret(aio: Process, tmp_path: Path) -> None:
    data = aio.data_dir
    password = json.loads((data / "device" / "credentials.json").read_text())["connector"][
        "password"
    ]
    # The demo domain's DKIM keys, made at the first start, and one more pair added as the
    # control API's prepare step does, by an operator's script.
    store = open_store(
        f"sqlite:///{data / 'edge' / 'store.db'}", keys=load_keys(data / "edge" / "store.key")
    )
    try:
        access = AccessStore(store)
        made = access.dkim_keys("example.test")
        assert [k.algorithm for k in made] == ["rsa", "ed25519"]
        added = generate_dkim_keys("202701")
        for key in added:
            access.add_dkim_key(
                "other.test", key.selector, key.algorithm, key.private_pem, key.public_b64
            )
        private = [k.private_key for k in made] + [k.private_pem for k in added]
        device = store.get_device("dev_local")
        assert device is not None and device.connector_secret == password  # readable with key
    finally:
        store.close()
    for name in ("store.db", "store.db-wal", "store.db-shm"):
        shutil.copy(data / "edge" / name, tmp_path / name)
    secrets = [password.encode()]
    for pem in private:
        body = [ln for ln in pem.splitlines() if ln and not ln.startswith("-----")]
        secrets += [ln.encode() for ln in body] or [pem.encode()]
    raw = b"".join((tmp_path / n).read_bytes() for n in ("store.db", "store.db-wal"))
    for secret in secrets:
        assert secret not in raw
    db = sqlite3.connect(tmp_path / "store.db")
    tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
    seen = 0
    for table in tables:
        for row in db.execute(f'SELECT * FROM "{table}"'):
            for value in row:
                text = value.decode("latin-1") if isinstance(value, bytes) else str(value)
                assert not any(s.decode() in text for s in secrets), table
                seen += 1
    assert seen and "dkim_keys" in tables
    assert db.execute("SELECT count(*) FROM dkim_keys").fetchone()[0] == len(private)


def test_mail_reaches_the_device_with_the_decrypted_connector_secret(aio: Process) -> None:
    listeners = json.loads(aio.listening_file.read_text())["listeners"]
    host, port = host_port(listeners["mx"])
    with smtplib.SMTP(host, port) as smtp:
        smtp.sendmail(
            "jane@sender.test",
            ["demo@example.test"],
            b"From: jane@sender.test\r\nTo: demo@example.test\r\nSubject: sealed hello\r\n"
            b"\r\nHello.\r\n",
        )
    creds = json.loads((aio.data_dir / "device" / "credentials.json").read_text())
    ihost, iport = host_port(listeners["imap"])
    imap = imaplib.IMAP4(ihost, iport)
    imap.login("demo@example.test", creds["imap"]["demo@example.test"])

    def found() -> bool:
        imap.select("INBOX")
        _typ, data = imap.uid("SEARCH", "SUBJECT", '"sealed hello"')  # type: ignore[arg-type]
        return bool(data and data[0])

    assert wait_for(found)
    imap.logout()


def test_an_older_install_is_narrowed_on_start(tmp_path: Path) -> None:
    proc = Process("tailpost", tmp_path / "old", allinone_config())
    proc.start()
    proc.stop()
    data = proc.data_dir
    for name in PRIVATE_DIRS:
        (data / name).chmod(0o755)
    for name in SECRET_FILES:
        if (data / name).exists():
            (data / name).chmod(0o644)
    proc.start()
    try:
        for name in PRIVATE_DIRS:
            assert _mode(data / name) == 0o700, name
        for name in SECRET_FILES:
            assert _mode(data / name) == 0o600, name
        log = proc.log()
        assert f"{data / 'edge' / 'store.key'} was mode 644; now 600" in log
        assert f"{data / 'device'} was mode 755; now 700" in log
    finally:
        proc.stop()


def test_a_wrong_or_missing_store_key_stops_the_start(tmp_path: Path) -> None:
    proc = Process("tailpost", tmp_path / "keyed", allinone_config())
    proc.start()
    proc.stop()
    key_file = proc.data_dir / "edge" / "store.key"
    right = key_file.read_text()

    key_file.write_text(Fernet.generate_key().decode() + "\n")
    with pytest.raises(RuntimeError) as wrong:
        proc.start()
    assert "does not open the secret in devices.connector_secret" in str(wrong.value)
    assert "same key file" in str(wrong.value)

    key_file.unlink()
    with pytest.raises(RuntimeError) as missing:
        proc.start()
    assert f"the store key file {key_file} is missing" in str(missing.value)
    assert not key_file.exists()  # the key made on that start was not left behind

    key_file.write_text(right)
    key_file.chmod(0o600)
    proc.start()  # the right key again: it starts
    proc.stop()
