"""The spool's segment files: preallocated, zero-filled, appended to one batch at a time.

A segment is `queue/<name>.seg`. It is made before it is needed, at its full size: written
with zeros and fsynced, and its directory fsynced. Appending a batch to it later changes no
file metadata, so one `pwrite` and one `fdatasync` make the batch durable. Each batch starts
on a `BLOCK` boundary, so writing one never rewrites a disk block that holds an earlier,
acknowledged batch. A batch too big for a whole segment gets a segment of its own, written
and fsynced at its size (`write_whole`).

A record is a header, the envelope (JSON) and the message data. The header, little-endian:

    magic            4 octets, "TPR1"
    crc32            4 octets, over the rest of the header, the envelope and the data
    envelope length  4 octets
    follow           4 octets: records of the same batch after this one
    data length      8 octets

A batch counts only whole. Reading (`read_segment`) goes from the start until the first
record that is not valid (zeros, a torn write, a wrong checksum, a length beyond the file)
and drops what it read of that record's batch, so a batch whose `fdatasync` did not
complete never comes back, not even in part. Nothing after that point is read.
"""

from __future__ import annotations

import contextlib
import os
import struct
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from maildir.durable import fsync_dir

SEGMENT_SIZE = 4 << 20
"""The size a segment is made with (octets)."""

BLOCK = 4096
"""Batches start at multiples of this."""

MAGIC = b"TPR1"
HEADER = struct.Struct("<4sIIIQ")
_MAX_ENVELOPE = 16 << 20
_ZEROS = bytes(1 << 20)
_CHUNK = 1 << 20

Record = tuple[bytes, int, Iterable[bytes | bytearray]]
"""One message to write: its envelope (JSON), its data size and its data, in chunks."""


def batch_size(records: Iterable[tuple[bytes, int]]) -> int:
    """The octets a batch of (envelope, data size) takes, before the padding to `BLOCK`."""
    return sum(HEADER.size + len(env) + size for env, size in records)


