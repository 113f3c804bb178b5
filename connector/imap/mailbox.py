"""IMAP mailbox sessions (IMailbox) and the account (IAccount) over the Maildir.

Each SELECT/EXAMINE gets its own MaildirMailbox holding that session's view of the
folder: the UID list that sequence numbers index into. The view changes only when the
server reports it (EXISTS, EXPUNGE), never in the middle of FETCH/STORE/SEARCH.
A read-only (EXAMINE) mailbox must never change a flag or remove a message.
"""

from __future__ import annotations

import calendar
from collections.abc import Iterable
from typing import IO, Any

from twisted.internet import defer, threads
from twisted.mail import imap4
from twisted.mail.imap4 import (
    IAccount,
    ICloseableMailbox,
    IMailbox,
    IMailboxInfo,
    IMessageCopier,
    MailboxCollision,
    MailboxException,
    MessageSet,
    NoSuchMailbox,
    ReadOnlyMailbox,
)
from zope.interface import implementer

from maildir import (
    Folder,
    FolderExists,
    FolderNotFound,
    InvalidName,
    Maildir,
    MaildirError,
    MessageInfo,
    MessageNotFound,
)
from maildir.lineends import LineEndCache

from .message import MaildirMessage
from .parse import Spans

DELIMITER = "."
SYSTEM_FLAGS = ["\\Answered", "\\Flagged", "\\Deleted", "\\Seen", "\\Draft"]
SPECIAL_USE = {"Sent": "\\Sent", "Drafts": "\\Drafts", "Junk": "\\Junk", "Trash": "\\Trash"}
_MONTHS = ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"]


def parse_internaldate(value: bytes | str | None) -> float | None:
    """Parse an IMAP date-time ("17-Jul-1996 02:44:25 -0700") into epoch seconds."""
    if value is None:
        return None
    text = value.decode("ascii", "replace") if isinstance(value, bytes) else value
    try:
        date, clock, zone = text.strip().split()
        day, mon, year = date.split("-")
        hh, mm, ss = (int(x) for x in clock.split(":"))
        month = _MONTHS.index(mon.lower()) + 1
        sign = -1 if zone[0] == "-" else 1
        offset = sign * (int(zone[1:3]) * 3600 + int(zone[3:5]) * 60)
        tt = (int(year), month, int(day), hh, mm, ss, 0, 1, 0)

        return float(calendar.timegm(tt) - offset)
    except (ValueError, IndexError):
        raise imap4.IllegalClientResponse("Bad date-time") from None


def _read_all(message: Any) -> bytes:
    if isinstance(message, bytes):
        return message
    f: IO[bytes] = message
    f.seek(0)
    return f.read()


@implementer(IMailboxInfo)
class MailboxInfo:
    """LIST attributes of one folder."""

    def __init__(self, name: str, has_children: bool) -> None:
        self.name = name
        self.has_children = has_children

    def getFlags(self) -> list[str]:
        flags = ["\\HasChildren" if self.has_children else "\\HasNoChildren"]
        if self.name in SPECIAL_USE:
            flags.append(SPECIAL_USE[self.name])
        return flags

    def getHierarchicalDelimiter(self) -> str:
        return DELIMITER


