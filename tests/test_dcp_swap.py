"""DCP checkpoint folders are swapped in whole: a save stopped at any filesystem step leaves the
old or the new checkpoint complete, and recovery puts it back as ``last.ckpt``.

Real (single-process) DCP folders, each holding distinct weights, so that "which checkpoint
survived" is read from the weights themselves. A kill is simulated by an exception raised at
the chosen step (nothing after it runs, as after SIGKILL); the fault tier
(``tests/faults/test_dcp_kill.py``) kills real two-process ``cdi-train`` runs.
"""

from __future__ import annotations

import fcntl
import logging
import os
import warnings
from pathlib import Path

import pytest
import pytorch_lightning.strategies.model_parallel as lightning_model_parallel
import torch
from pytorch_lightning.strategies import ModelParallelStrategy

import cdi_experiments.lightning.checkpoint_io as cio
from cdi_experiments.lightning.checkpoint_io import (
    AtomicCheckpointIO,
    AtomicModelParallelStrategy,
    commit_distributed_checkpoint,
    recover_checkpoint_dir,
    swap_paths,
)
from cdi_experiments.paths import RunPaths, is_dcp_folder
from cdi_experiments.run.checkpoint import (
    CheckpointError,
    check_checkpoint_path,
    load_distributed_checkpoint,
)
from cdi_experiments.run.lock import RunLockedError
from cdi_experiments.run.resume import recover_checkpoints


class Killed(BaseException):
    """Stands for SIGKILL: raised at a step, nothing after it runs (not an Exception, so no
    ``except Exception`` on the way catches it)."""


def checkpoint(epoch: int) -> dict:
    """A checkpoint dict whose weights and epoch say which save wrote it."""
    return {"state_dict": {"w": torch.full((4, 3), float(epoch))}, "epoch": epoch}


