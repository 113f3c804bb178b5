"""Tests of the Maildir++ store: delivery, flags, UIDs, dedup, names and folders."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest

from maildir import (
    FolderExists,
    FolderNotFound,
    InvalidName,
    Maildir,
    MaildirError,
    MessageNotFound,
    validate_folder_name,
    validate_message_id,
)

MSG = b"From: a@example.org\r\nTo: b@example.org\r\nSubject: hi\r\n\r\nbody\r\n"


@pytest.fixture
def md(tmp_path: Path) -> Maildir:
    return Maildir(tmp_path / "mail", hostname="dev/ice:1")


def test_layout_and_default_folders(md: Maildir) -> None:
    for sub in ("tmp", "new", "cur"):
        assert (md.root / sub).is_dir()
    assert md.list_folders() == ["INBOX", "Drafts", "Junk", "Sent", "Trash"]
    assert (md.root / ".Trash" / "maildirfolder").exists()


def test_deliver_lands_in_new_with_bytes_and_no_tmp(md: Maildir) -> None:
    info = md.deliver(MSG, internaldate=1_000_000_000.0)
    assert info.path.parent == md.root / "new"
    assert info.path.read_bytes() == MSG
    assert info.size == len(MSG)
    assert info.recent and info.flags == frozenset()
    assert info.internaldate == pytest.approx(1_000_000_000.0)
    assert info.uid == 1 and info.folder == "INBOX"
    assert os.listdir(md.root / "tmp") == []
    assert "/" not in info.id and ":" not in info.id
    assert info.id.endswith(".dev_ice_1")
    assert md.folder("inbox").read(info.id) == MSG


def test_deliver_with_flags_goes_to_cur(md: Maildir) -> None:
    info = md.deliver(MSG, "Sent", flags=["\\Seen", "\\Answered"])
    assert info.path.parent == md.root / ".Sent" / "cur"
    assert info.path.name == f"{info.id}:2,RS"
    assert info.flags == {"\\Seen", "\\Answered"}


def test_flags_round_trip_through_names(md: Maildir) -> None:
    inbox = md.folder("INBOX")
    info = md.deliver(MSG)
    new = inbox.set_flags(info.id, ["\\Seen", "\\Flagged", "\\Deleted", "\\Draft"])
    assert new.path.name == f"{info.id}:2,DFST"
    assert new.uid == info.uid and new.id == info.id and not new.recent
    assert inbox.get(info.id).flags == {"\\Seen", "\\Flagged", "\\Deleted", "\\Draft"}
    assert inbox.set_flags(info.id, []).path.name == f"{info.id}:2,"


def test_hand_written_name_and_unknown_letters(md: Maildir) -> None:
    (md.root / "cur" / "1700000000.M1P2Q3.other:2,FSa").write_bytes(MSG)
    inbox = md.folder("INBOX")
    (info,) = inbox.messages()
    assert info.flags == {"\\Flagged", "\\Seen"}
    after = inbox.set_flags(info.id, ["\\Seen", "\\Answered"])
    assert after.path.name == "1700000000.M1P2Q3.other:2,RSa"


def test_uids_and_uidvalidity_survive_restart(tmp_path: Path) -> None:
    root = tmp_path / "m"
    md = Maildir(root)
    ids = [md.deliver(MSG + bytes([65 + i])).id for i in range(3)]
    inbox = md.folder("INBOX")
    inbox.set_flags(ids[1], ["\\Seen"])
    inbox.remove(ids[0])
    before = [(m.id, m.uid) for m in inbox.messages()]
    validity = inbox.uidvalidity
    again = Maildir(root).folder("INBOX")
    assert again.uidvalidity == validity
    assert [(m.id, m.uid) for m in again.messages()] == before == [(ids[1], 2), (ids[2], 3)]
    assert again.uidnext() == 4
    assert Maildir(root).deliver(MSG).uid == 4


def test_external_file_gets_next_uid(md: Maildir) -> None:
    inbox = md.folder("INBOX")
    md.deliver(MSG)
    assert [m.uid for m in inbox.messages()] == [1]
    (md.root / "new" / "1800000000.M5P6Q7.elsewhere").write_bytes(MSG)
    msgs = inbox.messages()
    assert [(m.uid, m.id) for m in msgs][1] == (2, "1800000000.M5P6Q7.elsewhere")
    assert inbox.get_by_uid(2).id == "1800000000.M5P6Q7.elsewhere"


def test_moved_back_message_gets_a_new_higher_uid(md: Maildir) -> None:
    inbox, trash = md.folder("INBOX"), md.folder("Trash")
    info = md.deliver(MSG)
    md.deliver(MSG)
    moved = inbox.move(info.id, trash)
    back = trash.move(moved.id, inbox)
    assert back.uid == 3 and back.id == info.id


def test_dedup_key_returns_same_message_and_writes_nothing(tmp_path: Path) -> None:
    root = tmp_path / "m"
    md = Maildir(root)
    first = md.deliver(MSG, dedup_key="abc-123")
    assert "Xabc-123." in first.id
    assert md.has_dedup_key("abc-123") and not md.has_dedup_key("other")
    second = md.deliver(b"different", dedup_key="abc-123")
    assert second.id == first.id and second.uid == first.uid
    assert len(os.listdir(root / "new")) == 1
    # After a restart the index is rebuilt from names.
    md2 = Maildir(root)
    assert md2.deliver(MSG, dedup_key="abc-123").id == first.id
    # After a move to Trash the key still matches, now in Trash.
    moved = md2.folder("INBOX").move(first.id, md2.folder("Trash"))
    third = md2.deliver(MSG, dedup_key="abc-123")
    assert third.id == first.id and third.folder == "Trash" and third.uid == moved.uid
    assert os.listdir(root / "new") == [] and os.listdir(root / "cur") == []
    assert Maildir(root).deliver(MSG, dedup_key="abc-123").folder == "Trash"
    # Once removed, the key is free again.
    md2.folder("Trash").remove(first.id)
    assert not md2.has_dedup_key("abc-123")
    assert md2.deliver(MSG, dedup_key="abc-123").folder == "INBOX"


def test_dedup_key_validated(md: Maildir) -> None:
    for bad in ("", "a.b", "a/b", "x" * 81):
        with pytest.raises(InvalidName):
            md.deliver(MSG, dedup_key=bad)


@pytest.mark.parametrize("bad", ["../x", "a/b", "a\x00b", "..", "", ".hidden", "a:2,S", "a..b"])
def test_invalid_ids_raise(md: Maildir, bad: str) -> None:
    with pytest.raises(InvalidName):
        validate_message_id(bad)
    inbox = md.folder("INBOX")
    for op in (inbox.get, inbox.read, inbox.remove):
        with pytest.raises(InvalidName):
            op(bad)
    with pytest.raises(InvalidName):
        inbox.set_flags(bad, ["\\Seen"])


@pytest.mark.parametrize("bad", ["", ".a", "a.", "a..b", "../x", "a/b", "x" * 65, "é", "INBOX.x"])
def test_invalid_folder_names(md: Maildir, bad: str) -> None:
    with pytest.raises(InvalidName):
        validate_folder_name(bad)
    with pytest.raises(InvalidName):
        md.create_folder(bad)
    with pytest.raises(InvalidName):
        md.folder(bad)


def test_missing_message_and_folder(md: Maildir) -> None:
    with pytest.raises(MessageNotFound):
        md.folder("INBOX").get("123.M1P1Q1.nowhere")
    with pytest.raises(MessageNotFound):
        md.folder("INBOX").get_by_uid(99)
    with pytest.raises(FolderNotFound):
        md.folder("Nope")


def test_expunge(md: Maildir) -> None:
    inbox = md.folder("INBOX")
    infos = [md.deliver(MSG) for _ in range(4)]
    inbox.set_flags(infos[3].id, ["\\Deleted"])
    inbox.set_flags(infos[1].id, ["\\Deleted", "\\Seen"])
    assert inbox.expunge() == [2, 4]
    assert [m.uid for m in inbox.messages()] == [1, 3]
    assert not infos[1].path.exists()
    assert inbox.expunge() == []


def test_move_and_add(md: Maildir) -> None:
    inbox, junk = md.folder("INBOX"), md.folder("Junk")
    junk.add(MSG)
    info = md.deliver(MSG)
    inbox.set_flags(info.id, ["\\Seen"])
    moved = junk.move(junk.messages()[0].id, inbox)
    assert moved.folder == "INBOX" and moved.uid == 2
    moved2 = inbox.move(info.id, junk)
    assert moved2.uid == 2 and moved2.flags == {"\\Seen"} and moved2.path.exists()
    assert [m.uid for m in inbox.messages()] == [2]
    added = junk.add(b"x", flags=["\\Draft"], internaldate=12345.0)
    assert added.uid == 3 and added.flags == {"\\Draft"} and added.internaldate == 12345.0


def test_folder_create_list_rename_delete(md: Maildir) -> None:
    md.create_folder("Work")
    md.create_folder("Work.Projects")
    with pytest.raises(FolderExists):
        md.create_folder("Work")
    with pytest.raises(FolderExists):
        md.create_folder("inbox")
    assert md.list_folders() == [
        "INBOX",
        "Drafts",
        "Junk",
        "Sent",
        "Trash",
        "Work",
        "Work.Projects",
    ]
    info = md.deliver(MSG, "Work.Projects")
    md.rename_folder("Work", "Jobs")
    assert "Jobs.Projects" in md.list_folders() and "Work" not in md.list_folders()
    assert md.folder("Jobs.Projects").get(info.id).uid == info.uid
    with pytest.raises(FolderNotFound):
        md.folder("Work.Projects")
    md.delete_folder("Jobs.Projects")
    assert "Jobs.Projects" not in md.list_folders()
    with pytest.raises(FolderNotFound):
        md.delete_folder("Jobs.Projects")
    with pytest.raises(MaildirError):
        md.delete_folder("INBOX")
    assert sorted(n for n in os.listdir(md.root) if n.startswith(".")) == sorted(
        [".Sent", ".Drafts", ".Junk", ".Trash", ".Jobs"]
    )


def test_old_tmp_files_are_cleaned(tmp_path: Path) -> None:
    md = Maildir(tmp_path / "m")
    stale = md.root / "tmp" / "1.M1P1Q1.x"
    fresh = md.root / "tmp" / "2.M1P1Q1.x"
    stale.write_bytes(b"x")
    fresh.write_bytes(b"y")
    old = time.time() - 40 * 3600
    os.utime(stale, (old, old))
    Maildir(tmp_path / "m").folder("INBOX")
    assert not stale.exists() and fresh.exists()


def test_uidlist_compacts(md: Maildir) -> None:
    inbox = md.folder("INBOX")
    for _ in range(300):
        inbox.remove(md.deliver(MSG).id)
    keep = md.deliver(MSG)
    lines = (md.root / "tailpost-uidlist").read_text().splitlines()
    assert len(lines) < 300
    again = Maildir(md.root).folder("INBOX")
    assert [m.uid for m in again.messages()] == [keep.uid] == [301]
    assert again.uidnext() == 302


def test_reading_a_known_message_does_not_rescan_the_folder(
    md: Maildir, monkeypatch: pytest.MonkeyPatch
) -> None:
    infos = [md.deliver(MSG + b"%d\r\n" % i) for i in range(20)]
    folder = md.folder("INBOX")
    folder.messages()  # listed once
    listed: list[str] = []
    real = os.listdir

    def listdir(path: Any) -> list[str]:
        listed.append(str(path))
        return real(path)

    monkeypatch.setattr(os, "listdir", listdir)
    fresh = md.deliver(MSG + b"new\r\n")  # the directory's mtime moves
    assert folder.read(fresh.id) == MSG + b"new\r\n"
    assert folder.read(infos[3].id) == MSG + b"3\r\n"
    assert listed == []  # content never changes: the listing in hand is enough


def test_a_message_renamed_by_another_process_is_still_read(md: Maildir) -> None:
    info = md.deliver(MSG)
    folder = md.folder("INBOX")
    folder.messages()
    # Another process marks it seen: the file moves to cur/ under a new name.
    os.rename(info.path, md.root / "cur" / (info.path.name + ":2,S"))
    assert folder.read(info.id) == MSG
    os.unlink(md.root / "cur" / (info.path.name + ":2,S"))
    with pytest.raises(MessageNotFound):
        folder.read(info.id)


def test_ensure_folder_makes_a_missing_folder_and_keeps_an_existing_one(md: Maildir) -> None:
    assert md.ensure_folder("INBOX").path == md.root
    info = md.deliver(MSG, md.ensure_folder("Lists").name)
    assert "Lists" in md.list_folders()
    assert md.ensure_folder("Lists").get(info.id).uid == info.uid  # kept, not made again
    md.delete_folder("Lists")
    with pytest.raises(FolderNotFound):
        md.folder("Lists")
    assert md.ensure_folder("Lists").name == "Lists"
    assert md.folder("Lists").messages() == []
