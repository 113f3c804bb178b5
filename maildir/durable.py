"""Making a file durable: written in a temporary file, fsynced, renamed into place, and the
directory that holds the new name fsynced too."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """fsync a directory so that a rename into it (or a file made in it) is durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(tmp: Path, dest: Path, parts: list[bytes]) -> None:
    """`parts` as the whole of `dest` (mode 0600), durably: written to `tmp`, fsynced, renamed
    onto `dest`, the directory fsynced. `tmp` is removed if anything fails before the rename."""
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            for part in parts:
                fh.write(part)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, dest)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(dest.parent)
