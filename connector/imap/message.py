"""IMAP views of stored messages: IMessage / IMessagePart over Python's `email` package.

A MaildirMessage reads only what a request needs: nothing for FLAGS/UID/SIZE, the header
section for ENVELOPE and header fetches, the whole file only for BODYSTRUCTURE and MIME
part sections; BODY[] and BODY[TEXT] are streamed from the file. It must never write to
the message file or trust a client-supplied part number without bounds checks.
"""

from __future__ import annotations

import email.utils
import io
import re
from email import policy
from email.generator import BytesGenerator
from email.message import Message
from email.parser import BytesHeaderParser, BytesParser
from typing import IO, Any

from twisted.mail.imap4 import IMessage, IMessageFile, IMessagePart
from zope.interface import implementer

from maildir import MessageInfo

_CHUNK = 65536
HEADER_LIMIT = 1024 * 1024
_LONE_LF = re.compile(rb"(?<!\r)\n")


def _to_bytes(s: str) -> bytes:
    return s.encode("ascii", "surrogateescape")


def subparts(m: Message) -> list[Message]:
    """The child parts of a multipart or message/rfc822 part (empty for leaf parts)."""
    payload = m.get_payload()
    if not isinstance(payload, list):
        return []
    return [p for p in payload if isinstance(p, Message)]


def find_header_end(head: bytes) -> int | None:
    """Return the offset where the body starts (after the blank line), if present."""
    if head.startswith(b"\r\n"):
        return 2
    if head.startswith(b"\n"):
        return 1
    best = None
    for sep in (b"\r\n\r\n", b"\n\n", b"\n\r\n"):
        i = head.find(sep)
        if i >= 0 and (best is None or i + len(sep) < best):
            best = i + len(sep)
    return best


def _linesep(raw: bytes) -> str:
    return "\r\n" if b"\r\n" in raw[:4096] else "\n"


def headers_bytes(m: Message, linesep: str) -> bytes:
    """Serialize a part's header fields as they were parsed, ending with the blank line."""
    out = [f"{k}: {v}{linesep}" for k, v in m.items()]
    return _to_bytes("".join(out) + linesep)


def body_bytes(m: Message, linesep: str) -> bytes:
    """The encoded body of a MIME part (what BODY[n] returns)."""
    if not m.is_multipart():
        payload = m.get_payload()
        data = _to_bytes(payload if isinstance(payload, str) else "")
        if linesep == "\r\n":
            data = _LONE_LF.sub(b"\r\n", data)
        return data
    buf = io.BytesIO()
    gen = BytesGenerator(buf, mangle_from_=False, policy=policy.compat32.clone(linesep=linesep))
    gen.flatten(m, linesep=linesep)
    whole = buf.getvalue()
    end = find_header_end(whole)
    return whole[end:] if end is not None else b""


def filter_headers(raw: bytes, fields: list[bytes], negate: bool) -> bytes:
    """Subset of a raw header section (HEADER.FIELDS / .NOT), keeping original bytes."""
    wanted = {f.lower() for f in fields}
    lines = raw.splitlines(keepends=True)
    out: list[bytes] = []
    keep = False
    eol = b"\r\n" if raw.endswith(b"\r\n") or b"\r\n" in raw else b"\n"
    for line in lines:
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
    out.append(eol)
    return b"".join(out)


@implementer(IMessagePart)
class MimePart:
    """A MIME part inside a parsed message tree."""

    def __init__(self, m: Message, linesep: str) -> None:
        self.m = m
        self.linesep = linesep

    def getHeaders(self, negate: bool, *names: Any) -> dict[str, str]:
        wanted = {(n.decode() if isinstance(n, bytes) else n).lower() for n in names}
        out: dict[str, str] = {}
        for k, v in self.m.items():
            if not names or ((k.lower() in wanted) != negate):
                out.setdefault(k.lower(), v)
        return out

    def getBodyFile(self) -> IO[bytes]:
        return io.BytesIO(body_bytes(self.m, self.linesep))

    def getSize(self) -> int:
        return len(body_bytes(self.m, self.linesep))

    def isMultipart(self) -> bool:
        return self.m.is_multipart()

    def getSubPart(self, part: int) -> MimePart:
        parts = subparts(self.m)
        if not 0 <= part < len(parts):
            raise IndexError(part)
        return MimePart(parts[part], self.linesep)


@implementer(IMessage, IMessageFile)
class MaildirMessage:
    """One message of a selected mailbox, as seen by the IMAP server."""

    def __init__(self, info: MessageInfo) -> None:
        self.info = info
        self._header: bytes | None = None
        self._body_offset = 0
        self._head_msg: Message | None = None
        self._tree: Message | None = None

    # -- raw access ------------------------------------------------------------------

    def open(self) -> IO[bytes]:
        return open(self.info.path, "rb")

    def header_section(self) -> bytes:
        """The raw header section including the blank line (read from the file once)."""
        if self._header is None:
            data = b""
            with self.open() as f:
                while len(data) < HEADER_LIMIT:
                    chunk = f.read(_CHUNK)
                    if not chunk:
                        break
                    data += chunk
                    end = find_header_end(data)
                    if end is not None:
                        self._header, self._body_offset = data[:end], end
                        return self._header
            end = find_header_end(data)
            if end is None:
                end = len(data)
            self._header, self._body_offset = data[:end], end
        return self._header

    @property
    def body_offset(self) -> int:
        self.header_section()
        return self._body_offset

    @property
    def linesep(self) -> str:
        return _linesep(self.header_section())

    def header_message(self) -> Message:
        if self._head_msg is None:
            self._head_msg = BytesHeaderParser(policy=policy.compat32).parsebytes(
                self.header_section()
            )
        return self._head_msg

    def tree(self) -> Message:
        """The fully parsed message (loads the whole file; cached)."""
        if self._tree is None:
            with self.open() as f:
                self._tree = BytesParser(policy=policy.compat32).parse(f)
        return self._tree

    def resolve(self, path: tuple[int, ...]) -> Message:
        """Follow an IMAP part path (zero-based indexes) into the parsed tree."""
        node = self.tree()
        for i, p in enumerate(path):
            if node.get_content_type() == "message/rfc822" and i > 0:
                inner = subparts(node)
                node = inner[0] if inner else node
            if node.get_content_maintype() == "multipart" and subparts(node):
                parts = subparts(node)
                if not 0 <= p < len(parts):
                    raise IndexError("no such body part")
                node = parts[p]
            elif p != 0:
                raise IndexError("no such body part")
        return node

    # -- IMessage ---------------------------------------------------------------------

    def getUID(self) -> int:
        return self.info.uid

    def getFlags(self) -> list[str]:
        flags = sorted(self.info.flags)
        if self.info.recent:
            flags.append("\\Recent")
        return flags

    def getInternalDate(self) -> str:
        return email.utils.formatdate(self.info.internaldate)

    def getHeaders(self, negate: bool, *names: Any) -> dict[str, str]:
        return MimePart(self.header_message(), self.linesep).getHeaders(negate, *names)

    def getBodyFile(self) -> IO[bytes]:
        f = self.open()
        f.seek(self.body_offset)
        return f

    def getSize(self) -> int:
        return self.info.size

    def isMultipart(self) -> bool:
        return self.header_message().get_content_maintype() == "multipart"

    def getSubPart(self, part: int) -> MimePart:
        return MimePart(self.tree(), self.linesep).getSubPart(part)
