"""Locks on run and job directories, and cleanup of what a killed writer left behind.

A run directory is held by one ``capsbench run`` at a time: a second run into it fails at
once with a message naming the holder (pid, host, start time, command). A training job is
held by whoever trains it: a second process that needs the same job waits for it and then
reuses the finished checkpoint instead of training it twice.

The locks are ``flock`` locks on a ``.lock`` file, so the operating system releases them when
the holder dies, even by SIGKILL: a killed run never leaves a stale lock that blocks the next
one. The file itself records who holds it (for the message) and is removed on release.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from capsbench.errors import CapsbenchError

try:  # POSIX
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]


class LockedError(CapsbenchError):
    """The directory is held by another live process."""


LOCK_NAME = ".lock"


def _holder_info(command: str | None) -> dict[str, Any]:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": command or " ".join(sys.argv),
    }


def _describe(path: Path) -> str:
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        info = {}
    if not info:
        return "another process"
    return f"pid {info.get('pid')} on {info.get('host')} since {info.get('since')} ({info.get('command')})"


class DirLock:
    """An exclusive lock on ``folder`` (through ``folder/.lock``).

    Args:
        folder: the directory to hold.
        what: how to name it in messages ("run directory", "training job").
        wait: False: fail at once with :class:`LockedError` if held; True: wait for the holder,
            calling ``on_wait(description)`` once before waiting.
        command: recorded as the holder's command (default: this process's argv).
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        what: str = "run directory",
        wait: bool = False,
        command: str | None = None,
        on_wait: Callable[[str], None] | None = None,
    ) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.what = what
        self.wait = wait
        self.command = command
        self.on_wait = on_wait
        self._fd: int | None = None

    def acquire(self) -> DirLock:
        self.folder.mkdir(parents=True, exist_ok=True)
        if fcntl is None:  # pragma: no cover - no flock: best effort, no mutual exclusion
            return self
        waited = False
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _describe(self.path)
                if not self.wait:
                    os.close(fd)
                    raise LockedError(
                        f"{self.what} {self.folder} is in use by {holder}; wait for that run to "
                        f"finish (or stop it), or write to another --out folder"
                    ) from None
                if not waited and self.on_wait is not None:
                    self.on_wait(holder)
                waited = True
                fcntl.flock(fd, fcntl.LOCK_EX)
            # The holder before us removes the file when it lets go; if it did, we hold a lock
            # on a file nobody else can see: start over on the current one.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(_holder_info(self.command)).encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> DirLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def remove_partial_files(folder: str | os.PathLike, recursive: bool = True) -> list[Path]:
    """Delete the temporary files of interrupted atomic writes (``.NAME.XXXX.tmp``).

    Call it only while holding the folder's lock: a live writer's temporary file looks the
    same. Returns what was removed.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    pattern = "**/.*.tmp" if recursive else ".*.tmp"
    removed = []
    for p in folder.glob(pattern):
        if p.is_file():
            try:
                p.unlink()
                removed.append(p)
            except FileNotFoundError:
                pass
    return removed


__all__ = ["DirLock", "LockedError", "remove_partial_files", "LOCK_NAME"]
