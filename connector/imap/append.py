"""APPEND's message literal, written to a file in the Maildir's tmp/ as it arrives.

A `SpooledLiteral` stands where Twisted's IMAP server keeps a literal (its
`_pendingLiteral`): `write` takes the bytes the connection received and passes on what
follows the literal, `callback` hands the finished spool to the command. The message is
never held in memory: at most one write buffer per session. The file is the caller's to
deliver (`Folder.add_file`, which renames it) or to `discard`; a spool that is neither
(the client left in the middle, or the command failed) is removed by the server.
This module must never deliver a message itself nor leave a file behind on `discard`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from twisted.mail.imap4 import IllegalOperation

log = Logger()

WRITE_BUFFER = 64 * 1024
"""Bytes buffered before a write to the spool file."""


class SpoolFailed(IllegalOperation):
    """The spool file could not be written (the disk is full, say)."""


class SpooledLiteral:
    """A literal of `size` octets being written to `path` (created here, exclusively)."""

    def __init__(self, size: int, deferred: defer.Deferred[Any], path: Path) -> None:
        self.size = size
        self.defer = deferred
        self.path: Path | None = path
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        self.file: Any = os.fdopen(fd, "wb", buffering=WRITE_BUFFER)
        self.adopted = False
        """The command took the file (it delivers or discards it from then on)."""
        self.error: OSError | None = None

    def _write(self, data: bytes) -> None:
        if self.error is not None:
            return
        try:
            self.file.write(data)
        except OSError as e:
            log.warn("APPEND spool {path} not written: {error}", path=self.path, error=e)
            self.error = e
            self.discard()

    def write(self, data: bytes) -> bytes | None:
        """Take what the connection received; what follows the literal, once it is
        complete (b"" if nothing does), else None."""
        self.size -= len(data)
        if self.size > 0:
            self._write(data)
            return None
        if self.size:
            data, passon = data[: self.size], data[self.size :]
        else:
            passon = b""
        self._write(data)
        return passon

    def callback(self, line: bytes) -> None:
        """The literal is complete and `line` is the rest of the command line."""
        if self.error is None:
            try:
                self.file.close()
            except OSError as e:
                self.error = e
                self.discard()
        if self.error is not None:
            self.defer.errback(SpoolFailed("The message could not be stored"))
            return
        self.defer.callback((self, line))

    def adopt(self) -> Path:
        """The command takes the file: it must deliver it or `discard` it."""
        assert self.path is not None
        self.adopted = True
        return self.path

    def discard(self) -> None:
        """Close and remove the file (a no-op the second time)."""
        if not self.file.closed:
            try:
                self.file.close()
            except OSError:
                pass
        if self.path is not None:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            self.path = None
