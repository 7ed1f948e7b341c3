"""Every file a run writes, named in one place, and the one way they are written (atomically)."""

from __future__ import annotations

import errno
import io
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pandas costs start-up time; only the CSV writer needs a DataFrame
    import pandas as pd

METRICS_CSV = "metrics.csv"
PRUNE_CSV = "prune_results.csv"
LAYERS_CSV = "layer_changes.csv"
DELTA_HIST_CSV = "delta_histograms.csv"
RUN_INFO_JSON = "run_info.json"
CHECKPOINT_DIR = "checkpoints"
LAST_CKPT = "last.ckpt"
DCP_INDEX = ".metadata"  # torch.distributed.checkpoint's index of a DCP folder (written last)
DCP_META = "meta.pt"  # Lightning's, in a DCP folder: the checkpoint less model and optimizer
FIGURE_DIR = "figures"
WANDB_DIR = "wandb"
LOCK_FILE = ".lock"  # fcntl.flock by the one process writing the run (its PID inside)
STATUS_JSON = "status.json"  # running | finished | failed | interrupted; finished is written last
PRUNED_MODEL = "pruned_sleeping.pt"
PRUNE_DIR = "prune"  # cdi-prune's results: <run>/prune/<invocation name>/
PRUNE_INVOCATION = "invocation.json"  # which cdi-prune invocation a prune/<name>/ holds
PRUNE_DONE = "DONE"  # written last in a prune/<name>/: its results are complete


class RunPaths:
    """Paths inside one run directory (Hydra's ``hydra.run.dir`` or a sweep job's dir)."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    @property
    def metrics(self) -> Path:
        return self.root / METRICS_CSV

    @property
    def prune(self) -> Path:
        return self.root / PRUNE_CSV

    @property
    def layers(self) -> Path:
        return self.root / LAYERS_CSV

    @property
    def delta_hist(self) -> Path:
        return self.root / DELTA_HIST_CSV

    @property
    def run_info(self) -> Path:
        return self.root / RUN_INFO_JSON

    @property
    def checkpoints(self) -> Path:
        return self.root / CHECKPOINT_DIR

    @property
    def last_ckpt(self) -> Path:
        return self.checkpoints / LAST_CKPT

    @property
    def figures(self) -> Path:
        return self.root / FIGURE_DIR

    @property
    def wandb(self) -> Path:
        return self.root / WANDB_DIR

    @property
    def pruned_model(self) -> Path:
        """State dict of the model with its sleeping weights pruned (masks made permanent)."""
        return self.root / PRUNED_MODEL

    @property
    def lock(self) -> Path:
        """The advisory lock file of the run's one writer (:mod:`cdi_experiments.run.lock`)."""
        return self.root / LOCK_FILE

    @property
    def status(self) -> Path:
        """The run's state (:mod:`cdi_experiments.run.status`); ``finished`` only once every
        result file is written: the marker that a run is complete."""
        return self.root / STATUS_JSON


class DiskFullError(OSError):
    """No space left while writing a result file (``ENOSPC``, or ``EDQUOT``: a quota); one
    line, naming which.

    Attributes:
        path: The file that could not be written (it is left as it was).
        filesystem: The mount point of the filesystem that is full.
    """

    def __init__(self, path: Path, filesystem: Path, code: int = errno.ENOSPC) -> None:
        self.path = path
        self.filesystem = filesystem
        if code == errno.EDQUOT:
            what, fix = "your disk quota is used up", "free space or raise the quota"
        else:
            what, fix = "no space left", "free space"
        super().__init__(
            code,
            f"cannot write {path}: {what} on {filesystem} ({os.strerror(code)}); "
            f"{fix} on {filesystem} and rerun",
        )

    def __str__(self) -> str:
        return str(self.args[1])


def mount_point(path: str | os.PathLike) -> Path:
    """The mount point of the filesystem holding ``path`` (or its nearest existing parent)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    while not os.path.ismount(p) and p != p.parent:
        p = p.parent
    return p


def _is_full(exc: OSError) -> bool:
    return not isinstance(exc, DiskFullError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


TEMP_SUFFIX = ".tmp"  # atomic_write's temporary files: ``.<name>.<random>.tmp`` beside the target


def is_dcp_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a complete DCP checkpoint folder (its ``.metadata`` and
    ``meta.pt``), as ``trainer=fsdp2`` writes with ``save_distributed_checkpoint=true``."""
    path = Path(path)
    return path.is_dir() and (path / DCP_INDEX).is_file() and (path / DCP_META).is_file()


def remove_stale_temps(root: str | os.PathLike, exclude: tuple[str, ...] = ()) -> list[Path]:
    """Delete the temporary files a killed :func:`atomic_write` left under ``root``, except in
    its subfolders named in ``exclude`` (another program's, under a lock of their own).

    Call it only while holding the directory's lock (:mod:`cdi_experiments.run.lock`), in the
    lock's holder (rank 0): then no other writer can be mid-write. Returns the files removed.
    """
    root = Path(root)
    skip = {root / name for name in exclude}
    stale = [
        p
        for p in root.rglob(f".*{TEMP_SUFFIX}")
        if p.is_file() and not any(p.is_relative_to(d) for d in skip)
    ]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Run ``write(tmp)`` on a temporary file beside ``path``, then rename it over ``path``.

    Readers see the old file or the complete new one, never a partial write; on failure the
    temporary file is removed and ``path`` is untouched. The file gets the usual mode
    (``0666 & ~umask``), not mkstemp's 0600: results are meant to be shared.

    Raises:
        DiskFullError: The filesystem (or quota) is full: one line naming ``path`` and the
            filesystem to free; ``path`` is untouched and no temporary file is left.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    except OSError as exc:
        if _is_full(exc):
            raise DiskFullError(path, mount_point(path.parent), exc.errno) from None
        raise
    os.close(fd)
    try:
        write(Path(tmp))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError) and _is_full(exc):
            raise DiskFullError(path, mount_point(path.parent), exc.errno) from None
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """:func:`atomic_write` of a text."""
    atomic_write(path, lambda p: p.write_text(text))


class _RecordingWriter:
    """A binary file's ``write`` that keeps the first OSError it raised (torch.save wraps it)."""

    def __init__(self, f: io.BufferedWriter) -> None:
        self.f = f
        self.error: OSError | None = None

    def write(self, data: bytes) -> int:
        try:
            return self.f.write(data)
        except OSError as exc:
            self.error = self.error or exc
            raise

    def flush(self) -> None:
        self.f.flush()


def atomic_torch_save(path: str | os.PathLike, obj: object) -> None:
    """:func:`atomic_write` of ``torch.save(obj)``, durable: the file is fsynced before the
    rename and the directory after it, so the rename itself survives a power loss
    (checkpoints, exported models)."""
    import torch

    def write(tmp: Path) -> None:
        with tmp.open("wb") as f:
            sink = _RecordingWriter(f)
            try:
                torch.save(obj, sink)  # streamed: no in-memory copy of the checkpoint
            except RuntimeError:
                # torch reports a failed write as a bare RuntimeError ("unexpected pos ...");
                # the file's own OSError (ENOSPC...) is the one that names the problem
                if sink.error is not None:
                    raise sink.error from None
                raise
            f.flush()
            os.fsync(f.fileno())

    atomic_write(path, write)
    fd = os.open(Path(path).parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_csv(path: str | os.PathLike, df: pd.DataFrame) -> None:
    """:func:`atomic_write_text` for a DataFrame (no index column)."""
    atomic_write_text(path, df.to_csv(index=False))
