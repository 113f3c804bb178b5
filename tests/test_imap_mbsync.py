"""Interop with a real IMAP client: mbsync (isync) pulls the all-in-one's mail into a Maildir.

mbsync is strict about the protocol (UIDVALIDITY, UIDNEXT, FETCH responses, flags), so a
clean two-way sync is good evidence that desktop clients will work too.
"""

from __future__ import annotations

import shutil
import smtplib
import subprocess
from pathlib import Path

import pytest

from tests.processes import Process, allinone_config, host_port, wait_for
from tests.test_e2e import credentials

pytestmark = pytest.mark.skipif(shutil.which("mbsync") is None, reason="mbsync is not installed")


def mbsync(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["mbsync", "-c", str(config), "-a"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_mbsync_pulls_mail_and_pushes_flags(tmp_path: Path) -> None:
    proc = Process("tailpost", tmp_path / "aio", allinone_config())
    listeners = proc.start()
    try:
        mx_host, mx_port = host_port(listeners["mx"])
        with smtplib.SMTP(mx_host, mx_port) as smtp:
            for n in range(3):
                smtp.sendmail(
                    "s@sender.test",
                    ["demo@example.test"],
                    f"Subject: sync {n}\r\nMessage-ID: <sync-{n}@sender.test>\r\n\r\nbody {n}\r\n",
                )
        inbox_new = proc.data_dir / "device" / "Maildir" / "new"
        wait_for(lambda: len(list(inbox_new.iterdir())) == 3)

        host, port = host_port(listeners["imap"])
        local = tmp_path / "local"
        local.mkdir()
        password = credentials(proc)["imap"]["demo@example.test"]
        config = tmp_path / "mbsyncrc"
        config.write_text(
            f"""IMAPAccount tailpost
Host {host}
Port {port}
User demo@example.test
Pass {password}
SSLType None
AuthMechs LOGIN

IMAPStore remote
Account tailpost

MaildirStore local
Path {local}/
Inbox {local}/INBOX
SubFolders Verbatim

Channel inbox
Far :remote:INBOX
Near :local:INBOX
Create Near
Sync All
Expunge Both
SyncState *
"""
        )
        first = mbsync(config)
        assert first.returncode == 0, first.stdout + first.stderr
        pulled = sorted((local / "INBOX" / "new").iterdir()) + sorted(
            (local / "INBOX" / "cur").iterdir()
        )
        assert len(pulled) == 3
        assert {p.read_bytes().split(b"Subject: ")[1][:6] for p in pulled} == {
            b"sync 0",
            b"sync 1",
            b"sync 2",
        }

        # Mark one read locally; the next sync pushes \Seen to the server's file name.
        target = pulled[0]
        cur = local / "INBOX" / "cur"
        base = target.name.split(":2,")[0]
        target.rename(cur / f"{base}:2,S")
        second = mbsync(config)
        assert second.returncode == 0, second.stdout + second.stderr
        server_cur = proc.data_dir / "device" / "Maildir" / "cur"
        seen = [p for p in server_cur.iterdir() if p.name.endswith(":2,S")]
        assert len(seen) == 1

        # A third sync with nothing new is a no-op: UIDs and UIDVALIDITY held.
        third = mbsync(config)
        assert third.returncode == 0, third.stdout + third.stderr
        assert (
            len(list((local / "INBOX" / "cur").iterdir()))
            + len(list((local / "INBOX" / "new").iterdir()))
            == 3
        )
    finally:
        proc.stop()
