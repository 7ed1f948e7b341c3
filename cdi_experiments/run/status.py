"""A run directory's machine-readable state: ``<run>/status.json``.

``state`` is one of:

* ``running``: written once the run holds its lock and its checkpoint (if any) was checked;
  a ``running`` status whose ``pid`` is gone means the process was killed (SIGKILL, power).
* ``finished``: written last, after every result file and figure: the one marker that a run
  is complete (``cdi-report`` trusts it; ``run_info.json`` alone does not say so).
* ``failed``: the run stopped on an error (a non-finite loss, a full disk...); ``reason``
  says which. Rerunning resumes from the last epoch-end checkpoint.
* ``interrupted``: SIGTERM or SIGINT; rerunning the same command resumes exactly.

Every status carries the sha256 of the composed task config (:func:`config_fingerprint`), so
a relaunched sweep skips a job only when it finished with the same config.

A sweep (``cdi-train -m``) collects its failed jobs across launchers (in-process, joblib
workers, submitit/SLURM jobs) in a file in the sweep directory that each job appends one line
to (:func:`sweep_failures`, :func:`record_sweep_failure`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from cdi_experiments.paths import RunPaths, atomic_write_text
from cdi_experiments.run.lock import is_rank_zero
from cdi_experiments.run.schema import plain

STATES = ("running", "finished", "failed", "interrupted")
SWEEP_LAUNCH_ENV = "CDI_SWEEP_LAUNCH"  # set by cdi-train -m: which launch a status belongs to
SWEEP_FAILURES_ENV = "CDI_SWEEP_FAILURES"  # set by cdi-train -m: the file failed jobs append to


def config_fingerprint(cfg: DictConfig | dict[str, Any]) -> str:
    """sha256 of the composed task config (resolved, keys sorted, as JSON).

    >>> config_fingerprint({"seed": 0}) == config_fingerprint({"seed": 0})
    True
    >>> config_fingerprint({"seed": 0}) == config_fingerprint({"seed": 1})
    False
    """
    data = plain(cfg) if isinstance(cfg, DictConfig) else cfg
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def read_status(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """``<run_dir>/status.json`` as a dict; ``None`` if absent or unreadable (not one of ours)."""
    try:
        status = json.loads(RunPaths(run_dir).status.read_text())
    except (OSError, ValueError):
        return None
    return status if isinstance(status, dict) and status.get("state") in STATES else None


def is_finished(run_dir: str | os.PathLike) -> bool:
    """Whether the run in ``run_dir`` finished: every result file is written."""
    status = read_status(run_dir)
    return bool(status) and status["state"] == "finished"


def write_status(
    run_dir: str | os.PathLike, state: str, fingerprint: str, reason: str | None = None
) -> dict[str, Any]:
    """Write ``<run_dir>/status.json`` atomically (on rank 0 only); returns what was written.

    Args:
        run_dir: The run directory.
        state: One of :data:`STATES`.
        fingerprint: :func:`config_fingerprint` of the run's config.
        reason: Why the run failed or was interrupted (one line).

    Raises:
        ValueError: ``state`` is not one of :data:`STATES`.
    """
    if state not in STATES:
        raise ValueError(f"state={state!r} is not one of {', '.join(STATES)}")
    previous = read_status(run_dir) or {}
    now = _now()
    started = previous.get("started_at") if previous.get("pid") == os.getpid() else None
    status = {
        "state": state,
        "reason": reason,
        "started_at": started or now,
        "updated_at": now,
        "finished_at": now if state == "finished" else None,
        "pid": os.getpid(),
        "host": platform.node(),
        "config_sha256": fingerprint,
        "sweep_launch": os.environ.get(SWEEP_LAUNCH_ENV),
    }
    if is_rank_zero():
        atomic_write_text(RunPaths(run_dir).status, json.dumps(status, indent=2) + "\n")
    return status


@contextlib.contextmanager
def sweep_failures(sweep_dir: str | os.PathLike) -> Iterator[list[str]]:
    """For one sweep launch: yields a list that, after the ``with`` block, holds one line per
    failed job (``<job dir>: <reason>``), as the jobs recorded them.

    Sets :data:`SWEEP_LAUNCH_ENV` and :data:`SWEEP_FAILURES_ENV` for the jobs (launchers pass
    the environment on to their worker processes and cluster jobs) and restores them after.
    """
    launch = uuid.uuid4().hex[:12]
    path = Path(sweep_dir).absolute() / f".failed_jobs.{launch}"
    env = {SWEEP_LAUNCH_ENV: launch, SWEEP_FAILURES_ENV: str(path)}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    failures: list[str] = []
    try:
        yield failures
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        with contextlib.suppress(FileNotFoundError):
            failures.extend(line for line in path.read_text().splitlines() if line)
            path.unlink()


def record_sweep_failure(job_dir: str | os.PathLike, reason: str) -> None:
    """Append ``<job_dir>: <reason>`` to this sweep's failure list (a no-op outside a sweep).

    One ``write`` of one short line on a file opened for appending: jobs in parallel processes
    do not interleave.
    """
    target = os.environ.get(SWEEP_FAILURES_ENV)
    if not target:
        return
    line = " ".join(f"{job_dir}: {reason}".split()) + "\n"
    Path(target).parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(target, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


__all__ = [
    "STATES",
    "SWEEP_FAILURES_ENV",
    "SWEEP_LAUNCH_ENV",
    "config_fingerprint",
    "is_finished",
    "read_status",
    "record_sweep_failure",
    "sweep_failures",
    "write_status",
]
