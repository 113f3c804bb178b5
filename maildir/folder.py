"""One Maildir folder: its messages, their flags (in file names) and persistent UIDs.

A Folder caches the listing of new/ and cur/ and rescans only when a directory mtime
changed (or is too recent to trust). All state is guarded by a per-folder lock because
the reactor thread and worker threads use the same Folder. It must never build a path
from an unvalidated name, and never write a message anywhere but tmp/ first.
"""

from __future__ import annotations

import errno
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from .durable import fsync_dir
from .names import (
    MessageNotFound,
    UniqueNames,
    flags_to_info,
    info_to_flags,
    normalize_flags,
    split_filename,
    validate_message_id,
)
from .uidlist import UidList

_TMP_MAX_AGE = 36 * 3600
_MTIME_TRUST_SECONDS = 2.0


@dataclass(frozen=True, slots=True)
class MessageInfo:
    """What the store knows about one message, without reading its content."""

    id: str
    uid: int
    flags: frozenset[str]
    size: int
    internaldate: float
    path: Path
    recent: bool
    folder: str


@dataclass(slots=True)
class _Entry:
    filename: str
    subdir: str  # "new" or "cur"
    size: int
    mtime: float
    other_letters: str
    flags: frozenset[str]


def write_message(
    folder_path: Path,
    msg_id: str,
    data: bytes,
    flags: Iterable[str],
    internaldate: float | None,
) -> Path:
    """Write `data` to tmp/, fsync it, rename it into new/ (or cur/ with flags), fsync the dir."""
    validate_message_id(msg_id)
    flagset = normalize_flags(flags)
    tmp_path = folder_path / "tmp" / msg_id
    fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if internaldate is not None:
            os.utime(tmp_path, (internaldate, internaldate))
        if flagset:
            dest = folder_path / "cur" / f"{msg_id}:{flags_to_info(flagset)}"
        else:
            dest = folder_path / "new" / msg_id
        if dest.exists():
            raise FileExistsError(errno.EEXIST, "message already exists", str(dest))
        os.rename(tmp_path, dest)
    except BaseException:
        try:
            os.unlink(tmp_path)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(dest.parent)
    return dest


