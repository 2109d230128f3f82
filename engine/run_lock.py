"""One run per run directory: ``RUN/.lock``, held with ``flock`` by the process that owns the run.

Two runs on one directory would interleave ``metrics.jsonl`` and overwrite each other's
checkpoints. The lock file names its holder (host, pid, start time) so that a refused run can say
who owns the directory. ``flock`` is released by the kernel when its holder dies, however it dies,
so a lock left by a dead run is simply taken over (and its file rewritten); there is no liveness
guess to get wrong. On a file system without ``flock`` support the run goes on unlocked, with a
warning.
"""
from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"


class RunDirLocked(RuntimeError):
    """Another live run holds the directory."""


def describe_owner(path: Path) -> str:
    try:
        owner = json.loads(path.read_text())
        return f"host {owner['host']} pid {owner['pid']} (since {owner['since']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process whose lock file is unreadable"


class RunLock:
    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        """Take the lock or raise :class:`RunDirLocked` naming its holder."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunDirLocked(f"run_dir {self.run_dir} is in use by {describe_owner(self.path)}; "
                                   f"stop that run or choose another run_dir") from None
            log.warning("%s: cannot lock (%s); two runs on this run_dir would not be stopped",
                        self.path, exc)
            return self
        owner = {"host": socket.gethostname(), "pid": os.getpid(),
                 "since": time.strftime("%Y-%m-%dT%H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(owner) + "\n").encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
