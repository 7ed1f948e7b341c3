"""One writer per run directory: an advisory ``fcntl.flock`` on ``<run>/.lock``.

The lock is held by an open file, so the operating system releases it when the process ends,
however it ends: a killed run never leaves a stale lock. The holder writes its PID into the
file after locking; a second process that finds the directory locked raises
:class:`RunLockedError` (one line naming that PID) before it writes anything, and opening
the lock file to try does not change it.

Re-entrant within a process: ``cdi-train`` takes the lock before Hydra writes ``.hydra/``,
and :func:`~cdi_experiments.run.train.train` takes it again (a no-op) so that in-process
callers and sweep jobs are covered too. DDP rank processes other than rank 0 (started by
Lightning with ``LOCAL_RANK`` set, or by a launcher with ``RANK``/``SLURM_PROCID``) run the
same job as rank 0, which holds the lock; they skip it (:func:`is_rank_zero`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from cdi_experiments.paths import RunPaths
from cdi_experiments.run.schema import ConfigError

_RANK_VARS = ("LOCAL_RANK", "RANK", "NODE_RANK", "SLURM_PROCID")
_held: dict[Path, tuple[int, int]] = {}  # resolved lock path -> (fd, depth) in this process


class RunLockedError(ConfigError):
    """Another process is writing the run directory (one line: its PID and what to do)."""


def is_rank_zero() -> bool:
    """Whether this process is rank 0 of its job, by the variables DDP launchers set (a process
    with none of them set is rank 0)."""
    for var in _RANK_VARS:
        value = os.environ.get(var)
        if value not in (None, "", "0"):
            return False
    return True


def lock_holder(directory: str | os.PathLike) -> int | None:
    """The PID written in ``directory``'s lock file (``None`` if none or unreadable)."""
    try:
        return int(RunPaths(directory).lock.read_text().strip() or "x")
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def run_lock(directory: str | os.PathLike, command: str) -> Iterator[None]:
    """Hold ``directory``'s write lock for the ``with`` block (creating the directory).

    Args:
        directory: The run directory.
        command: The program taking it (``cdi-train``, ``cdi-prune``...), for the message.

    Raises:
        RunLockedError: Another process holds it.

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as d, run_lock(d, "demo"):
    ...     lock_holder(d) == os.getpid()
    True
    """
    if not is_rank_zero():
        yield
        return
    path = RunPaths(directory).lock.absolute()
    key = Path(os.path.realpath(path.parent)) / path.name
    if key in _held:  # re-entered by the same process
        fd, depth = _held[key]
        _held[key] = (fd, depth + 1)
        try:
            yield
        finally:
            fd, depth = _held[key]
            _held[key] = (fd, depth - 1)
        return
    fd = _acquire(path, command)
    _held[key] = (fd, 1)
    try:
        yield
    finally:
        _held.pop(key, None)
        os.close(fd)  # releases the flock; the file stays (removing it would race a new holder)


def _acquire(path: Path, command: str) -> int:
    # An existing directory and lock file are only opened, never changed, until we hold it.
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise
        pid = lock_holder(path.parent)
        holder = f"process {pid}" if pid else "another process"
        raise RunLockedError(
            f"{path.parent} is in use by {holder} (lock {path}); wait for it to finish, "
            f"or stop it, then rerun {command}, or write to another directory"
        ) from None
    pid = f"{os.getpid()}\n".encode()
    if os.pread(fd, 64, 0) != pid:  # rewritten only when it changes (keeps a rerun's files as-is)
        os.ftruncate(fd, 0)
        os.pwrite(fd, pid, 0)
    return fd


__all__ = ["RunLockedError", "is_rank_zero", "lock_holder", "run_lock"]
