"""SIGKILL of a whole two-process ``trainer=fsdp2`` run (both ranks at once, as when a node is
lost) at each step of a distributed-checkpoint (DCP) save, then the same command again: the
rerun recovers the checkpoint, resumes, and ends with every result file equal to an
uninterrupted run's; the checkpoint's model and optimizer tensors are equal too.

The kill comes from :class:`KillInDcpSave`, loaded into the rank processes as a callback
(``tests/`` on ``PYTHONPATH``); ``CDI_FAULT_DCP=<step>@<save>`` names the step and which save
(1: the first epoch's, written where there was none; 2: the second's, replacing it). Each run
starts in a session of its own, so that rank 0 can kill its whole process group.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest
import pytorch_lightning.strategies.model_parallel as lightning_model_parallel
from pytorch_lightning.callbacks import Callback

import cdi_experiments.lightning.checkpoint_io as cio
from cdi_experiments.run.checkpoint import _dcp_tensors, _read_index
from faults.common import TINY, compare_runs, differences, status_of, tail, tool

pytestmark = pytest.mark.faults

FSDP2_DCP = [
    "trainer=fsdp2",
    "trainer.devices=2",
    "trainer.strategy.save_distributed_checkpoint=true",
    "+callbacks.dcp_kill._target_=faults.test_dcp_kill.KillInDcpSave",
]
# step@save -> the checkpoint directory the kill leaves (before the rerun recovers it)
MOMENTS = {
    # every rank's shards and the index written, Lightning's meta.pt not yet
    "written@2": [".last.ckpt.dcp-new", "last.ckpt"],
    # the first save complete (renamed ready), not yet renamed last.ckpt
    "ready@1": [".last.ckpt.dcp-ready"],
    # between the two renames: the old one aside, the new one not yet in place
    "aside@2": [".last.ckpt.dcp-old", ".last.ckpt.dcp-ready"],
    # the new one in place, the old one half deleted
    "deleting@2": [".last.ckpt.dcp-old", "last.ckpt"],
}


# Where the rerun recovers the second epoch's checkpoint and resumes past the last epoch, the
# CSV logger drops that epoch's train row (a bug of csv_logger._KeepingWriter, not of the
# checkpoint: it also hits a file checkpoint killed between its save and the row's logging).
class KillInDcpSave(Callback):
    """Test-only, inside the rank processes: at ``$CDI_FAULT_DCP`` (``<step>@<save>``) rank 0
    SIGKILLs its process group, once (``$CDI_FAULT_ONCE`` is created first). Steps:
    ``written`` (after torch's DCP save of the shards, in Lightning's save), ``ready`` and
    ``aside`` (after the rename to ``.dcp-ready`` / ``.dcp-old``), ``deleting`` (one file of
    ``.dcp-old`` deleted). Holds no state for checkpoints."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        spec = os.environ.get("CDI_FAULT_DCP")
        if not spec or stage != "fit" or trainer.global_rank != 0:
            return
        step, _, save = spec.partition("@")
        self.step, self.save, self.saves = step, int(save), 0
        dcp_save, rename, remove = (
            lightning_model_parallel._distributed_checkpoint_save,
            cio._rename,
            cio._remove,
        )

        def counted_dcp_save(state, path):
            self.saves += 1
            dcp_save(state, path)
            self._maybe("written")

        def watched_rename(src: Path, dst: Path) -> None:
            rename(src, dst)
            self._maybe({"ready": "ready", "old": "aside"}.get(dst.name.rpartition(".dcp-")[2]))

        def watched_remove(path: Path) -> None:
            if path.name.endswith(".dcp-old") and path.is_dir():
                next(p for p in path.iterdir() if p.is_file()).unlink()
                self._maybe("deleting")
            remove(path)

        lightning_model_parallel._distributed_checkpoint_save = counted_dcp_save
        cio._rename, cio._remove = watched_rename, watched_remove

    def _maybe(self, step: str | None) -> None:
        once = Path(os.environ["CDI_FAULT_ONCE"])
        if step != self.step or self.saves != self.save or once.exists():
            return
        once.write_text(f"{self.step}@{self.save} pid {os.getpid()}\n")
        if os.getpgrp() == os.getpid():  # the session leader: the group is this run's ranks
            os.killpg(os.getpgrp(), signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)


def train(run: Path, fault: str | None = None) -> subprocess.CompletedProcess[str]:
    """``cdi-train TINY FSDP2_DCP hydra.run.dir=run`` in a session of its own."""
    extra = {"CDI_FAULT_DCP": fault, "CDI_FAULT_ONCE": str(run.parent / "fired")} if fault else {}
    args = [*TINY, *FSDP2_DCP, f"hydra.run.dir={run}"]
    return tool("cdi-train", args, run.parent, extra, new_session=True)


def checkpoint_tensors(folder: Path) -> dict:
    """Every tensor of a DCP checkpoint folder: the model's and the optimizer's (from the
    shards, read safely) and those in Lightning's meta.pt (RNG states, loop counters)."""
    import torch

    meta = compare_runs._tensors(torch.load(folder / "meta.pt", weights_only=True))
    index = _read_index(folder, fix="")
    return {
        **{f"meta/{k}": v for k, v in meta.items()},
        **dict(_dcp_tensors(folder, index, "", "")),
    }


def tensor_differences(a: Path, b: Path) -> list[str]:
    ta, tb = checkpoint_tensors(a), checkpoint_tensors(b)
    if set(ta) != set(tb):
        return [f"keys differ: {sorted(set(ta) ^ set(tb))[:4]}"]
    return [k for k in sorted(ta) if ta[k].dtype != tb[k].dtype or not ta[k].equal(tb[k])]


@pytest.fixture(scope="module")
def dcp_ref(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted run every resumed one must equal."""
    run = tmp_path_factory.mktemp("dcp_reference") / "run"
    proc = train(run)
    assert proc.returncode == 0, tail(proc)
    return run


@pytest.mark.parametrize("moment", list(MOMENTS))
def test_sigkill_in_dcp_save_then_rerun_equals_uninterrupted(
    moment: str, dcp_ref: Path, tmp_path: Path, case
) -> None:
    case.expect(
        f"SIGKILL both fsdp2 ranks in a DCP save ({moment})",
        "rerun recovers last.ckpt, resumes, exit 0, finished; files and checkpoint tensors equal",
    )
    run = tmp_path / "run"
    killed = train(run, fault=moment)
    assert killed.returncode == -signal.SIGKILL, f"the fault did not fire: {tail(killed)}"
    checkpoints = run / "checkpoints"
    left = sorted(p.name for p in checkpoints.iterdir())
    assert left == MOMENTS[moment], f"killed at {moment}, checkpoints/ holds {left}"

    rerun = train(run)
    last = checkpoints / "last.ckpt"
    diffs = [
        d
        for d in differences(dcp_ref, run)
        if not d.startswith("checkpoints/last.ckpt/") and not d.split(":")[0].endswith(".log")
    ]
    tensors = tensor_differences(dcp_ref / "checkpoints" / "last.ckpt", last)
    case.observe(
        f"left {left}; rerun exit {rerun.returncode}, status {status_of(run)}, "
        f"{len(diffs)} files and {len(tensors)} checkpoint tensors differ"
    )
    assert rerun.returncode == 0, tail(rerun)
    assert "resuming from" in (run / "train.log").read_text()  # from a checkpoint, not anew
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last.ckpt"]
    assert tensors == [], tensors
    assert status_of(run) == "finished"
    assert diffs == [], diffs
