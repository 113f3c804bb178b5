"""Persistent UID assignments of one folder (the `tailpost-uidlist` file).

Format: a header line `V1 <uidvalidity> <nextuid>`, then one line per event: `<uid> <id>`
assigns a UID, `-<uid>` forgets it. New events are appended; the file is rewritten
(to a temporary name, fsynced, then renamed) only when most of it is stale. This class
does no locking of its own: the owning Folder serializes access. It must never hand out
a UID lower than one it handed out before for the same UIDVALIDITY.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from .durable import fsync_dir
from .names import InvalidName, validate_message_id

FILENAME = "tailpost-uidlist"
_COMPACT_MIN_STALE = 256


class UidList:
    """UIDVALIDITY, next UID and the id <-> UID map of a folder, backed by a file."""

    def __init__(self, folder_path: Path) -> None:
        self.path = folder_path / FILENAME
        self.uidvalidity = 0
        self.next_uid = 1
        self.by_id: dict[str, int] = {}
        self._lines = 0
        self._load()

    def _load(self) -> None:
        try:
            text = self.path.read_text(encoding="ascii", errors="replace")
        except FileNotFoundError:
            self.uidvalidity = int(time.time())
            self.next_uid = 1
            self._rewrite()
            return
        lines = text.splitlines()
        header = lines[0].split() if lines else []
        if len(header) == 3 and header[0] == "V1" and header[1].isdigit() and header[2].isdigit():
            self.uidvalidity = int(header[1])
            self.next_uid = max(1, int(header[2]))
        else:
            # Unreadable header: start a new UID space so clients resynchronise.
            self.uidvalidity = int(time.time())
            self.next_uid = 1
            self.by_id = {}
            self._rewrite()
            return
        by_uid: dict[int, str] = {}
        for line in lines[1:]:
            parts = line.split()
            if len(parts) == 1 and parts[0].startswith("-") and parts[0][1:].isdigit():
                msg_id = by_uid.pop(int(parts[0][1:]), None)
                if msg_id is not None and self.by_id.get(msg_id) == int(parts[0][1:]):
                    del self.by_id[msg_id]
            elif len(parts) == 2 and parts[0].isdigit():
                try:
                    msg_id = validate_message_id(parts[1])
                except InvalidName:
                    continue
                uid = int(parts[0])
                old = self.by_id.get(msg_id)
                if old is not None:
                    by_uid.pop(old, None)
                self.by_id[msg_id] = uid
                by_uid[uid] = msg_id
                self.next_uid = max(self.next_uid, uid + 1)
        self._lines = len(lines) - 1

    def _rewrite(self) -> None:
        tmp = self.path.with_name(f".{FILENAME}.{os.getpid()}.tmp")
        body = [f"V1 {self.uidvalidity} {self.next_uid}\n"]
        body.extend(
            f"{uid} {msg_id}\n" for msg_id, uid in sorted(self.by_id.items(), key=lambda x: x[1])
        )
        with open(tmp, "w", encoding="ascii") as f:
            f.writelines(body)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        fsync_dir(self.path.parent)
        self._lines = len(self.by_id)

    def _append(self, lines: list[str]) -> None:
        if not lines:
            return
        with open(self.path, "a", encoding="ascii") as f:
            f.writelines(lines)
        self._lines += len(lines)
        stale = self._lines - len(self.by_id)
        if stale >= _COMPACT_MIN_STALE and stale > len(self.by_id):
            self._rewrite()

    def assign(self, ids: list[str]) -> None:
        """Give each id without a UID the next UID, in the order given."""
        new = []
        for msg_id in ids:
            if msg_id in self.by_id:
                continue
            uid = self.next_uid
            self.next_uid += 1
            self.by_id[msg_id] = uid
            new.append(f"{uid} {msg_id}\n")
        self._append(new)

    def forget(self, ids: list[str]) -> None:
        """Drop the UIDs of ids that are gone; their UIDs are never reused."""
        gone = []
        for msg_id in ids:
            uid = self.by_id.pop(msg_id, None)
            if uid is not None:
                gone.append(f"-{uid}\n")
        self._append(gone)
