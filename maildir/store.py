"""The Maildir++ tree of the device: folders, delivery with deduplication.

INBOX is the root directory; every other folder `a.b` lives in `root/.a.b`. This module
has no network code and must never create or remove anything outside `root`: every
folder name is validated before it becomes a path.
"""

from __future__ import annotations

import os
import shutil
import stat
import threading
from collections.abc import Iterable
from pathlib import Path

from .folder import Folder, MessageInfo
from .names import (
    FolderExists,
    FolderNotFound,
    InvalidName,
    MaildirError,
    MessageNotFound,
    UniqueNames,
    dedup_key_of,
    split_filename,
    validate_dedup_key,
    validate_folder_name,
)

DEFAULT_FOLDERS = ("Sent", "Drafts", "Junk", "Trash")


def _make_maildir(path: Path, subfolder: bool) -> None:
    # Mail is private: the folder and its tmp/new/cur are the owner's alone (0700; mkdir's
    # mode is filtered by the umask, which only ever takes bits away).
    # An older install's more open folders are narrowed to that.
    for directory in (path, path / "tmp", path / "new", path / "cur"):
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        if stat.S_IMODE(directory.stat().st_mode) & 0o077:
            os.chmod(directory, 0o700)
    if subfolder:
        (path / "maildirfolder").touch(exist_ok=True)


def _is_maildir(path: Path) -> bool:
    return all((path / sub).is_dir() for sub in ("tmp", "new", "cur"))