def deliver_file(
    folder_path: Path,
    msg_id: str,
    src: Path,
    flags: Iterable[str],
    internaldate: float | None,
) -> Path:
    """Move the finished file `src` (in a tmp/ of the same Maildir) into new/ (or cur/ with
    flags) under `msg_id`: fsync it, rename it, fsync the dir. Across file systems (a folder
    mounted elsewhere) it is copied into the folder's tmp/ first. `src` is gone afterwards
    whether this succeeds or fails."""
    validate_message_id(msg_id)
    flagset = normalize_flags(flags)
    if flagset:
        dest = folder_path / "cur" / f"{msg_id}:{flags_to_info(flagset)}"
    else:
        dest = folder_path / "new" / msg_id
    moved = src
    try:
        fd = os.open(src, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        if internaldate is not None:
            os.utime(src, (internaldate, internaldate))
        if dest.exists():
            raise FileExistsError(errno.EEXIST, "message already exists", str(dest))
        try:
            os.rename(src, dest)
        except OSError as e:
            if e.errno != errno.EXDEV:
                raise
            with open(src, "rb") as f:
                moved = folder_path / "tmp" / msg_id
                _copy_durably(f, moved)
            if internaldate is not None:
                os.utime(moved, (internaldate, internaldate))
            os.rename(moved, dest)
    except BaseException:
        for path in {src, moved}:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        raise
    if moved != src:
        os.unlink(src)
    fsync_dir(dest.parent)
    return dest


def _copy_durably(f: BinaryIO, path: Path) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        shutil.copyfileobj(f, out, 1 << 20)
        out.flush()
        os.fsync(out.fileno())


def clean_tmp(folder_path: Path, now: float | None = None) -> None:
    """Remove files left in tmp/ by interrupted deliveries (older than 36 hours)."""
    now = time.time() if now is None else now
    try:
        entries = list(os.scandir(folder_path / "tmp"))
    except FileNotFoundError:
        return
    for entry in entries:
        try:
            if entry.is_file(follow_symlinks=False) and now - entry.stat().st_mtime > _TMP_MAX_AGE:
                os.unlink(entry.path)
        except OSError:
            pass


class Folder:
    """A Maildir folder. Use Maildir.folder() to get one; do not construct directly."""

    def __init__(
        self,
        name: str,
        path: Path,
        names: UniqueNames,
        on_change: Callable[[str, str, str | None], None] | None = None,
    ) -> None:
        self.name = name
        self.path = path
        self._names = names
        self._on_change = on_change  # (event, msg_id, folder or None)
        self._lock = threading.RLock()
        self._uids = UidList(path)
        self.uidvalidity = self._uids.uidvalidity
        self._entries: dict[str, _Entry] = {}
        self._stamp: tuple[int, int] | None = None
        self._sorted: list[MessageInfo] | None = None
        self._by_uid: dict[int, str] = {}
        clean_tmp(path)

    # -- scanning -------------------------------------------------------------------

    def _dir_stamp(self) -> tuple[tuple[int, int], bool]:
        new = os.stat(self.path / "new")
        cur = os.stat(self.path / "cur")
        newest = max(new.st_mtime, cur.st_mtime)
        return (new.st_mtime_ns, cur.st_mtime_ns), time.time() - newest < _MTIME_TRUST_SECONDS

    def _list_dirs(self) -> dict[str, _Entry]:
        entries: dict[str, _Entry] = {}
        for subdir in ("new", "cur"):
            try:
                listing = os.listdir(self.path / subdir)
            except FileNotFoundError:
                continue
            for filename in listing:
                if filename.startswith("."):
                    continue
                msg_id, info = split_filename(filename)
                try:
                    validate_message_id(msg_id)
                except ValueError:
                    continue
                old = self._entries.get(msg_id)
                if old is not None and old.filename == filename and old.subdir == subdir:
                    entries[msg_id] = old
                    continue
                try:
                    st = os.stat(self.path / subdir / filename)
                except FileNotFoundError:
                    continue
                flags, other = info_to_flags(info or "")
                entries[msg_id] = _Entry(filename, subdir, st.st_size, st.st_mtime, other, flags)
        return entries

    def _refresh(self, force: bool = False) -> None:
        stamp, too_recent = self._dir_stamp()
        if not force and not too_recent and stamp == self._stamp:
            return
        entries = self._list_dirs()
        gone = [i for i in self._uids.by_id if i not in entries]
        if gone:
            # A file renamed between the two listings (new/ -> cur/) by another
            # process must not lose its UID: look again before forgetting it.
            second = self._list_dirs()
            for msg_id in gone:
                if msg_id in second:
                    entries[msg_id] = second[msg_id]
            gone = [i for i in gone if i not in entries]
            if gone:
                self._uids.forget(gone)
        unassigned = sorted(
            (i for i in entries if i not in self._uids.by_id),
            key=lambda i: (entries[i].mtime, i),
        )
        if unassigned:
            self._uids.assign(unassigned)
        self._entries = entries
        self._stamp = stamp
        self._sorted = None

    def _info(self, msg_id: str, e: _Entry) -> MessageInfo:
        return MessageInfo(
            id=msg_id,
            uid=self._uids.by_id[msg_id],
            flags=e.flags,
            size=e.size,
            internaldate=e.mtime,
            path=self.path / e.subdir / e.filename,
            recent=e.subdir == "new",
            folder=self.name,
        )

    def _listing(self) -> list[MessageInfo]:
        self._refresh()
        if self._sorted is None:
            infos = [self._info(i, e) for i, e in self._entries.items()]
            infos.sort(key=lambda m: m.uid)
            self._sorted = infos
            self._by_uid = {m.uid: m.id for m in infos}
        return self._sorted

    def _entry(self, msg_id: str, refresh: bool = True) -> _Entry:
        """Look a message up; without `refresh`, trust the cache when it has the id."""
        validate_message_id(msg_id)
        if refresh or msg_id not in self._entries:
            self._refresh(force=not refresh)
        e = self._entries.get(msg_id)
        if e is None:
            raise MessageNotFound(msg_id)
        return e

    def _changed(self) -> None:
        self._sorted = None

    # -- queries --------------------------------------------------------------------

    def uidnext(self) -> int:
        with self._lock:
            self._refresh()
            return self._uids.next_uid

    def messages(self) -> list[MessageInfo]:
        with self._lock:
            return list(self._listing())

    def get(self, msg_id: str) -> MessageInfo:
        with self._lock:
            return self._info(msg_id, self._entry(msg_id))

    def get_by_uid(self, uid: int) -> MessageInfo:
        with self._lock:
            self._listing()
            msg_id = self._by_uid.get(uid)
            if msg_id is None:
                raise MessageNotFound(f"UID {uid}")
            return self._info(msg_id, self._entries[msg_id])

    def read(self, msg_id: str) -> bytes:
        """The message's content. It never changes, so the listing in hand is trusted first
        (rescanning the directory, O(messages), cost more than the read on a large folder);
        a file renamed meanwhile by a flag change in another process is found by a rescan."""
        for attempt in range(2):
            with self._lock:
                e = self._entry(msg_id, refresh=attempt > 0)
                path = self.path / e.subdir / e.filename
            try:
                return path.read_bytes()
            except FileNotFoundError:
                with self._lock:
                    self._refresh(force=True)
        raise MessageNotFound(msg_id)

    # -- changes --------------------------------------------------------------------

    def set_flags(self, msg_id: str, flags: Iterable[str]) -> MessageInfo:
        flagset = normalize_flags(flags)
        with self._lock:
            for attempt in (1, 2):
                e = self._entry(msg_id, refresh=attempt == 2)
                filename = f"{msg_id}:{flags_to_info(flagset, e.other_letters)}"
                if filename == e.filename and e.subdir == "cur":
                    return self._info(msg_id, e)
                try:
                    os.rename(self.path / e.subdir / e.filename, self.path / "cur" / filename)
                except FileNotFoundError:
                    if attempt == 2:
                        raise MessageNotFound(msg_id) from None
                    continue
                e = _Entry(filename, "cur", e.size, e.mtime, e.other_letters, flagset)
                self._entries[msg_id] = e
                self._changed()
                return self._info(msg_id, e)
        raise MessageNotFound(msg_id)  # pragma: no cover

    def add(
        self, data: bytes, flags: Iterable[str] = (), internaldate: float | None = None
    ) -> MessageInfo:
        return self._add(self._names.new(), data, flags, internaldate)

    def add_file(
        self, src: Path, flags: Iterable[str] = (), internaldate: float | None = None
    ) -> MessageInfo:
        """Deliver the finished file `src`, written by the caller in a tmp/ of this Maildir
        (see `Maildir.spool_path`), as a new message; `src` is gone afterwards either way."""
        msg_id = self._names.new()
        dest = deliver_file(self.path, msg_id, src, flags, internaldate)
        return self._added(msg_id, dest)

    def _add(
        self, msg_id: str, data: bytes, flags: Iterable[str], internaldate: float | None
    ) -> MessageInfo:
        dest = write_message(self.path, msg_id, data, flags, internaldate)
        return self._added(msg_id, dest)

    def _added(self, msg_id: str, dest: Path) -> MessageInfo:
        info = self._register(msg_id, dest)
        if self._on_change is not None:
            self._on_change("add", msg_id, self.name)
        return info

    def _register(self, msg_id: str, path: Path) -> MessageInfo:
        """Record a file this process just put into new/ or cur/ and give it a UID."""
        with self._lock:
            e = self._entries.get(msg_id)
            if e is None:
                st = os.stat(path)
                flags, other = info_to_flags(split_filename(path.name)[1] or "")
                e = _Entry(path.name, path.parent.name, st.st_size, st.st_mtime, other, flags)
                self._entries[msg_id] = e
                self._uids.assign([msg_id])
                self._changed()
            return self._info(msg_id, e)

    def _unlink_or_rename(self, msg_id: str, target_dir: Path | None) -> Path | None:
        """Remove a message from this folder (rename into target_dir, or unlink)."""
        for attempt in (1, 2):
            e = self._entry(msg_id, refresh=attempt == 2)
            src = self.path / e.subdir / e.filename
            try:
                if target_dir is None:
                    os.unlink(src)
                    target = None
                else:
                    target = target_dir / e.subdir / e.filename
                    if target.exists():
                        raise FileExistsError(errno.EEXIST, "message exists", str(target))
                    os.rename(src, target)
            except FileNotFoundError:
                if attempt == 2:
                    raise MessageNotFound(msg_id) from None
                continue
            del self._entries[msg_id]
            self._uids.forget([msg_id])
            self._changed()
            return target
        raise MessageNotFound(msg_id)  # pragma: no cover

    def move(self, msg_id: str, dest: Folder) -> MessageInfo:
        if dest.path == self.path:
            return self.get(msg_id)
        with self._lock:
            target = self._unlink_or_rename(msg_id, dest.path)
        assert target is not None
        fsync_dir(target.parent)
        info = dest._register(msg_id, target)
        if self._on_change is not None:
            self._on_change("move", msg_id, dest.name)
        return info

    def remove(self, msg_id: str) -> None:
        with self._lock:
            self._unlink_or_rename(msg_id, None)
        if self._on_change is not None:
            self._on_change("remove", msg_id, None)

    def expunge(self) -> list[int]:
        removed: list[tuple[int, str]] = []
        with self._lock:
            for info in list(self._listing()):
                if "\\Deleted" in info.flags:
                    try:
                        os.unlink(info.path)
                    except FileNotFoundError:
                        pass
                    removed.append((info.uid, info.id))
            for _uid, msg_id in removed:
                self._entries.pop(msg_id, None)
            self._uids.forget([msg_id for _uid, msg_id in removed])
            self._changed()
        if self._on_change is not None:
            for _uid, msg_id in removed:
                self._on_change("remove", msg_id, None)
        return sorted(uid for uid, _id in removed)
