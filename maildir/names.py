"""Names in a Maildir++ tree: validation, unique file names, and flag letters.

Everything that turns a client-supplied string into part of a path goes through this
module. It must never accept a name that could leave the Maildir root (no "/", NUL,
"..", or leading dot), and it never touches the filesystem itself.
"""

from __future__ import annotations

import functools
import itertools
import os
import re
import socket
import threading
import time
from collections.abc import Iterable

__all__ = [
    "MaildirError",
    "InvalidName",
    "FolderNotFound",
    "MessageNotFound",
    "FolderExists",
    "validate_message_id",
    "validate_folder_name",
    "validate_dedup_key",
    "flags_to_info",
    "info_to_flags",
    "split_filename",
    "dedup_key_of",
    "UniqueNames",
    "SYSTEM_FLAGS",
]


class MaildirError(Exception):
    """Base class of every error raised by the maildir package."""


class InvalidName(MaildirError, ValueError):
    """A message id, folder name or dedup key does not match its strict pattern."""


class FolderNotFound(MaildirError):
    """The named folder does not exist."""


class MessageNotFound(MaildirError):
    """The message is not (or no longer) in the folder."""


class FolderExists(MaildirError):
    """A folder with that name already exists."""


_MESSAGE_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._,=+-]{0,200}")
_SEGMENT_RE = re.compile(r"[A-Za-z0-9 _&+@-]{1,64}")
_DEDUP_KEY_RE = re.compile(r"[A-Za-z0-9_-]{1,80}")
_DEDUP_IN_NAME_RE = re.compile(r"\d+\.M\d+P\d+X([A-Za-z0-9_-]{1,80})\.")
_MAX_FOLDER_NAME = 255

# IMAP system flag -> Maildir info letter.
_FLAG_LETTERS = {
    "\\Draft": "D",
    "\\Flagged": "F",
    "\\Answered": "R",
    "\\Seen": "S",
    "\\Deleted": "T",
}
_LETTER_FLAGS = {v: k for k, v in _FLAG_LETTERS.items()}
_FLAG_BY_LOWER = {k.lower(): k for k in _FLAG_LETTERS}
SYSTEM_FLAGS: frozenset[str] = frozenset(_FLAG_LETTERS)


def validate_message_id(s: str) -> str:
    """Return `s` if it is a safe message id (a Maildir base name), else raise InvalidName."""
    if not isinstance(s, str) or not _MESSAGE_ID_RE.fullmatch(s) or ".." in s:
        raise InvalidName(f"invalid message id: {s!r}")
    return s


def address_folder(address: str) -> str:
    """The folder of one address in address-mailbox mode: `Alerts@Example.com` ->
    `alerts@example_com` (dots would nest folders in Maildir++). Raises InvalidName."""
    local, at, domain = address.strip().lower().rpartition("@")
    if not at or not local or not domain:
        raise InvalidName(f"not an address: {address!r}")
    return validate_folder_name(f"{local}@{domain}".replace(".", "_"))


def validate_folder_name(s: str) -> str:
    """Return the canonical folder name ("INBOX" or a Maildir++ name) or raise InvalidName."""
    if not isinstance(s, str):
        raise InvalidName(f"invalid folder name: {s!r}")
    if s.upper() == "INBOX":
        return "INBOX"
    if not s or len(s) > _MAX_FOLDER_NAME:
        raise InvalidName(f"invalid folder name: {s!r}")
    for segment in s.split("."):
        if not _SEGMENT_RE.fullmatch(segment) or segment.strip() != segment:
            raise InvalidName(f"invalid folder name: {s!r}")
    if s.split(".", 1)[0].upper() == "INBOX":
        # "INBOX.x" would be ambiguous with the INBOX's own directory.
        raise InvalidName(f"invalid folder name: {s!r}")
    return s


def validate_dedup_key(s: str) -> str:
    """Return `s` if it is a valid delivery deduplication key, else raise InvalidName."""
    if not isinstance(s, str) or not _DEDUP_KEY_RE.fullmatch(s):
        raise InvalidName(f"invalid dedup key: {s!r}")
    return s


def normalize_flags(flags: Iterable[str]) -> frozenset[str]:
    """Map IMAP system flags (any case) to their canonical spelling; drop everything else."""
    out = set()
    for flag in flags:
        canon = _FLAG_BY_LOWER.get(str(flag).lower())
        if canon is not None:
            out.add(canon)
    return frozenset(out)


@functools.lru_cache(maxsize=1024)
def info_to_flags(info: str) -> tuple[frozenset[str], str]:
    """Split a Maildir info ("2,FS") into IMAP system flags and the unknown letters kept.
    Kept per info: the messages of a folder share a few flag sets (a frozenset is some 200
    octets, 20 MiB over 100,000 messages made one each)."""
    if not info.startswith("2,"):
        return frozenset(), ""
    flags = set()
    other = []
    for letter in info[2:]:
        flag = _LETTER_FLAGS.get(letter)
        if flag is not None:
            flags.add(flag)
        elif letter.isalpha():
            other.append(letter)
    return frozenset(flags), "".join(other)


def flags_to_info(flags: Iterable[str], other_letters: str = "") -> str:
    """Build the "2,LETTERS" info for a flag set, letters sorted, unknown letters preserved."""
    letters = {_FLAG_LETTERS[f] for f in normalize_flags(flags)}
    letters.update(other_letters)
    return "2," + "".join(sorted(letters))


def split_filename(filename: str) -> tuple[str, str | None]:
    """Split a file name from new/ or cur/ into (id, info or None)."""
    base, sep, info = filename.partition(":")
    return base, (info if sep else None)


def dedup_key_of(msg_id: str) -> str | None:
    """Return the dedup key carried by a message id, if it has one."""
    m = _DEDUP_IN_NAME_RE.match(msg_id)
    return m.group(1) if m else None


def _safe_host(hostname: str) -> str:
    host = re.sub(r"[^A-Za-z0-9.-]", "_", hostname).strip(".")
    host = re.sub(r"\.{2,}", ".", host)
    return host[:64] or "localhost"


class UniqueNames:
    """Generates Maildir unique names `<secs>.M<usecs>P<pid>Q<n>.<host>` (thread-safe)."""

    def __init__(self, hostname: str | None = None) -> None:
        self.host = _safe_host(hostname or socket.gethostname())
        self._counter = itertools.count(1)
        self._lock = threading.Lock()

    def new(self, dedup_key: str | None = None) -> str:
        now = time.time()
        secs = int(now)
        usecs = int((now - secs) * 1_000_000)
        pid = os.getpid()
        if dedup_key is not None:
            name = f"{secs}.M{usecs}P{pid}X{validate_dedup_key(dedup_key)}.{self.host}"
        else:
            with self._lock:
                n = next(self._counter)
            name = f"{secs}.M{usecs}P{pid}Q{n}.{self.host}"
        return validate_message_id(name)
