"""Checkpoints written crash-safely: files atomically, DCP folders by a swap.

**Files** (:class:`AtomicCheckpointIO`). Lightning's
:class:`~lightning_fabric.plugins.io.torch_io.TorchCheckpointIO` writes through an fsspec
transaction, which stages the file in ``$TMPDIR`` and then moves it into place. When
``$TMPDIR`` and the run directory are on different filesystems (a node-local ``/tmp`` and a
shared run directory, the usual cluster layout), that move is a copy over the old
``last.ckpt``: a kill or a full disk during the copy leaves a truncated checkpoint and nothing
to resume from. Here the file is written beside its target, fsynced, renamed over it (atomic
within one filesystem), and the directory is fsynced: readers and resumes see the previous
checkpoint or the complete new one, never a partial file. A write that fails removes its
temporary file; a killed one leaves a hidden ``.last.ckpt.*`` that nothing reads. Loading is
Lightning's, ``weights_only`` as the caller asks. Paths with a URL scheme (``s3://`` ...) are
left to Lightning.

**DCP folders** (:class:`AtomicModelParallelStrategy`, ``trainer=fsdp2``). Under Lightning's
``ModelParallelStrategy`` the full state dict that rank 0 gathers
(``save_distributed_checkpoint=false``) is saved through :class:`AtomicCheckpointIO` too. A
``torch.distributed.checkpoint`` folder (``true``: every rank writes its own shards, with no
CheckpointIO) Lightning rewrites in place, so a kill during the save leaves old and new shards
mixed. :class:`AtomicModelParallelStrategy` writes it into a sibling folder instead and swaps
it in; for ``checkpoints/last.ckpt``:

1. every rank writes ``.last.ckpt.dcp-new/`` (shards, ``.metadata``, rank 0's ``meta.pt``);
2. after a barrier rank 0 renames it ``.last.ckpt.dcp-ready/``: complete, by its name;
3. rank 0 renames ``last.ckpt/`` (if any) to ``.last.ckpt.dcp-old/``,
4. then ``.last.ckpt.dcp-ready/`` to ``last.ckpt/``,
5. and deletes ``.last.ckpt.dcp-old/``; the other ranks wait at a barrier.

A kill at any step leaves the old or the new checkpoint complete under one of these names, and
:func:`recover_distributed_checkpoint` (run before the next save of that name, and by
``cdi-train`` before a resume) restores ``last.ckpt``: a ``dcp-ready`` folder is committed (the
swap is finished), a lone ``dcp-old`` is put back, and a ``dcp-new`` folder (unfinished) or
``dcp-trash`` folder (being deleted) is removed. Every rename is atomic within the
filesystem; the directory is fsynced after the swap. ModelCheckpoint's removal of an older
folder renames it to ``.<name>.dcp-trash`` first (no half-deleted folder under a checkpoint's
name) and keeps it if it is the directory's only complete checkpoint.

All of this assumes one filesystem per checkpoint directory (POSIX ``rename``) and one writer
per run directory (``cdi-train`` holds the run lock).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any, NamedTuple

from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning.strategies import ModelParallelStrategy

from cdi_experiments.paths import DCP_META, atomic_torch_save, is_dcp_folder

log = logging.getLogger(__name__)

STEPS = ("new", "ready", "old", "trash")  # the hidden sibling folders of a swap, in order
_SIBLING = re.compile(rf"^\.(?P<name>.+)\.dcp-(?:{'|'.join(STEPS)})$")


class SwapPaths(NamedTuple):
    """The hidden siblings of DCP checkpoint folder ``<dir>/<name>`` during its swap."""

    new: Path  # being written by every rank: incomplete until renamed ``ready``
    ready: Path  # written by every rank: complete
    old: Path  # the previous ``<name>``, moved aside
    trash: Path  # a folder being deleted


def swap_paths(path: str | os.PathLike) -> SwapPaths:
    """The sibling folders a swap of ``path`` uses.

    >>> swap_paths("run/checkpoints/last.ckpt").ready.as_posix()
    'run/checkpoints/.last.ckpt.dcp-ready'
    """
    path = Path(path)
    return SwapPaths(*(path.with_name(f".{path.name}.dcp-{step}") for step in STEPS))


# The filesystem steps, one function each (the fault tests stop a run between them).
def _rename(src: Path, dst: Path) -> None:
    os.rename(src, dst)  # fails if dst is a non-empty folder: nothing is overwritten


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit_distributed_checkpoint(path: str | os.PathLike) -> None:
    """Swap the complete folder ``.<name>.dcp-new`` in as ``path`` (steps 2-5 of the module
    doc). Call it in one process, after every rank finished writing ``new``.

    Raises:
        FileNotFoundError: There is no ``.<name>.dcp-new`` folder beside ``path``.
    """
    path = Path(path)
    swap = swap_paths(path)
    meta = swap.new / DCP_META
    if meta.is_file():  # DCP fsyncs its own files; Lightning's meta.pt is a plain torch.save
        with open(meta, "rb") as f:
            os.fsync(f.fileno())
    _fsync_dir(swap.new)  # its entries, before it is marked complete
    _rename(swap.new, swap.ready)
    _finish_swap(path, swap)


def _finish_swap(path: Path, swap: SwapPaths) -> None:
    """Steps 3-5: ``ready`` becomes ``path``; the previous ``path`` is deleted."""
    if path.exists() or path.is_symlink():
        _remove(swap.old)  # a leftover from an earlier swap (then ``path`` is newer)
        _rename(path, swap.old)
    _rename(swap.ready, path)
    _fsync_dir(path.parent)
    _remove(swap.old)


def recover_distributed_checkpoint(path: str | os.PathLike) -> str | None:
    """Put ``path`` back in order after a swap that a killed process left half done.

    A ``dcp-ready`` folder is complete: its swap is finished (it becomes ``path``). Without
    one, a ``dcp-old`` folder is the last complete checkpoint if ``path`` is missing (it is
    put back), a leftover otherwise. ``dcp-new`` (never finished) and ``dcp-trash`` (being
    deleted) folders are removed. Call it while no process is saving ``path``.

    Returns:
        What was done, in a few words (for the log), or ``None`` if there was nothing to do.
    """
    path = Path(path)
    swap = swap_paths(path)
    done = []
    if swap.ready.is_dir():
        _finish_swap(path, swap)
        done.append(f"committed {swap.ready.name}")
    elif swap.old.is_dir() and not (path.exists() or path.is_symlink()):
        _rename(swap.old, path)
        _fsync_dir(path.parent)
        done.append(f"restored {swap.old.name}")
    for leftover in (swap.old, swap.new, swap.trash):
        if leftover.exists() or leftover.is_symlink():
            _remove(leftover)
            done.append(f"removed {leftover.name}")
    return f"{path}: {', '.join(done)}" if done else None


def recover_checkpoint_dir(directory: str | os.PathLike) -> list[str]:
    """:func:`recover_distributed_checkpoint` for every checkpoint of ``directory`` whose
    swap was left half done (found by its hidden ``.<name>.dcp-*`` siblings).

    Returns:
        What was done, one entry per checkpoint (empty: nothing to do).
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    names = sorted({m["name"] for p in directory.iterdir() if (m := _SIBLING.match(p.name))})
    return [r for n in names if (r := recover_distributed_checkpoint(directory / n))]