def write_dcp(folder: Path, epoch: int) -> None:
    """``checkpoint(epoch)`` as a DCP folder, as Lightning writes one (index, shards, meta.pt)."""
    import torch.distributed.checkpoint as dcp

    ckpt = checkpoint(epoch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "saving in a single process"
        dcp.save({"state_dict": ckpt.pop("state_dict")}, checkpoint_id=str(folder), no_dist=True)
    torch.save(ckpt, folder / "meta.pt")


def epoch_of(folder: Path) -> int:
    """Which save ``folder`` holds, read back safely, after checking it is whole: its weights
    and its meta.pt agree."""
    ckpt = load_distributed_checkpoint(folder, fix="FIX")
    weights = ckpt["state_dict"]["w"]
    assert torch.equal(weights, torch.full((4, 3), float(ckpt["epoch"]))), "mixed checkpoint"
    return ckpt["epoch"]


def names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


# ----------------------------------------------------------------------------- the strategy


def strategy() -> AtomicModelParallelStrategy:
    # One process, no process group: broadcast and barrier are no-ops, rank 0 does it all.
    return AtomicModelParallelStrategy(save_distributed_checkpoint=True)


def save(strat: ModelParallelStrategy, path: Path, epoch: int) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        strat.save_checkpoint(checkpoint(epoch), path)


def test_strategy_save_replaces_the_folder_whole(tmp_path: Path) -> None:
    last = tmp_path / "last.ckpt"
    for epoch in (0, 1, 2):
        save(strategy(), last, epoch)
        assert is_dcp_folder(last) and epoch_of(last) == epoch
        assert names(tmp_path) == ["last.ckpt"]  # no sibling left behind
        assert names(last) == [".metadata", "__0_0.distcp", "meta.pt"]


def _dies_after_writing_shards(monkeypatch: pytest.MonkeyPatch) -> None:
    """The next DCP save writes its shards and index, then dies (before Lightning's meta.pt)."""
    real = lightning_model_parallel._distributed_checkpoint_save

    def shards_then_kill(state, path):
        real(state, path)
        raise Killed

    monkeypatch.setattr(lightning_model_parallel, "_distributed_checkpoint_save", shards_then_kill)


def test_save_killed_while_writing_leaves_the_old_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    last = tmp_path / "last.ckpt"
    save(strategy(), last, 0)
    before = {p.name: p.read_bytes() for p in last.iterdir()}
    _dies_after_writing_shards(monkeypatch)
    with pytest.raises(Killed):
        save(strategy(), last, 1)
    assert {p.name: p.read_bytes() for p in last.iterdir()} == before  # untouched
    assert names(tmp_path) == [".last.ckpt.dcp-new", "last.ckpt"]
    assert recover_checkpoint_dir(tmp_path) == [f"{last}: removed .last.ckpt.dcp-new"]
    assert names(tmp_path) == ["last.ckpt"] and epoch_of(last) == 0


def test_lightnings_own_save_killed_while_writing_mixes_two_checkpoints(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What the swap prevents: Lightning's strategy rewrites the folder in place, so the same
    # kill leaves epoch 1's weights beside epoch 0's meta.pt, under the name a resume reads.
    last = tmp_path / "last.ckpt"
    save(ModelParallelStrategy(save_distributed_checkpoint=True), last, 0)
    _dies_after_writing_shards(monkeypatch)
    with pytest.raises(Killed):
        save(ModelParallelStrategy(save_distributed_checkpoint=True), last, 1)
    ckpt = load_distributed_checkpoint(last, fix="FIX")
    assert ckpt["epoch"] == 0 and torch.equal(ckpt["state_dict"]["w"], torch.ones(4, 3))


# ----------------------------------------------------------------------------- every step


def _steps(monkeypatch: pytest.MonkeyPatch, kill_at: int | None) -> list[tuple]:
    """Record commit's filesystem steps (renames, removals); kill at step ``kill_at``: a
    rename is not done, a removal deletes one file of its folder, then dies."""
    log: list[tuple] = []
    rename, remove = cio._rename, cio._remove

    def step(kind: str, *paths: Path) -> None:
        if len(log) == kill_at:
            target = paths[0]
            if kind == "remove" and target.is_dir():
                next(p for p in target.iterdir() if p.is_file()).unlink()  # half deleted
            raise Killed
        log.append((kind, *(p.name for p in paths)))

    def logged_rename(src: Path, dst: Path) -> None:
        step("rename", src, dst)
        rename(src, dst)

    def logged_remove(path: Path) -> None:
        step("remove", path)
        remove(path)

    monkeypatch.setattr(cio, "_rename", logged_rename)
    monkeypatch.setattr(cio, "_remove", logged_remove)
    return log


@pytest.mark.parametrize("previous", [True, False], ids=["replace", "first-save"])
def test_commit_killed_at_each_step_recovers_old_or_new(
    previous: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def prepare(directory: Path) -> Path:
        directory.mkdir()
        last = directory / "last.ckpt"
        if previous:
            write_dcp(last, 0)
        write_dcp(swap_paths(last).new, 1)  # every rank finished writing
        return last

    with monkeypatch.context() as m:  # the uninterrupted commit, to count its steps
        steps = _steps(m, kill_at=None)
        last = prepare(tmp_path / "whole")
        commit_distributed_checkpoint(last)
        assert epoch_of(last) == 1 and names(last.parent) == ["last.ckpt"]
    assert steps[0] == ("rename", ".last.ckpt.dcp-new", ".last.ckpt.dcp-ready")
    assert (("rename", "last.ckpt", ".last.ckpt.dcp-old") in steps) == previous

    for k in range(len(steps)):
        last = prepare(tmp_path / f"killed_at_{k}")
        with monkeypatch.context() as m:
            _steps(m, kill_at=k)
            with pytest.raises(Killed):
                commit_distributed_checkpoint(last)
        # The new checkpoint counts once it is marked complete (renamed ready), the old one
        # is kept until then; without an old one, nothing may be left to resume from.
        expected = 1 if k > 0 else 0 if previous else None
        recover_checkpoint_dir(last.parent)
        found = epoch_of(last) if last.exists() else None
        assert found == expected, f"killed at step {k} ({steps[k]}): found {found}"
        assert names(last.parent) == (["last.ckpt"] if expected is not None else [])


# leftovers of a kill (folder -> the epoch it holds) -> the epoch last.ckpt holds after recovery
SWAP_STATES = {
    "first save killed while writing": ({"new": 1}, None),
    "killed while writing": ({"last": 0, "new": 1}, 0),
    "killed after the write was complete": ({"last": 0, "ready": 1}, 1),
    "killed between the renames": ({"old": 0, "ready": 1}, 1),
    "old one aside, no new one": ({"old": 0}, 0),
    "killed deleting the old one": ({"last": 1, "old": 0}, 1),
    "killed deleting an older folder": ({"last": 1, "trash": 0}, 1),
}


@pytest.mark.parametrize("state", list(SWAP_STATES))
def test_recovery_of_each_leftover_state(state: str, tmp_path: Path) -> None:
    last = tmp_path / "last.ckpt"
    folders, expected = SWAP_STATES[state]
    for name, epoch in folders.items():
        write_dcp(last if name == "last" else getattr(swap_paths(last), name), epoch)
    if "trash" in folders:
        (swap_paths(last).trash / "meta.pt").unlink()  # half deleted
    recover_checkpoint_dir(tmp_path)
    assert (epoch_of(last) if last.exists() else None) == expected
    assert names(tmp_path) == (["last.ckpt"] if expected is not None else [])


def test_recovery_leaves_other_files_alone(tmp_path: Path) -> None:
    write_dcp(tmp_path / "last.ckpt", 0)
    (tmp_path / ".last.ckpt.x1y2.tmp").write_bytes(b"an atomic write's temp file")
    (tmp_path / "epoch=0.ckpt").write_bytes(b"a file checkpoint")
    assert recover_checkpoint_dir(tmp_path) == []
    assert names(tmp_path) == [".last.ckpt.x1y2.tmp", "epoch=0.ckpt", "last.ckpt"]


# ----------------------------------------------------------------------------- removal


def test_removing_an_older_folder_goes_through_a_hidden_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_dcp(tmp_path / "epoch=0.ckpt", 0)
    write_dcp(tmp_path / "epoch=1.ckpt", 1)
    with monkeypatch.context() as m:
        steps = _steps(m, kill_at=None)
        AtomicCheckpointIO().remove_checkpoint(tmp_path / "epoch=0.ckpt")
    assert ("rename", "epoch=0.ckpt", ".epoch=0.ckpt.dcp-trash") in steps
    assert names(tmp_path) == ["epoch=1.ckpt"]
    # killed while deleting: the half-deleted folder is hidden, and recovery removes it
    write_dcp(tmp_path / "epoch=2.ckpt", 2)
    with monkeypatch.context() as m:
        _steps(m, kill_at=2)  # remove(trash): nothing; rename to trash; remove(trash): killed
        with pytest.raises(Killed):
            AtomicCheckpointIO().remove_checkpoint(tmp_path / "epoch=1.ckpt")
    assert names(tmp_path) == [".epoch=1.ckpt.dcp-trash", "epoch=2.ckpt"]
    recover_checkpoint_dir(tmp_path)
    assert names(tmp_path) == ["epoch=2.ckpt"] and epoch_of(tmp_path / "epoch=2.ckpt") == 2


def test_the_only_complete_checkpoint_is_not_removed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write_dcp(tmp_path / "epoch=0.ckpt", 0)
    (tmp_path / ".last.ckpt.dcp-new").mkdir()  # an unfinished save is no checkpoint
    with caplog.at_level(logging.WARNING, logger=cio.__name__):
        AtomicCheckpointIO().remove_checkpoint(tmp_path / "epoch=0.ckpt")
    assert epoch_of(tmp_path / "epoch=0.ckpt") == 0
    assert [r.getMessage() for r in caplog.records if r.name == cio.__name__] == [
        f"kept epoch=0.ckpt: it is the only complete checkpoint in {tmp_path}"
    ]
    (tmp_path / "last.ckpt").write_bytes(b"a file checkpoint")  # now there is another
    AtomicCheckpointIO().remove_checkpoint(tmp_path / "epoch=0.ckpt")
    assert names(tmp_path) == [".last.ckpt.dcp-new", "last.ckpt"]


# ----------------------------------------------------------------------------- run directory


def _killed_between_renames(run: Path) -> Path:
    """A run directory as a kill between the swap's two renames leaves it."""
    last = RunPaths(run).last_ckpt
    last.parent.mkdir(parents=True)
    write_dcp(swap_paths(last).old, 0)
    write_dcp(swap_paths(last).ready, 1)
    return last


def test_resume_recovers_the_swap_first(tmp_path: Path) -> None:
    last = _killed_between_renames(tmp_path / "run")
    with pytest.raises(CheckpointError) as exc:  # cdi-prune, meanwhile: one line, the fix
        check_checkpoint_path(last)
    assert str(exc.value) == (
        f"checkpoint {last} is missing: a kill interrupted its save (its complete copy is a "
        "hidden .last.ckpt.dcp-* folder beside it); rerun the run's cdi-train command to "
        "restore it, then pass it again"
    )
    done = recover_checkpoints(RunPaths(tmp_path / "run"))
    assert done == [f"{last}: committed .last.ckpt.dcp-ready"]
    assert names(last.parent) == ["last.ckpt"] and epoch_of(last) == 1
    assert recover_checkpoints(RunPaths(tmp_path / "run")) == []


def test_resume_does_not_recover_a_run_another_process_writes(tmp_path: Path) -> None:
    last = _killed_between_renames(tmp_path / "run")
    lock = RunPaths(tmp_path / "run").lock
    fd = os.open(lock, os.O_RDWR | os.O_CREAT)  # another writer holds the run (its own flock)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(RunLockedError, match=r"is in use by"):
            recover_checkpoints(RunPaths(tmp_path / "run"))
    finally:
        os.close(fd)
    assert names(last.parent) == [".last.ckpt.dcp-old", ".last.ckpt.dcp-ready"]  # untouched
