"""Atomic writes: a temporary file (or folder) beside the target, fsynced, then renamed into place."""

from __future__ import annotations

import errno
import os
import re
import secrets
import shutil
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# How the toolkit writes text files: UTF-8, and a file name that is not UTF-8 (a Latin-1 name on a Linux disk)
# as its own bytes, never an error that loses the file (a batch's summary).
TEXT = {"encoding": "utf-8", "errors": "surrogateescape"}

# fsync on a directory is refused by some file systems (and by Windows); the rename stays atomic.
_DIR_FSYNC_UNSUPPORTED = {errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF, errno.EACCES, errno.EISDIR}


def _create_temp(target: Path) -> Path:
    """Create an empty hidden file beside ``target``, mode ``0o666`` less the umask (as ``open(..., "w")``)."""
    suffix = "".join(target.suffixes)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp{suffix}")
        try:
            os.close(os.open(tmp, flags, 0o666))  # the kernel applies the umask (or a default ACL)
        except FileExistsError:
            continue
        return tmp
    raise FileExistsError(f"{target.parent}: no free temporary name for {target.name} after 100 tries; "
                          f"remove the stale .{target.name}.*.tmp* files there")


def fsync_file(path: str | os.PathLike[str]) -> None:
    """Flush a file's data and metadata to disk (``fsync``)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Flush a directory's entries (a rename into it) to disk; a no-op where the file system refuses it."""
    if os.name == "nt":  # pragma: no cover - directories cannot be opened on Windows
        return
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        if exc.errno in _DIR_FSYNC_UNSUPPORTED:
            return
        raise
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in _DIR_FSYNC_UNSUPPORTED:
            raise
    finally:
        os.close(fd)


@contextmanager
def atomic_path(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; on success fsync it and rename it to ``target``.

    After a normal exit the target holds the complete new content, durably: the file is fsynced
    before the rename and its folder after it, so a crash (or power loss) leaves either the old or
    the new file, never a partial one. On any exception in the block, Ctrl-C included, the temporary
    file is removed and the target is untouched. The file's mode is ``0o666`` less the process
    umask, as for a plain ``open(target, "w")`` of a new file (``0o644`` under umask 022).

    The temporary name is hidden (``.<name>.<random>.tmp<suffixes>``) and keeps the target's
    suffixes (``.nii.gz`` stays ``.nii.gz``) so writers that look at the extension behave. Only a
    process killed with SIGKILL (or a power loss) inside the block can leave one behind.

    Example:
        >>> with atomic_path("out/pred.nii.gz") as tmp:  # doctest: +SKIP
        ...     nib.save(img, tmp)
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp: Path | None = None
    renamed = False
    try:
        tmp = _create_temp(target)
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, target)
        renamed = True
        fsync_dir(target.parent)
    finally:
        if tmp is not None and not renamed:
            tmp.unlink(missing_ok=True)


_TEMP = re.compile(r"^\..+\.[0-9a-f]{8}\.tmp(\..*)?$")
_OLD_DIR = re.compile(r"^\.(?P<name>.+)\.[0-9a-f]{8}\.old$")


def remove_stale_temps(*folders: Path) -> list[Path]:
    """Clean up after writers killed mid-write in ``folders``; call it while holding the folder's lock.

    Removes the hidden temporary files and folders of :func:`atomic_path` and :func:`atomic_dir`
    (``.<name>.<8 hex>.tmp<suffixes>``). A previous output :func:`atomic_dir` had set aside
    (``.<name>.<8 hex>.old``) goes back to ``<name>`` when the kill left no new one there, else it is
    removed. Returns what was removed.
    """
    stale: list[Path] = []
    for folder in map(Path, folders):
        if not folder.is_dir():
            continue
        for p in list(folder.iterdir()):
            old = _OLD_DIR.match(p.name)
            if old and p.is_dir() and not os.path.lexists(folder / old["name"]):
                os.rename(p, folder / old["name"])  # the kill came between the two renames: restore it
            elif _TEMP.match(p.name) or (old and p.is_dir()):
                _remove(p)
                stale.append(p)
    return stale


def temp_dir_beside(target: Path) -> Path:
    """An empty hidden folder beside ``target`` to build it in (mode ``0o777`` less the umask, as ``mkdir``;
    ``tempfile.mkdtemp`` would make it 0700); :func:`remove_stale_temps` knows its name."""
    return _create_temp_dir(Path(target))


def _create_temp_dir(target: Path, kind: str = "tmp") -> Path:
    """Create an empty hidden folder beside ``target`` (mode ``0o777`` less the umask, as ``mkdir``)."""
    for _ in range(100):
        tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.{kind}")
        try:
            tmp.mkdir()
        except FileExistsError:
            continue
        return tmp
    raise FileExistsError(f"{target.parent}: no free temporary name for {target.name} after 100 tries; "
                          f"remove the stale .{target.name}.*.{kind} folders there")


def _remove(path: Path) -> None:
    """Remove a file, a link (not what it points to) or a folder tree."""
    if stat.S_ISDIR(path.lstat().st_mode):
        shutil.rmtree(path)
    else:
        path.unlink()


@contextmanager
def atomic_dir(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary folder beside ``target``; on success fsync its files and rename it to ``target``.

    The folder's files are written in the block; after a normal exit each is fsynced, then the folder,
    then it is renamed into place and the parent fsynced: readers see no folder or the complete one,
    never a part. An existing ``target`` (file, link or folder) is first renamed aside and removed after
    the new folder is in place (a link is removed, never what it points to), so a crash in between
    leaves the old content under a hidden ``.<name>.<random>.old`` name, not a partial one. On any
    exception in the block, Ctrl-C included, the temporary folder is removed and ``target`` is untouched.

    Example:
        >>> with atomic_dir("out/PET_denoised") as tmp:  # doctest: +SKIP
        ...     ds.save_as(tmp / "IM0001.dcm")
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp: Path | None = None
    renamed = False
    try:
        tmp = _create_temp_dir(target)
        yield tmp
        for child in tmp.rglob("*"):
            if child.is_file() and not child.is_symlink():
                fsync_file(child)
        fsync_dir(tmp)
        old: Path | None = None
        if os.path.lexists(target):
            old = target.with_name(f".{target.name}.{secrets.token_hex(4)}.old")
            os.rename(target, old)
        try:
            os.rename(tmp, target)
        except BaseException:
            if old is not None:  # put the old content back where it was
                os.rename(old, target)
            raise
        renamed = True
        fsync_dir(target.parent)
        if old is not None:
            _remove(old)
    finally:
        if tmp is not None and not renamed and os.path.lexists(tmp):
            shutil.rmtree(tmp)
