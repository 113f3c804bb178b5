"""File modes for what only the service's own user may read: directories 0700, files 0600.

The secrets (the store and its key, the admin key, TLS private keys, the device's credentials
and edge link) and the mail (spool, Maildir) live under the data directory. `private_dir`
makes a directory 0700, creating it and any missing parent with that mode; `private_file`
makes a file 0600, creating it empty when asked. On an existing install both narrow a mode
that is too open and say so in the log (once per path and start), so an upgrade fixes what
an older version left readable. This module must never widen a mode, touch a path it was
not given (existing parents keep their mode) or read a file's contents.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from twisted.logger import Logger

__all__ = ["DIR_MODE", "FILE_MODE", "private_dir", "private_file"]

log = Logger(namespace="tailpost.private")

DIR_MODE = 0o700
FILE_MODE = 0o600


def _narrow(path: Path, mode: int, what: str) -> bool:
    """chmod `path` to `mode` if group or others have any access; True if it was changed."""
    try:
        current = stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        return False
    if current & 0o077 == 0:
        return False
    os.chmod(path, mode)
    log.info(
        "{what} {path} was mode {old:o}; now {new:o} (only this service's user may read it)",
        what=what,
        path=str(path),
        old=current,
        new=mode,
    )
    return True


def private_dir(path: Path, *, narrow: bool = True) -> Path:
    """`path` as a directory of mode 0700: made (with missing parents, 0700 too) or, when it
    exists and `narrow` is set, narrowed (`narrow=False` for a directory the operator chose,
    which may be shared)."""
    path = Path(path)
    missing: list[Path] = []
    here = path
    while not here.exists():
        missing.append(here)
        if here.parent == here:
            break
        here = here.parent
    for directory in reversed(missing):
        try:
            directory.mkdir(mode=DIR_MODE)
        except FileExistsError:
            pass  # made meanwhile by another process: narrowed below
        os.chmod(directory, DIR_MODE)  # mkdir's mode is filtered by the umask
    if narrow:
        _narrow(path, DIR_MODE, "directory")
    return path


def private_file(path: Path, *, create: bool = False) -> bool:
    """Make the file at `path` mode 0600 (created empty with that mode when `create` and it is
    missing). False when it does not exist and was not to be created."""
    path = Path(path)
    if create:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
        except FileExistsError:
            pass
        else:
            os.fchmod(fd, FILE_MODE)  # O_CREAT's mode is filtered by the umask
            os.close(fd)
            return True
    if not path.exists():
        return False
    _narrow(path, FILE_MODE, "file")
    return True
