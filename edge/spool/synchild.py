"""The spool's sync process: `fdatasync` on request, with an interpreter lock of its own.

`edge.spool.syncer` starts this as `python -S edge/spool/synchild.py` and writes one file path per
line to its standard input; for each it calls `fdatasync` on that file and answers one line on
standard output, in order: `0` when the file's data is durable, else the errno. It keeps the last
file it synced open (the segment being appended to). It uses nothing but `os`, and it ends when its
standard input does: when the edge stops or dies.
"""

from __future__ import annotations

import errno
import os


def serve(read_fd: int = 0, write_fd: int = 1) -> None:
    open_files: dict[bytes, int] = {}
    pending = b""
    while True:
        data = os.read(read_fd, 65536)
        if not data:
            break
        pending += data
        *paths, pending = pending.split(b"\n")
        answers = b"".join(b"%d\n" % sync(open_files, path) for path in paths)
        while answers:
            answers = answers[os.write(write_fd, answers) :]
    for fd in open_files.values():
        os.close(fd)


def sync(open_files: dict[bytes, int], path: bytes) -> int:
    """`fdatasync` of `path`: 0, or the errno it failed with (the file is then reopened on
    the next request, so that every error is seen by the request it concerns)."""
    try:
        fd = open_files.get(path)
        if fd is None:
            for old in list(open_files):
                os.close(open_files.pop(old))
            fd = open_files[path] = os.open(path, os.O_RDONLY)
        os.fdatasync(fd)
        return 0
    except OSError as exc:
        fd = open_files.pop(path, None)
        if fd is not None:
            os.close(fd)
        return exc.errno or errno.EIO


if __name__ == "__main__":
    serve()
