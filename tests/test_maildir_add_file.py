"""Folder.add_file: a message written by the caller to a tmp/ file is delivered by rename
(no copy in memory), and the file is gone afterwards whether delivery succeeds or not."""

from __future__ import annotations

from pathlib import Path

import pytest

from maildir import Maildir, MaildirError


def test_add_file_moves_the_spool_into_the_folder(tmp_path: Path) -> None:
    md = Maildir(tmp_path / "mail", hostname="testhost")
    spool = md.spool_path()
    assert spool.parent == md.root / "tmp"
    spool.write_bytes(b"Subject: s\r\n\r\nbody\r\n")
    inode = spool.stat().st_ino
    info = md.folder("Sent").add_file(spool, ["\\Seen"], 1_700_000_000.0)
    assert not spool.exists()
    assert info.path.parent == md.root / ".Sent" / "cur"
    assert info.path.stat().st_ino == inode  # renamed, not copied
    assert info.path.read_bytes() == b"Subject: s\r\n\r\nbody\r\n"
    assert info.flags == {"\\Seen"} and info.internaldate == 1_700_000_000.0
    assert [m.uid for m in md.folder("Sent").messages()] == [info.uid]


def test_add_file_failure_removes_the_spool(tmp_path: Path) -> None:
    md = Maildir(tmp_path / "mail", hostname="testhost")
    spool = md.spool_path()
    spool.write_bytes(b"x")
    with pytest.raises((MaildirError, ValueError)):
        md.folder("INBOX").add_file(spool, ["\\Seen"], float("nan"))
    assert not spool.exists()
    assert list((md.root / "tmp").iterdir()) == []
    assert md.folder("INBOX").messages() == []
