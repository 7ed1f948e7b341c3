"""SIGKILL at five moments, then the same command again: the resumed run equals an
uninterrupted one in every result file (CSVs, figures, checkpoint tensors, pruned model)."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from faults.common import differences, short, status_of, tail, train

pytestmark = pytest.mark.faults

MOMENTS = ["mid_epoch", "after_checkpoint", "test", "prune", "figures"]


@pytest.mark.parametrize("moment", MOMENTS)
def test_sigkill_then_rerun_equals_uninterrupted(moment, ref_run: Path, tmp_path: Path, case):
    case.expect(
        f"SIGKILL {moment}",
        "killed run not marked finished; rerun exit 0, finished, every result file identical",
    )
    run = tmp_path / "run"
    killed = train(run, fault=f"kill@{moment}")
    assert killed.returncode == -signal.SIGKILL, f"the fault did not fire: {tail(killed)}"
    after_kill = status_of(run)

    rerun = train(run)
    diffs = differences(ref_run, run)
    case.observe(
        f"after kill: status {after_kill}; rerun: exit {rerun.returncode}, "
        f"status {status_of(run)}, {len(diffs)} files differ"
        + (f" ({short('; '.join(diffs), 80)})" if diffs else "")
    )
    assert rerun.returncode == 0, tail(rerun)
    assert diffs == [], diffs
    assert after_kill is not None, "a killed run has no status file"
    assert after_kill != "finished", f"killed at {moment}, the run says {after_kill}"
    assert status_of(run) == "finished"
