"""Durable file system operations: atomic writes, fsync of files and directories, a lock.

A file is published by writing it under a temporary name, flushing it to disk
(``fsync`` of the file), renaming it into place and flushing the directory that
holds it (``fsync`` of the directory), so that after a crash or power loss the
name refers either to the old complete file or to the new complete one.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from ..errors import ConfigError, DiskFullError, RunDirError

TMP_MARK = ".modnet-tmp-"
OLD_MARK = ".modnet-old-"
# What a killed write leaves behind: ``.<name>.modnet-tmp-<pid>[suffix]`` or
# ``.<name>.modnet-old-<pid>``: a mark modnet alone uses, so a user's hidden files
# (``.notes.tmp-1.txt``) are never taken for leftovers.
LEFTOVER = re.compile(r"^\..+\.modnet-(tmp|old)-\d+(\.[A-Za-z0-9]+)?$")
# What older versions of modnet left behind (``.<name>.tmp-<pid>[suffix]``,
# ``.<name>.old-<pid>``): a user may name files so too, so such a leftover is
# recognised only where its name says modnet wrote it (``remove_leftovers``).
LEGACY_LEFTOVER = re.compile(r"^\.(?P<stem>.+)\.(?P<mark>tmp|old)-\d+(?P<suffix>\.[A-Za-z0-9]+)?$")
LOCK_FILE = ".lock"
LOCK_INFO = ".lock.info"
_HELD: set[str] = set()  # run directories this process holds the lock of


def fsync_path(path: Path) -> None:
    """Flushes a file's or a directory's contents (its entries, for a directory) to disk."""
    flags = os.O_RDONLY | (os.O_DIRECTORY if Path(path).is_dir() else 0)
    descriptor = os.open(path, flags)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def fsync_tree(root: Path) -> None:
    """Flushes every file under ``root``, then every directory, deepest first, then ``root``."""
    directories = []
    for folder, subdirs, files in os.walk(root):
        for name in files:
            fsync_path(Path(folder) / name)
        directories.append(Path(folder))
        del subdirs  # os.walk descends into them by itself
    for folder in reversed(directories):
        fsync_path(folder)


def disk_full(error: BaseException) -> bool:
    """Whether ``error`` says the device is full (errno, or the text libraries put it in)."""
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return True
    text = str(error)
    return "No space left on device" in text or "os error 28" in text


@contextmanager
def disk_full_names(path: Path) -> Iterator[None]:
    """Turns a full-device failure while writing ``path`` into a ``DiskFullError`` naming it."""
    try:
        yield
    except DiskFullError:
        raise
    except Exception as error:
        if disk_full(error):
            full = DiskFullError(
                f"no space left on device while writing {path}: free some space or write "
                "elsewhere (--out)"
            )
            full.errno, full.filename = errno.ENOSPC, str(path)
            raise full from error
        raise


def _file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


# What open() gives a new file under this process's umask: every file modnet writes has it.
FILE_MODE = _file_mode()


def follow_umask(path: Path) -> None:
    """Gives a written file the mode ``open()`` would: safetensors creates 0600 files."""
    if Path(path).is_file():
        os.chmod(path, FILE_MODE)


def existing_ancestor(path: str | Path) -> Path:
    """``path`` itself if it exists, else its nearest ancestor that does (a link
    counts, even a broken one): where creating ``path`` would start."""
    path = Path(path)
    return next((p for p in (path, *path.parents) if p.exists() or p.is_symlink()), Path("."))


def refuse_existing(paths: Iterable[Path], choose: str, replace: str) -> None:
    """Refuses, before any work, to replace files that exist (a user's, perhaps).

    A symbolic link counts as existing, even a dangling one: writing the path would
    write the file it points to (``atomic_write``).

    Args:
        paths: The files about to be written.
        choose: What to choose instead, for the message (``--out``, ``directory``).
        replace: How to replace them anyway (``--overwrite``, ``overwrite=True``).

    Raises:
        ConfigError: Naming every one of ``paths`` that exists, in one line.
    """
    existing = [Path(p) for p in paths if Path(p).exists() or Path(p).is_symlink()]
    if existing:
        first, *rest = existing
        names = [str(first), *(p.name if p.parent == first.parent else str(p) for p in rest)]
        if first.is_symlink():
            names[0] += f" (a symbolic link to {os.readlink(first)})"
        listed = f"{', '.join(names[:-1])} and {names[-1]} already exist" if rest else ""
        raise ConfigError(
            f"{listed or f'{names[0]} already exists'}: choose another {choose}, or pass "
            f"{replace} to replace {'them' if rest else 'it'}"
        )


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Writes ``path`` through ``write(tmp_path)``, flushes it and renames it into place.

    The file and then its directory are fsynced, so the new content survives a
    crash once this returns, and a crash before leaves the old file. When ``path``
    is a symbolic link (even a dangling one), the file it points to is written and
    the link is kept, as ``open(path, "w")`` would do.

    Raises:
        DiskFullError: The device is full (the message names ``path``).
    """
    path = Path(path)
    if path.is_symlink():
        path = Path(os.path.realpath(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}{TMP_MARK}{os.getpid()}{path.suffix}")
    try:
        with disk_full_names(path):
            write(tmp)
            follow_umask(tmp)
            fsync_path(tmp)
            os.replace(tmp, path)
            fsync_path(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: Path, text: str) -> None:
    """``atomic_write`` of a text file."""
    atomic_write(path, lambda tmp: tmp.write_text(text))


def write_json(path: Path, data: Any) -> None:
    """``atomic_write`` of ``data`` as indented JSON."""
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def legacy_leftover_of(name: str) -> tuple[str, str] | None:
    """What an older modnet's leftover ``name`` was written for and how: ``(file,
    "tmp")`` for a file being written (``.results.tmp-7.json`` -> ``results.json``),
    ``(folder, "old")`` for a folder being replaced; None when ``name`` is no such
    leftover."""
    match = LEGACY_LEFTOVER.match(name)
    return (match["stem"] + (match["suffix"] or ""), match["mark"]) if match else None


def remove_leftovers(directory: Path, legacy: Callable[[str], bool] | None = None) -> list[Path]:
    """Removes what killed writes left in ``directory``; returns them.

    Args:
        directory: The folder to tidy (nothing happens when it is missing).
        legacy: Which of the names an older modnet's leftovers have
            (``legacy_leftover_of``) go too, given the name. By default none.
    """
    removed = []
    if not Path(directory).is_dir():
        return removed
    for entry in Path(directory).iterdir():
        old = legacy is not None and legacy_leftover_of(entry.name) is not None
        if LEFTOVER.match(entry.name) or (old and legacy(entry.name)):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


@contextmanager
def exclusive_lock(directory: Path, what: str) -> Iterator[None]:
    """Holds an OS-level lock on ``directory`` (a ``.lock`` file in it) while writing.

    The lock is ``flock``-based (``filelock``): the operating system releases it
    when the holding process dies, so a killed run never blocks its own resume.
    Who holds it (pid, host, command, since when) is written next to it.

    Raises:
        RunDirError: Another process holds the lock; the message names it.
    """
    directory = Path(directory)
    key = str(directory.resolve())
    if key in _HELD:  # this process already writes the run (a command calling another)
        yield
        return
    lock = FileLock(directory / LOCK_FILE, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise RunDirError(
            f"{directory} is being written by another process ({_holder(directory)}): wait for "
            f"it to finish or stop it before this {what}: one process at a time writes a run "
            "directory"
        ) from None
    try:
        info = dict(pid=os.getpid(), host=socket.gethostname(), command=what, since=time.time())
        (directory / LOCK_INFO).write_text(json.dumps(info) + "\n")
        _HELD.add(key)
        yield
    finally:
        _HELD.discard(key)
        lock.release()


def _holder(directory: Path) -> str:
    try:
        info = json.loads((directory / LOCK_INFO).read_text())
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["since"]))
        return f"pid {info['pid']} on {info['host']}, `{info['command']}` since {since}"
    except (OSError, ValueError, KeyError, TypeError):
        return "holder unknown"
