"""SIGTERM (how SLURM preempts) and SIGINT (Ctrl-C) mid-epoch: a non-zero exit, a resumable
checkpoint, status ``interrupted``; the same command again finishes identical to an
uninterrupted run."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import torch

from faults.common import differences, short, status_of, tail, train

pytestmark = pytest.mark.faults

# 128 + the signal's number: the shell's convention, and what submitit/SLURM requeue reads as
# "ended by that signal" without the process dying of it (a checkpoint was written first).
SIGNALS = {"term": signal.SIGTERM, "int": signal.SIGINT}


@pytest.mark.parametrize(
    ("action", "moment"), [("term", "mid_epoch"), ("int", "mid_epoch"), ("term", "prune")]
)
def test_signal_interrupts_then_resumes(action, moment, ref_run: Path, tmp_path: Path, case):
    """Mid-epoch, and in the prune stage (outside Lightning's loops, where its own SIGTERM
    handling does not reach)."""
    sig = SIGNALS[action]
    case.expect(
        f"{sig.name} {moment.replace('_', '-')}",
        f"exit {128 + sig}, last.ckpt loadable, status interrupted; rerun identical",
    )
    run = tmp_path / "run"
    stopped = train(run, fault=f"{action}@{moment}")
    ckpt = run / "checkpoints" / "last.ckpt"
    loadable = ckpt.is_file() and bool(torch.load(ckpt, map_location="cpu", weights_only=True))
    state = status_of(run)
    rerun = train(run)
    diffs = differences(ref_run, run)
    case.observe(
        f"exit {stopped.returncode}, ckpt {'ok' if loadable else 'missing'}, status {state}; "
        f"rerun exit {rerun.returncode}, {len(diffs)} files differ"
        + (f" ({short('; '.join(diffs), 60)})" if diffs else "")
    )
    assert (tmp_path / ".run.fired").exists(), f"the {sig.name} was never sent: {tail(stopped)}"
    assert stopped.returncode == 128 + sig, tail(stopped)
    assert "Traceback" not in stopped.stderr, tail(stopped)
    assert loadable
    assert state == "interrupted"
    assert rerun.returncode == 0, tail(rerun)
    assert diffs == []
    assert status_of(run) == "finished"
