"""IMAP views of stored messages: what a FETCH reads of a message file, in served form.

A MaildirMessage reads only what a request needs: nothing for FLAGS/UID/INTERNALDATE,
the header section for ENVELOPE and header fetches, the whole file for BODYSTRUCTURE,
MIME part sections and (unless the file is already in CRLF form) BODY[] and BODY[TEXT],
which are otherwise streamed from the file. Everything it returns is in the form served
to clients: a file with bare LFs is served with CRLFs, and every offset, size and line
count here is of that form (`maildir.lineends`). The part structure comes from the
bounded parser in `maildir.mimetree`. Reading a message may block (file I/O, parsing):
the server does it in a worker thread. It must never write to the message file or trust
a client-supplied part number without bounds checks.
"""

from __future__ import annotations

import email.utils
from email.message import Message
from typing import IO

from maildir import MessageInfo
from maildir.lineends import LineEndCache, LineEnds, scan, to_crlf
from maildir.mimetree import DEFAULT_LIMITS, MIMELimits, Part, header_end, parse, parse_headers

_CHUNK = 65536
HEADER_LIMIT = 1024 * 1024


def filter_headers(raw: bytes, fields: list[bytes], negate: bool) -> bytes:
    """Subset of a raw header section (HEADER.FIELDS / .NOT), keeping original bytes."""
    wanted = {f.lower() for f in fields}
    out: list[bytes] = []
    keep = False
    for line in raw.splitlines(keepends=True):
        if line in (b"\r\n", b"\n"):
            break
        if line[:1] in (b" ", b"\t"):
            if keep:
                out.append(line)
            continue
        name = line.split(b":", 1)[0].strip().lower()
        keep = (name in wanted) != negate
        if keep:
            out.append(line)
    out.append(b"\r\n")
    return b"".join(out)


class MaildirMessage:
    """One message of a selected mailbox, as the IMAP server serves it."""

    def __init__(
        self,
        info: MessageInfo,
        line_ends: LineEndCache | None = None,
        limits: MIMELimits = DEFAULT_LIMITS,
    ) -> None:
        self.info = info
        self._cache = line_ends
        self._limits = limits
        self._header: bytes | None = None
        self._head_msg: Message | None = None
        self._raw: bytes | None = None
        self._ends: LineEnds | None = None
        self._tree: Part | None = None

    # -- raw access ------------------------------------------------------------------

    def open(self) -> IO[bytes]:
        return open(self.info.path, "rb")

    def line_ends(self) -> LineEnds:
        """Whether the file is in CRLF form, and the size of its served form (reads the
        file the first time any session asks)."""
        if self._ends is None:
            cache, info = self._cache, self.info
            ends = cache.get(info.id, info.size) if cache is not None else None
            if ends is None:
                with self.open() as f:
                    ends = scan(f)
                self._remember(ends)
            self._ends = ends
        return self._ends

    def known_size(self) -> int | None:
        """The served size if it is known without reading the file."""
        if self._ends is not None:
            return self._ends.size
        if self._cache is None:
            return None
        ends = self._cache.get(self.info.id, self.info.size)
        return None if ends is None else ends.size

    def _remember(self, ends: LineEnds) -> None:
        self._ends = ends
        if self._cache is not None:
            self._cache.put(self.info.id, self.info.size, ends)

    def size(self) -> int:
        """RFC822.SIZE: the size of the served form."""
        return self.line_ends().size

    def raw(self) -> bytes:
        """The whole message in served (CRLF) form."""
        if self._raw is None:
            with self.open() as f:
                data = f.read()
            if self._ends is None:
                self._remember(LineEnds.of(data))
            self._raw = to_crlf(data)
        return self._raw

    def header_section(self) -> bytes:
        """The served header section including the blank line (the whole message when
        it has none; cut after about `HEADER_LIMIT` bytes)."""
        if self._header is None:
            if self._raw is not None:
                data = self._raw
                end = header_end(data, 0, len(data), HEADER_LIMIT)
            else:
                data = b""
                with self.open() as f:
                    while True:
                        chunk = f.read(_CHUNK)
                        data += chunk
                        end = header_end(data, 0, len(data), HEADER_LIMIT)
                        if not chunk or end < len(data) or len(data) >= HEADER_LIMIT:
                            break
            self._header = to_crlf(data[:end])
        return self._header

    @property
    def body_offset(self) -> int:
        """Where the body begins in the served form."""
        return len(self.header_section())

    def header_message(self) -> Message:
        """The header fields, values as the message holds them (`mimetree.RawHeaders`)."""
        if self._head_msg is None:
            self._head_msg = parse_headers(self.header_section())
        return self._head_msg

    def tree(self) -> Part:
        """The bounded MIME structure of the served form (reads the whole file; cached)."""
        if self._tree is None:
            self._tree = parse(self.raw(), self._limits)
        return self._tree

    def resolve(self, path: tuple[int, ...]) -> Part:
        """Follow an IMAP part path (zero-based indexes) into the tree (RFC 3501 6.4.5):
        the parts of a multipart are numbered from 1; a part that is not multipart has
        only part 1, itself; within an attached message the numbers are those of the
        message's own body. IndexError when there is no such part."""
        node = self.tree()
        for i, p in enumerate(path):
            if i > 0 and node.is_message:
                node = node.children[0]
            if node.is_multipart:
                if not 0 <= p < len(node.children):
                    raise IndexError("no such body part")
                node = node.children[p]
            elif p != 0:
                raise IndexError("no such body part")
        return node

    # -- listing data -----------------------------------------------------------------

    def getUID(self) -> int:
        return self.info.uid

    def getFlags(self) -> list[str]:
        flags = sorted(self.info.flags)
        if self.info.recent:
            flags.append("\\Recent")
        return flags

    def getInternalDate(self) -> str:
        return email.utils.formatdate(self.info.internaldate)
