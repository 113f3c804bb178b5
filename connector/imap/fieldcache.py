"""The header fields SEARCH reads most, kept per message from one search to the next.

A search on From, To, Cc, Bcc or Subject read and parsed the header section of every
message file, every time: about 40 µs a message, four seconds on a folder of 100,000. A
message file never changes in a Maildir (its flags are in its name, not its content), so
what its header says holds for as long as the message exists: the first search that reads
a message keeps those five fields of it here, lower-cased and ready for a substring test,
and later searches, from any session, look there. Entries of messages no longer in their
folder are dropped when the cache of that folder has grown well past the folder.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

from .message import MaildirMessage

FIELDS = ("from", "to", "cc", "bcc", "subject")
"""The fields kept, in this order in each entry."""

PRUNE_SLACK = 1000
"""How many more entries than messages a folder's cache may hold (or a quarter more, if
that is larger) before the gone ones are dropped."""

Entry = tuple[bytes | None, ...]
"""Per field of `FIELDS`: None when the message has no such field, else its values,
lower-cased, joined by NUL (which no IMAP search string can hold)."""


def _entry(msg: MaildirMessage) -> Entry:
    head = msg.header_message()
    out: list[bytes | None] = []
    for name in FIELDS:
        values = head.get_all(name)
        if values is None:
            out.append(None)
        else:
            out.append(
                b"\0".join(str(v).encode("utf-8", "surrogateescape").lower() for v in values)
            )
    return tuple(out)


class FieldCache:
    """Shared by the sessions of one IMAP server (searches run in worker threads)."""

    def __init__(self) -> None:
        self._folders: dict[str, dict[str, Entry]] = {}
        self._lock = threading.Lock()

    def entry(self, msg: MaildirMessage) -> Entry:
        with self._lock:
            known = self._folders.setdefault(msg.info.folder, {})
            found = known.get(msg.info.id)
        if found is None:
            found = _entry(msg)  # reads the file: outside the lock
            with self._lock:
                known[msg.info.id] = found
        return found

    def prune(self, messages: Sequence[tuple[int, MaildirMessage]]) -> None:
        """Keep only the entries of `messages` (a whole folder, as a search sees it), once
        the folder's cache holds many more than that: the ids are gathered only then."""
        if not messages:
            return
        folder = messages[0][1].info.folder
        with self._lock:
            known = self._folders.get(folder)
            slack = max(PRUNE_SLACK, len(messages) // 4)
            if known is None or len(known) <= len(messages) + slack:
                return
        ids = {msg.info.id for _, msg in messages}
        with self._lock:
            known = self._folders.get(folder, {})
            self._folders[folder] = {k: v for k, v in known.items() if k in ids}

    def size(self, folder: str) -> int:
        with self._lock:
            return len(self._folders.get(folder, {}))
