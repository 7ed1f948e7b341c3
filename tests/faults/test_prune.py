"""``cdi-prune`` on a finished run: the training run's results are never overwritten, the same
invocation twice is skip-if-done, and a checkpoint copied into another run's directory is
refused naming both configs."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from faults.common import changed, error_line, one_line_problems, short, snapshot, tail, tool

pytestmark = pytest.mark.faults

RUN_RESULTS = ("prune_results.csv", "pruned_sleeping.pt")


def test_prune_twice_keeps_training_results_and_skips(run_copy: Path, tmp_path: Path, case):
    case.expect(
        "cdi-prune twice",
        "run's prune_results.csv/pruned model untouched; own subdir; 2nd run skips (no writes)",
    )
    ckpt = run_copy / "checkpoints" / "last.ckpt"
    start = snapshot(run_copy, mtimes=True)
    first = tool("cdi-prune", [ckpt, "--sparsities", "0.5"], tmp_path)
    mid = snapshot(run_copy, mtimes=True)
    second = tool("cdi-prune", [ckpt, "--sparsities", "0.5"], tmp_path)
    end = snapshot(run_copy, mtimes=True)
    overwritten = [f for f in RUN_RESULTS if start.get(f) != mid.get(f)]
    new = [f for f in changed(start, mid) if f.endswith("(new)")]
    new_tables = [f for f in new if "/" in f and "prune_results.csv" in f]
    rewritten = changed(mid, end)
    case.observe(
        f"exits {first.returncode},{second.returncode}; overwritten {overwritten or 'none'}; "
        f"new table {new_tables[0] if new_tables else 'none'}; 2nd wrote {len(rewritten)} files"
    )
    assert first.returncode == 0, tail(first)
    assert overwritten == [], overwritten
    assert new_tables, f"no prune_results.csv in a subdirectory; new files: {new}"
    assert second.returncode == 0, tail(second)
    assert rewritten == [], rewritten


def test_prune_refuses_checkpoint_of_another_config(
    run_copy: Path, fashion_cnn_ckpt: Path, tmp_path: Path, case
):
    case.expect(
        "FashionMNIST-CNN ckpt in MNIST-MLP run",
        "exit!=0, one line naming both configs (fashion_mnist/cnn vs mnist/mlp), no writes",
    )
    ckpt = run_copy / "checkpoints" / "copied.ckpt"
    shutil.copy(fashion_cnn_ckpt, ckpt)
    before = snapshot(run_copy)
    proc = tool("cdi-prune", [ckpt], tmp_path)
    written = changed(before, snapshot(run_copy))
    line = error_line(proc)
    problems = one_line_problems(proc, ckpt.name)
    if "fashion" not in line.lower() or not re.search(
        r"(?<!fashion_)(?<!fashion)mnist", line.lower()
    ):
        problems.append("the line does not name both datasets")
    case.observe(f"exit {proc.returncode}, {short(line, 90)!r}, wrote {len(written)} files")
    assert problems == [], problems
    assert written == [], written
