"""Line ends of stored messages: the CRLF form a message is served in, and its size.

Internet mail ends lines with CRLF, and IMAP sizes count what the client receives. Mail
written into the Maildir by other software often ends lines with a bare LF; such a file
is served with every bare LF sent as CRLF (CRLF pairs and lone CRs as they are), and every
size reported for it is a size of that form. Finding the size of that form reads the
whole file, so it is kept in a `LineEndCache`: a Maildir message never changes content
under its name. This module must never change a message file.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import IO

__all__ = ["LineEndCache", "LineEnds", "scan", "to_crlf"]

_CHUNK = 1 << 20
DEFAULT_CACHE_SIZE = 200_000


def to_crlf(data: bytes) -> bytes:
    """`data` with every bare LF made CRLF (the same object when there is none)."""
    lf = data.count(b"\n")
    if not lf or lf == data.count(b"\r\n"):
        return data
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


@dataclass(frozen=True, slots=True)
class LineEnds:
    """What a file's line ends are like."""

    size: int
    """The size of the file's CRLF form."""
    clean: bool
    """The file has no bare LF: it is served as it is, byte for byte."""

    @classmethod
    def of(cls, data: bytes) -> LineEnds:
        bare = data.count(b"\n") - data.count(b"\r\n")
        return cls(len(data) + bare, not bare)


def scan(f: IO[bytes]) -> LineEnds:
    """Read `f` from where it is to its end, a chunk at a time, and count its bare LFs."""
    size = bare = 0
    cr_before = False  # the previous chunk ended with CR
    while chunk := f.read(_CHUNK):
        size += len(chunk)
        bare += chunk.count(b"\n") - chunk.count(b"\r\n")
        if cr_before and chunk[:1] == b"\n":
            bare -= 1  # a CRLF split between two chunks
        cr_before = chunk[-1:] == b"\r"
    return LineEnds(size + bare, not bare)


class LineEndCache:
    """A bounded, thread-safe map from a message (its id and file size) to its LineEnds.

    Messages keep their id when they move between folders and never change content, so
    one cache serves a whole Maildir. Lookups take no lock (a listing FETCH makes one per
    message); past its size the oldest entries go first."""

    def __init__(self, size: int = DEFAULT_CACHE_SIZE) -> None:
        self._size = size
        self._items: dict[tuple[str, int], LineEnds] = {}
        self._lock = threading.Lock()

    def get(self, msg_id: str, file_size: int) -> LineEnds | None:
        return self._items.get((msg_id, file_size))

    def put(self, msg_id: str, file_size: int, ends: LineEnds) -> None:
        with self._lock:
            self._items[(msg_id, file_size)] = ends
            while len(self._items) > self._size:
                del self._items[next(iter(self._items))]
