"""One fit per workdir: an exclusive lock held for the length of ``fit``.

Two processes training into one workdir destroy each other's work: each one's orbax manager
renames and deletes the other's checkpoints, and both append to ``metrics.csv``. So ``fit``
holds an ``fcntl.flock`` on ``<workdir>/.nnxfit.lock`` from before it reads a checkpoint until
it returns, and a second fit fails at once with ``WorkdirLockedError`` naming the holder
(pid, host, command and start time, which the holder writes into the file).

The kernel drops a flock when the last file descriptor on it closes, so a killed or crashed
fit leaves no stale lock: its file stays, unlocked, and the next fit takes it. A flock
belongs to one open file, so two Trainers in one process exclude each other as well. A
forked child (a data loader worker) shares the open file: the explicit unlock on release
frees it for all of them.

Under ``jax.distributed`` each process locks its own file (``.nnxfit.lock.<i>`` for process
``i`` > 0): the processes of one fit share the workdir, and each process of a second fit
meets its counterpart's lock, so they all fail rather than wait in a collective for a
process 0 that has stopped.

A filesystem without flock support (some network or FUSE mounts) gets a warning, and the
fit runs unlocked.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import time
from typing import Any

from nnxfit.errors import ConfigError, WorkdirLockedError
from nnxfit.warn import warn

LOCK_NAME = ".nnxfit.lock"
# What a filesystem without flock support answers.
_UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


def lock_path(workdir: str, process_index: int = 0) -> str:
    name = LOCK_NAME if process_index == 0 else f"{LOCK_NAME}.{process_index}"
    return os.path.join(workdir, name)


class WorkdirLock:
    """An exclusive, non-blocking lock on ``workdir`` for this process (a context manager)."""

    def __init__(self, workdir: str | os.PathLike, process_index: int = 0):
        self.workdir = os.path.abspath(os.fspath(workdir))
        self.path = lock_path(self.workdir, process_index)
        self.process_index = process_index
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> WorkdirLock:
        try:
            os.makedirs(self.workdir, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise ConfigError(
                f"cannot create the lock file {self.path}: {e}. Pass a writable Trainer workdir."
            ) from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise WorkdirLockedError(self._locked_message(holder), holder) from None
        except OSError as e:
            os.close(fd)
            if e.errno not in _UNSUPPORTED:
                raise
            warn(
                f"cannot lock the workdir {self.workdir} ({e.strerror}: this filesystem does "
                "not support flock); the fit runs unlocked, so a second fit started into the "
                "same workdir would not be stopped."
            )
            return self
        self._fd = fd
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "process_index": self.process_index,
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": " ".join(sys.argv)[:300],
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        return self

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            os.ftruncate(fd, 0)  # before unlocking: the next holder writes its own details
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def __enter__(self) -> WorkdirLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def _locked_message(self, holder: dict) -> str:
        pid, host = holder.get("pid"), holder.get("host")
        if pid is None:
            who = "another fit (it has not written its pid into the lock file yet)"
            stop = "stop that process"
        else:
            here = host == socket.gethostname()
            who = f"another fit: pid {pid} on host {host}"
            if here and pid == os.getpid():
                who = f"another fit in this same process (pid {pid})"
            elif here and not _alive(pid):
                who += (
                    " (no longer running: a process it started, such as a data loader "
                    "worker, still holds the lock)"
                )
            if holder.get("command"):
                who += f", command `{holder['command']}`"
            if holder.get("started"):
                who += f", started {holder['started']}"
            stop = f"stop it (kill {pid}{'' if here else f' on {host}'})"
        return (
            f"workdir {self.workdir} is in use by {who}. Two fits writing one workdir destroy "
            f"each other's checkpoints and logs. Use another workdir, wait for that fit to "
            f"end, or {stop}; a fit that crashed or was killed leaves no lock behind "
            f"(lock file: {self.path})."
        )


def _read_holder(fd: int) -> dict[str, Any]:
    try:
        data = os.pread(fd, 4096, 0)
        holder = json.loads(data.decode()) if data else {}
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def lock_workdir(trainer) -> contextlib.AbstractContextManager:
    """The lock ``fit`` holds: none without a workdir or under ``fast_dev_run`` (which
    writes nothing)."""
    if trainer.workdir is None or trainer.fast_dev_run:
        return contextlib.nullcontext()
    import jax

    return WorkdirLock(trainer.workdir, jax.process_index())