@implementer(IMailbox, ICloseableMailbox, IMessageCopier)
class MaildirMailbox:
    """One session's view of a folder."""

    def __init__(
        self, folder: Folder, writeable: bool, line_ends: LineEndCache | None = None
    ) -> None:
        self.folder = folder
        self.writeable = writeable
        self.line_ends = line_ends
        self.listeners: list[Any] = []
        current = folder.messages()
        self.uids: list[int] = [m.uid for m in current]
        self._flags: dict[int, frozenset[str]] = {m.uid: m.flags for m in current}
        self.initial_recent = sum(1 for m in current if m.recent)

    # -- view -------------------------------------------------------------------------

    def current(self) -> dict[int, MessageInfo]:
        return {m.uid: m for m in self.folder.messages()}

    def refresh(self) -> tuple[list[int], int | None, dict[int, list[str]]]:
        """Bring the view up to date with the folder.

        Returns (expunged sequence numbers in descending order, the new EXISTS count if
        messages were added, {sequence number: flags} changed elsewhere). The caller
        sends them in that order, and only where RFC 3501 allows EXPUNGE responses.
        """
        now = self.current()
        expunged = [i + 1 for i, uid in enumerate(self.uids) if uid not in now]
        expunged.reverse()
        kept = [uid for uid in self.uids if uid in now]
        last = self.uids[-1] if self.uids else 0
        added = sorted(uid for uid in now if uid > last)
        changed = {}
        for seq, uid in enumerate(kept, 1):
            if now[uid].flags != self._flags.get(uid):
                changed[seq] = MaildirMessage(now[uid]).getFlags()
        self.uids = kept + added
        self._flags = {uid: now[uid].flags for uid in self.uids}
        return expunged, (len(self.uids) if added or expunged else None), changed

    def resolve(self, messages: MessageSet, uid: bool) -> list[tuple[int, int]]:
        """(sequence number, UID) pairs of the view matching a sequence or UID set."""
        if not self.uids:
            return []
        uids = self.uids
        if uid:
            wanted = Spans(messages, uids[-1])
            return [(i + 1, uids[i]) for i in wanted.select(uids)]
        wanted = Spans(messages, len(uids))
        out: list[tuple[int, int]] = []
        for lo, hi in wanted.ranges:
            out.extend((i, uids[i - 1]) for i in range(max(lo, 1), min(hi, len(uids)) + 1))
        return out

    # -- IMailboxInfo / IMailbox ----------------------------------------------------

    def getFlags(self) -> list[str]:
        return list(SYSTEM_FLAGS)

    def getHierarchicalDelimiter(self) -> str:
        return DELIMITER

    def getUIDValidity(self) -> int:
        return self.folder.uidvalidity

    def getUIDNext(self) -> int:
        return self.folder.uidnext()

    def getUID(self, message: int) -> int:
        return self.uids[message - 1]

    def getMessageCount(self) -> int:
        return len(self.uids)

    def getRecentCount(self) -> int:
        return self.initial_recent

    def getUnseenCount(self) -> int:
        return sum(1 for m in self.folder.messages() if "\\Seen" not in m.flags)

    def first_unseen(self) -> int | None:
        for seq, uid in enumerate(self.uids, 1):
            if "\\Seen" not in self._flags.get(uid, frozenset()):
                return seq
        return None

    def isWriteable(self) -> bool:
        return self.writeable

    def destroy(self) -> None:
        raise MailboxException("Use DELETE")

    def requestStatus(self, names: Iterable[str]) -> dict[str, int]:
        msgs = self.folder.messages()
        values = {
            "MESSAGES": len(msgs),
            "RECENT": sum(1 for m in msgs if m.recent),
            "UIDNEXT": self.folder.uidnext(),
            "UIDVALIDITY": self.folder.uidvalidity,
            "UNSEEN": sum(1 for m in msgs if "\\Seen" not in m.flags),
        }
        out = {}
        for name in names:
            key = name.upper()
            if key not in values:
                raise imap4.IllegalClientResponse(f"Unknown STATUS item {name}")
            out[key] = values[key]
        return out

    def addListener(self, listener: Any) -> None:
        self.listeners.append(listener)

    def removeListener(self, listener: Any) -> None:
        if listener in self.listeners:
            self.listeners.remove(listener)

    def addMessage(
        self, message: Any, flags: Iterable[str] = (), date: Any = None
    ) -> defer.Deferred[MessageInfo]:
        flags = [f.decode() if isinstance(f, bytes) else str(f) for f in flags]
        internaldate = parse_internaldate(date) if date else None
        data = _read_all(message)
        return threads.deferToThread(self.folder.add, data, flags, internaldate)

    def expunge(self) -> list[int]:
        if not self.writeable:
            raise ReadOnlyMailbox()
        gone = set(self.folder.expunge())
        seqs = [i + 1 for i, uid in enumerate(self.uids) if uid in gone]
        self.uids = [uid for uid in self.uids if uid not in gone]
        for uid in gone:
            self._flags.pop(uid, None)
        seqs.reverse()
        return seqs

    def fetch(self, messages: MessageSet, uid: bool) -> list[tuple[int, MaildirMessage]]:
        now = self.current()
        ends = self.line_ends
        return [
            (seq, MaildirMessage(now[u], ends))
            for seq, u in self.resolve(messages, uid)
            if u in now
        ]

    def store(
        self, messages: MessageSet, flags: Iterable[str], mode: int, uid: bool
    ) -> dict[int, list[str]]:
        if not self.writeable:
            raise ReadOnlyMailbox()
        given = {f for f in flags if f.lower() != "\\recent"}
        now = self.current()
        result = {}
        for seq, u in self.resolve(messages, uid):
            info = now.get(u)
            if info is None:
                continue
            if mode > 0:
                new = info.flags | given
            elif mode < 0:
                new = info.flags - {
                    f for f in info.flags if f.lower() in {g.lower() for g in given}
                }
            else:
                new = frozenset(given)
            try:
                info = self.folder.set_flags(info.id, new)
            except MessageNotFound:
                continue
            self._flags[u] = info.flags
            result[seq] = MaildirMessage(info).getFlags()
        return result

    def mark_seen(self, messages: MessageSet, uid: bool) -> int:
        """Add \\Seen to the given messages (FETCH BODY[] on a read-write mailbox)."""
        if not self.writeable:
            return 0
        now = self.current()
        n = 0
        for _seq, u in self.resolve(messages, uid):
            info = now.get(u)
            if info is not None and "\\Seen" not in info.flags:
                try:
                    info = self.folder.set_flags(info.id, info.flags | {"\\Seen"})
                except MessageNotFound:
                    continue
                self._flags[u] = info.flags
                n += 1
        return n

    def copy(self, messageObject: MaildirMessage) -> defer.Deferred[MessageInfo]:
        info = messageObject.info

        def work() -> MessageInfo:
            with open(info.path, "rb") as f:
                data = f.read()
            return self.folder.add(data, info.flags, info.internaldate)

        return threads.deferToThread(work)

    def close(self) -> None:
        self.listeners = []