def _align(offset: int) -> int:
    return -(-offset // BLOCK) * BLOCK


class Segment:
    """One segment this process appends to. Only one thread at a time may use it."""

    def __init__(self, path: Path, fd: int, size: int) -> None:
        self.path = path
        self.name = path.stem
        self.fd = fd
        self.size = size
        self.end = 0
        """Where the next batch goes."""
        self.committed = 0
        """Batches in it that were acknowledged (kept by the spool; `append` does not count)."""

    @classmethod
    def create(cls, directory: Path, name: str, size: int = SEGMENT_SIZE) -> Segment:
        """Make `<directory>/<name>.seg`: `size` octets of zeros, durable with its name."""
        with _new_file(directory, name) as (path, fd):
            left = size
            while left > 0:
                left -= os.write(fd, memoryview(_ZEROS)[: min(left, len(_ZEROS))])
        return cls(path, fd, size)

    @property
    def free(self) -> int:
        return self.size - self.end

    def append(self, records: list[Record]) -> tuple[int, list[int]]:
        """Write a batch that fits (`free`) and make it durable: (its offset, where each
        message's data starts). If that fails, what was written is made unreadable, as far
        as the disk still allows; the segment is then not to be appended to again."""
        at = self.end
        try:
            at, starts = self.write(records)
            os.fdatasync(self.fd)
        except BaseException:
            self.erase(at)
            raise
        return at, starts

    def write(self, records: list[Record]) -> tuple[int, list[int]]:
        """Write a batch that fits (`free`), not yet durable (`fdatasync` of the file makes
        it so): (its offset, where each message's data starts)."""
        buf, starts = encode_batch(records)
        at = self.end
        if len(buf) > self.free:
            raise ValueError(f"a batch of {len(buf)} octets does not fit in segment {self.name}")
        self.end = _align(at + len(buf))
        _pwrite_all(self.fd, buf, at)
        return at, [at + s for s in starts]

    def erase(self, at: int) -> None:
        """Undo the batch written at `at` (best effort): zeros over its first header end the
        segment's records there."""
        try:
            _pwrite_all(self.fd, bytes(HEADER.size), at)
            os.fdatasync(self.fd)
        except OSError:
            pass

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def encode_batch(records: list[Record]) -> tuple[bytearray, list[int]]:
    """A batch as one buffer, and where each message's data starts in it."""
    buf = bytearray()
    starts = []
    for i, (env, size, chunks) in enumerate(records):
        start = len(buf)
        buf += HEADER.pack(MAGIC, 0, len(env), len(records) - 1 - i, size)
        buf += env
        starts.append(len(buf))
        for chunk in chunks:
            buf += chunk
        if len(buf) - starts[-1] != size:
            raise ValueError(f"message data is {len(buf) - starts[-1]} octets, not {size}")
        struct.pack_into("<I", buf, start + 4, zlib.crc32(memoryview(buf)[start + 8 :]))
    return buf, starts


def write_whole(directory: Path, name: str, records: list[Record]) -> tuple[Segment, list[int]]:
    """A segment holding just this batch, written at its size and fsynced with its name:
    the segment and where each message's data starts. Nothing stays if it fails."""
    starts = []
    with _new_file(directory, name) as (path, fd):
        offset = 0
        for i, (env, size, chunks) in enumerate(records):
            head = HEADER.pack(MAGIC, 0, len(env), len(records) - 1 - i, size)
            crc = zlib.crc32(env, zlib.crc32(head[8:]))
            _pwrite_all(fd, head + env, offset)
            start = offset + len(head) + len(env)
            at = start
            for chunk in chunks:
                crc = zlib.crc32(chunk, crc)
                _pwrite_all(fd, chunk, at)
                at += len(chunk)
            if at - start != size:
                raise ValueError(f"message data is {at - start} octets, not {size}")
            _pwrite_all(fd, struct.pack("<I", crc), offset + 4)
            starts.append(start)
            offset = at
    segment = Segment(path, fd, offset)
    segment.end = offset
    return segment, starts


@contextlib.contextmanager
def _new_file(directory: Path, name: str) -> Iterator[tuple[Path, int]]:
    """A new segment file `<directory>/<name>.seg` to fill: fsynced with its name after the
    block, removed (and its descriptor closed) if anything fails."""
    path = directory / f"{name}.seg"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        yield path, fd
        os.fsync(fd)
        fsync_dir(directory)
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise


def _pwrite_all(fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


@dataclass
class Scan:
    """What `read_segment` found: each message's (envelope JSON, data offset, data length),
    and, if reading stopped at something other than zeros or the end, where."""

    records: list[tuple[bytes, int, int]]
    damaged_at: int | None = None


def read_segment(path: Path) -> Scan:
    """The records of every whole, valid batch from the start of the segment."""
    scan = Scan([])
    batch: list[tuple[bytes, int, int]] = []
    offset = 0
    expect: int | None = None  # the `follow` the next record of the open batch must have
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        while True:
            fh.seek(offset)
            if offset + HEADER.size > size:
                if batch or any(fh.read()):
                    scan.damaged_at = offset
                break
            head = fh.read(HEADER.size)
            magic, crc, env_len, follow, data_len = HEADER.unpack(head)
            end = offset + HEADER.size + env_len + data_len
            bad = (
                magic != MAGIC
                or env_len > _MAX_ENVELOPE
                or end > size
                or (expect is not None and follow != expect)
            )
            if not bad:
                env = fh.read(env_len)
                check = zlib.crc32(env, zlib.crc32(head[8:]))
                left = data_len
                while left > 0 and (chunk := fh.read(min(left, _CHUNK))):
                    check = zlib.crc32(chunk, check)
                    left -= len(chunk)
                bad = left > 0 or check != crc
            if bad:
                if batch or any(head):
                    scan.damaged_at = offset
                break
            batch.append((env, offset + HEADER.size + env_len, data_len))
            if follow:
                offset, expect = end, follow - 1
            else:
                scan.records += batch
                batch, offset, expect = [], _align(end), None
    return scan


_LEGACY_MAGIC = b"TPSPOOL1\n"
_LEGACY_RECORD = b"TPREC "


def read_legacy_batch(path: Path) -> list[tuple[bytes, int, int]]:
    """The records of a `<name>.batch` file of earlier versions (one batch per file, which
    was renamed into place only once durable)."""
    found: list[tuple[bytes, int, int]] = []
    with open(path, "rb") as fh:
        if fh.read(len(_LEGACY_MAGIC)) != _LEGACY_MAGIC:
            return found
        while True:
            header = fh.readline()
            if not header.startswith(_LEGACY_RECORD):
                break
            env_len, data_len = (int(x) for x in header[len(_LEGACY_RECORD) :].split())
            env = fh.read(env_len)
            found.append((env, fh.tell(), data_len))
            fh.seek(fh.tell() + data_len)
    return found
