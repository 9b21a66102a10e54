"""Locks that make several writers on one cache safe (e.g. encode-latents and encode-features at once).

- `cache_lock(root)`: an exclusive flock on CACHE/.lock around every read-modify-write of the manifest, so
  one writer's update never overwrites another's.
- `ArrayLock(root, name)`: held for a whole encode job by its rank 0, so two jobs never write one array;
  the second is refused with a message naming the holder (host, pid, command, start time).

flock locks are released by the kernel when their holder dies (even by SIGKILL), so a crash leaves no stale
lock. They work on local filesystems and on NFS (Linux emulates them with POSIX locks there); on Lustre the
filesystem must be mounted with `-o flock`.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

from repa_pipe.cache.layout import CachePaths
from repa_pipe.pipeline.errors import CacheBusyError


@contextlib.contextmanager
def cache_lock(root: Path) -> Iterator[None]:
    """Exclusive, blocking lock of the cache's manifest (waits for another writer's short update)."""
    path = CachePaths(Path(root)).lock
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def wait_for_cache_lock(root: Path) -> bool:
    """Wait until no job holds the cache lock (e.g. one creating this cache right now, which holds it until the
    manifest is written). False when the folder has no lock file. Creates nothing."""
    try:
        fd = os.open(CachePaths(Path(root)).lock, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
    finally:
        os.close(fd)
    return True


def _holder() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "since_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ",
            time.gmtime()), "command": " ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]])[:300]}


class HolderLock:
    """Exclusive, non-blocking flock on `path` for a whole job; `acquire` raises `busy(holder)` when another job
    holds it, naming that job (host, pid, start time, command)."""

    def __init__(self, path: Path, busy: Callable[[str], Exception]):
        self.path = Path(path)
        self._busy = busy
        self._fd: Optional[int] = None

    def acquire(self) -> "HolderLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._read_holder(fd)
            os.close(fd)
            raise self._busy(holder) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(_holder()) + "\n").encode(), 0)
        self._fd = fd
        return self

    @staticmethod
    def _read_holder(fd: int) -> str:
        try:
            h = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
            return f"pid {h['pid']} on {h['host']} since {h['since_utc']}: {h['command']}"
        except (ValueError, KeyError, OSError):
            return "holder unknown"

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "HolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


class ArrayLock(HolderLock):
    """Held for a whole encode job by its rank 0: one job writes an array; CacheBusyError names the holder."""

    def __init__(self, root: Path, name: str):
        self.name = name
        path = CachePaths(Path(root)).array_lock(name)
        super().__init__(path, lambda holder: CacheBusyError(
            f"{path.parents[1]}: {name} is being written by another job ({holder}); wait for it to finish, or stop "
            "it and run this command again to resume"))