@implementer(IAccount, imap4.INamespacePresenter)
class MaildirAccount:
    """The single account of the device: every folder of its Maildir."""

    def __init__(
        self, maildir: Maildir, line_ends: LineEndCache | None = None, user: str = ""
    ) -> None:
        self.maildir = maildir
        self.line_ends = line_ends
        self.user = user
        """The login name this account was opened with (sessions are counted by it)."""

    def _folder(self, name: str) -> Folder | None:
        try:
            return self.maildir.folder(name)
        except (InvalidName, FolderNotFound):
            return None

    def select(self, name: str, rw: bool = True) -> MaildirMailbox | None:
        folder = self._folder(name)
        return None if folder is None else MaildirMailbox(folder, bool(rw), self.line_ends)

    def addMailbox(self, name: str, mbox: Any = None) -> bool:
        raise MailboxException("Not supported")

    def create(self, pathspec: str) -> bool:
        name = pathspec.rstrip(DELIMITER)
        try:
            self.maildir.create_folder(name)
        except FolderExists:
            raise MailboxCollision(name) from None
        except InvalidName:
            raise MailboxException("Invalid mailbox name") from None
        return True

    def delete(self, name: str) -> bool:
        try:
            self.maildir.delete_folder(name)
        except (InvalidName, FolderNotFound):
            raise NoSuchMailbox(name) from None
        except MaildirError as e:
            raise MailboxException(str(e)) from None
        return True

    def rename(self, oldname: str, newname: str) -> bool:
        try:
            self.maildir.rename_folder(oldname, newname)
        except FolderNotFound:
            raise NoSuchMailbox(oldname) from None
        except FolderExists:
            raise MailboxCollision(newname) from None
        except InvalidName:
            raise MailboxException("Invalid mailbox name") from None
        except MaildirError as e:
            raise MailboxException(str(e)) from None
        return True

    def isSubscribed(self, name: str) -> bool:
        return self._folder(name) is not None

    def subscribe(self, name: str) -> bool:
        if self._folder(name) is None:
            raise NoSuchMailbox(name)
        return True

    def unsubscribe(self, name: str) -> bool:
        return True

    def listMailboxes(self, ref: str, wildcard: str) -> list[tuple[str, MailboxInfo]]:
        pattern = imap4.wildcardToRegexp(ref + wildcard, DELIMITER)
        names = self.maildir.list_folders()
        out = []
        for name in names:
            if pattern.match(name) or (name == "INBOX" and pattern.match("inbox")):
                children = any(n.startswith(name + DELIMITER) for n in names)
                out.append((name, MailboxInfo(name, children)))
        return out

    def getPersonalNamespaces(self) -> list[list[str]]:
        return [["", DELIMITER]]

    def getSharedNamespaces(self) -> None:
        return None

    def getOtherNamespaces(self) -> None:
        return None

    def getUserNamespaces(self) -> None:
        return None