class Maildir:
    """A Maildir++ root with its folders. Thread-safe."""

    def __init__(self, root: str | Path, hostname: str | None = None) -> None:
        self.root = Path(root).resolve()
        self._names = UniqueNames(hostname)
        self._lock = threading.RLock()  # folder table
        self._deliver_lock = threading.Lock()  # dedup check + write
        self._index_lock = threading.Lock()  # leaf lock: the dedup index only
        self._folders: dict[str, Folder] = {}
        self._dedup: dict[str, tuple[str, str]] | None = None  # key -> (folder, id)
        _make_maildir(self.root, subfolder=False)
        for name in DEFAULT_FOLDERS:
            _make_maildir(self._path(name), subfolder=True)  # made, or its modes narrowed

    # -- folders --------------------------------------------------------------------

    def _path(self, name: str) -> Path:
        name = validate_folder_name(name)
        if name == "INBOX":
            return self.root
        return self.root / f".{name}"

    def list_folders(self) -> list[str]:
        names = []
        for entry in os.scandir(self.root):
            if not entry.name.startswith(".") or entry.name in (".", ".."):
                continue
            try:
                name = validate_folder_name(entry.name[1:])
            except InvalidName:
                continue
            if name != "INBOX" and _is_maildir(Path(entry.path)):
                names.append(name)
        return ["INBOX", *sorted(names)]

    def spool_path(self) -> Path:
        """A new, unused path in the root's tmp/ for a message being received: the caller
        creates and writes the file, then hands it to `Folder.add_file` or removes it.
        (A file left by a crash is removed with the rest of tmp/ after 36 hours.)"""
        return self.root / "tmp" / self._names.new()

    def folder(self, name: str) -> Folder:
        name = validate_folder_name(name)
        with self._lock:
            f = self._folders.get(name)
            if f is not None and _is_maildir(f.path):
                return f
            path = self._path(name)
            if not _is_maildir(path):
                self._folders.pop(name, None)
                raise FolderNotFound(name)
            f = Folder(name, path, self._names, self._index_changed)
            self._folders[name] = f
            return f

    def create_folder(self, name: str) -> Folder:
        name = validate_folder_name(name)
        with self._lock:
            path = self._path(name)
            if name == "INBOX" or path.exists():
                raise FolderExists(name)
            _make_maildir(path, subfolder=True)
            return self.folder(name)

    def ensure_folder(self, name: str) -> Folder:
        """The folder `name`, made first if it is missing (say the user deleted it and mail
        must still land there)."""
        try:
            return self.folder(name)
        except FolderNotFound:
            pass
        try:
            return self.create_folder(name)
        except FolderExists:
            return self.folder(name)

    def delete_folder(self, name: str) -> None:
        name = validate_folder_name(name)
        if name == "INBOX":
            raise MaildirError("INBOX cannot be deleted")
        with self._lock:
            path = self._path(name)
            if not _is_maildir(path):
                raise FolderNotFound(name)
            # Rename first so a half-finished removal never looks like a folder.
            doomed = self.root / f".tailpost-deleted.{os.getpid()}.{threading.get_ident()}"
            os.rename(path, doomed)
            self._folders.pop(name, None)
            self._forget_index()
        shutil.rmtree(doomed, ignore_errors=True)

    def rename_folder(self, old: str, new: str) -> None:
        old = validate_folder_name(old)
        new = validate_folder_name(new)
        if "INBOX" in (old, new):
            raise MaildirError("INBOX cannot be renamed")
        with self._lock:
            src = self._path(old)
            if not _is_maildir(src):
                raise FolderNotFound(old)
            moves = [(old, new)]
            for name in self.list_folders():
                if name.startswith(old + "."):
                    moves.append((name, new + name[len(old) :]))
            for _, dest_name in moves:
                validate_folder_name(dest_name)
                if self._path(dest_name).exists():
                    raise FolderExists(dest_name)
            for src_name, dest_name in moves:
                os.rename(self._path(src_name), self._path(dest_name))
                self._folders.pop(src_name, None)
            self._forget_index()

    # -- delivery -------------------------------------------------------------------

    def deliver(
        self,
        data: bytes,
        folder: str = "INBOX",
        *,
        dedup_key: str | None = None,
        flags: Iterable[str] = (),
        internaldate: float | None = None,
    ) -> MessageInfo:
        target = self.folder(folder)
        if dedup_key is None:
            return target.add(data, flags, internaldate)
        validate_dedup_key(dedup_key)
        with self._deliver_lock:
            existing = self._lookup(dedup_key)
            if existing is not None:
                return existing
            return target._add(self._names.new(dedup_key), data, flags, internaldate)

    def has_dedup_key(self, key: str) -> bool:
        validate_dedup_key(key)
        return self._lookup(key) is not None

    # -- dedup index ----------------------------------------------------------------

    def _lookup(self, key: str) -> MessageInfo | None:
        with self._index_lock:
            hit = self._index().get(key)
        if hit is None:
            return None
        folder_name, msg_id = hit
        try:
            return self.folder(folder_name).get(msg_id)
        except (FolderNotFound, MessageNotFound):
            with self._index_lock:
                if self._dedup is not None and self._dedup.get(key) == hit:
                    del self._dedup[key]
            return None

    def _index(self) -> dict[str, tuple[str, str]]:
        """Return the dedup index (caller holds _index_lock), building it on first use."""
        if self._dedup is None:
            index: dict[str, tuple[str, str]] = {}
            for name in self.list_folders():
                path = self._path(name)
                for sub in ("new", "cur"):
                    try:
                        listing = os.listdir(path / sub)
                    except FileNotFoundError:
                        continue
                    for filename in listing:
                        msg_id = split_filename(filename)[0]
                        key = dedup_key_of(msg_id)
                        if key is not None:
                            index[key] = (name, msg_id)
            self._dedup = index
        return self._dedup

    def _index_changed(self, event: str, msg_id: str, folder: str | None) -> None:
        key = dedup_key_of(msg_id)
        if key is None:
            return
        with self._index_lock:
            if self._dedup is None:
                return
            if folder is None:
                self._dedup.pop(key, None)
            else:
                self._dedup[key] = (folder, msg_id)

    def _forget_index(self) -> None:
        with self._index_lock:
            self._dedup = None
