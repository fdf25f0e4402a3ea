"""Exclusive folder locks: one process at a time writes into a folder (``fcntl.flock`` on a lock file).

The lock file holds its holder's pid, so a refused process can name it. The lock is the kernel's and
dies with its holder: a process killed with SIGKILL leaves the file behind unlocked, and the next one
takes it over. Where ``fcntl`` does not exist (Windows) the lock is a no-op.
"""

from __future__ import annotations

import errno
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lowdose_toolkit.errors import UserError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

_UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL}


def _holder(fd: int) -> int | None:
    """The pid written in an open lock file, ``None`` if it holds none (yet)."""
    text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    return int(text) if text.isdigit() else None


@contextmanager
def folder_lock(folder: str | os.PathLike[str], holder: str, fix: str, name: str = ".ldt.lock") -> Iterator[Path]:
    """Hold an exclusive lock on ``folder`` (which must exist) for the block; yields the lock file.

    Raises :class:`UserError` ``"FOLDER is in use by another HOLDER (pid N); FIX"`` when another
    process (or another open of the same lock in this process) holds it. The lock file is removed
    when the block ends.
    """
    folder = Path(folder)
    path = folder / name
    if fcntl is None:  # pragma: no cover - Windows
        yield path
        return
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _holder(fd) or "unknown"
            os.close(fd)
            raise UserError(f"{folder} is in use by another {holder} (pid {pid}); {fix}") from None
        except OSError as exc:
            os.close(fd)
            if exc.errno not in _UNSUPPORTED:
                raise
            warnings.warn(f"{folder}: the file system cannot lock files ({exc.strerror}); nothing stops another "
                          f"{holder} from writing there meanwhile", UserWarning, stacklevel=3)
            yield path
            return
        # The previous holder may have removed the file between our open and our lock: then we hold a
        # lock on a file nobody else can see, so start again with the current file.
        try:
            current = os.stat(path)
        except FileNotFoundError:
            current = None
        mine = os.fstat(fd)
        if current is not None and (current.st_dev, current.st_ino) == (mine.st_dev, mine.st_ino):
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield path
    finally:
        try:
            os.unlink(path)  # while still locked, so no one else holds a lock on this file
        except FileNotFoundError:
            pass
        os.close(fd)
