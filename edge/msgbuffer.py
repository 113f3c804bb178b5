"""A message held while the checks judge it: in memory up to a limit, beyond it in a file.

Most mail is small, and for it the buffer is a list of the chunks as they came, joined once
at the end (a `SpooledTemporaryFile` costs several Python calls per write, and its own
object per message). A message past `limit` octets goes on into a temporary file in
`directory`, so that a large message never sits in memory whole.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import IO, Protocol


class Writable(Protocol):
    def write(self, chunk: bytes, /) -> object: ...


class MessageBuffer:
    def __init__(self, directory: Path, limit: int) -> None:
        self.directory = directory
        self.limit = limit
        self.size = 0
        self._chunks: list[bytes] | None = []
        self._file: IO[bytes] | None = None

    @property
    def in_memory(self) -> bool:
        return self._chunks is not None

    def write(self, chunk: bytes) -> None:
        chunks = self._chunks
        if chunks is not None:
            if self.size + len(chunk) <= self.limit:
                chunks.append(chunk)
                self.size += len(chunk)
                return
            self._file = tempfile.TemporaryFile(dir=self.directory)  # noqa: SIM115
            self._file.writelines(chunks)
            self._chunks = None
        assert self._file is not None
        self._file.write(chunk)
        self.size += len(chunk)

    def value(self) -> bytes:
        """The whole message, from memory (`in_memory`), else read from the file (blocking)."""
        if self._chunks is not None:
            joined = b"".join(self._chunks)
            self._chunks = [joined]
            return joined
        assert self._file is not None
        self._file.seek(0)
        return self._file.read()

    def copy_to(self, out: Writable) -> None:
        """Write the message to `out`, in pieces (blocking when it is in the file)."""
        if self._chunks is not None:
            for chunk in self._chunks:
                out.write(chunk)
            return
        assert self._file is not None
        self._file.seek(0)
        while piece := self._file.read(64 * 1024):
            out.write(piece)

    def close(self) -> None:
        self._chunks = []
        if self._file is not None:
            self._file.close()
            self._file = None