def remove_distributed_checkpoint(path: str | os.PathLike) -> bool:
    """Delete DCP folder ``path``: renamed to ``.<name>.dcp-trash`` first (atomic), so a kill
    during the deletion leaves no half-deleted folder under a checkpoint's name. The
    directory's only complete checkpoint is kept (a warning says so).

    Returns:
        Whether it was deleted.
    """
    path = Path(path)
    others = [
        p
        for p in path.parent.iterdir()
        if p != path
        and not p.name.startswith(".")
        and ((p.is_file() and p.suffix == ".ckpt") or is_dcp_folder(p))
    ]
    if is_dcp_folder(path) and not others:
        log.warning("kept %s: it is the only complete checkpoint in %s", path.name, path.parent)
        return False
    trash = swap_paths(path).trash
    _remove(trash)
    _rename(path, trash)
    _remove(trash)
    return True


class AtomicCheckpointIO(TorchCheckpointIO):
    """:class:`TorchCheckpointIO` whose local saves are atomic on any filesystem and whose
    removal of a DCP folder is crash-safe (see the module doc). Pass it to the Trainer:
    ``Trainer(plugins=[AtomicCheckpointIO()])``."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None or "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        atomic_torch_save(path, checkpoint)

    def remove_checkpoint(self, path: Any) -> None:
        if "://" not in str(path) and Path(path).is_dir():
            remove_distributed_checkpoint(path)
            return
        super().remove_checkpoint(path)


class AtomicModelParallelStrategy(ModelParallelStrategy):
    """Lightning's ``ModelParallelStrategy`` (same arguments) whose DCP checkpoint folders
    (``save_distributed_checkpoint=True``) are written into a sibling folder and swapped in
    (see the module doc): a kill at any moment leaves the old or the new checkpoint complete.
    Full-state checkpoints (``False``) are Lightning's, saved through the CheckpointIO."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None
    ) -> None:
        # ``_save_distributed_checkpoint``: Lightning's (private) copy of the argument.
        distributed = getattr(self, "_save_distributed_checkpoint", False)
        if storage_options is not None or not distributed or "://" in str(filepath):
            super().save_checkpoint(checkpoint, filepath, storage_options)
            return
        path = Path(self.broadcast(filepath))
        if self.global_rank == 0:
            done = recover_distributed_checkpoint(path)  # a killed earlier save's leftovers
            if done:
                log.info("recovered %s", done)
        self.barrier("dcp_save_start")
        super().save_checkpoint(checkpoint, swap_paths(path).new)  # every rank, its shards
        self.barrier("dcp_save_written")
        if self.global_rank == 0:
            commit_distributed_checkpoint(path)
        self.barrier("dcp_save_swapped")


__all__ = [
    "AtomicCheckpointIO",
    "AtomicModelParallelStrategy",
    "SwapPaths",
    "commit_distributed_checkpoint",
    "is_dcp_folder",
    "recover_checkpoint_dir",
    "recover_distributed_checkpoint",
    "remove_distributed_checkpoint",
    "swap_paths",
]
