"""Resuming a run directory with another config is refused with a one-line fix, and the run
directory's results are left as they were."""

from __future__ import annotations

from pathlib import Path

import pytest

from faults.common import changed, error_line, one_line_problems, short, snapshot, train

pytestmark = pytest.mark.faults


def test_changed_config_on_resume_refused(run_copy: Path, case):
    case.expect(
        "resume with changed seed",
        "exit 2, one line naming seed and the fix (new run dir), results untouched",
    )
    before = snapshot(run_copy)
    proc = train(run_copy, "seed=1")
    written = [
        f for f in changed(before, snapshot(run_copy)) if not f.startswith((".hydra/", "train.log"))
    ]
    line = error_line(proc)
    problems = one_line_problems(proc, "seed")
    if proc.returncode != 2:
        problems.append(f"exit {proc.returncode}, not 2")
    if "run directory" not in line and "run dir" not in line:
        problems.append("no fix (a new run directory) in the line")
    case.observe(f"exit {proc.returncode}, {short(line, 90)!r}")
    assert problems == [], problems
    assert written == [], written
