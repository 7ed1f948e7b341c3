"""A full disk while a run writes its metrics or its figures (a small tmpfs as the run
directory, filled at that moment): one line naming the file and the fix, a non-zero exit, the
run not marked finished, nothing half-written; after space is freed the same command completes,
identical to an uninterrupted run."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from faults.common import (
    differences,
    error_line,
    half_written,
    one_line_problems,
    short,
    status_of,
    tail,
    train,
)

pytestmark = pytest.mark.faults

# Where the disk fills: mid-epoch 1 (the epoch's metrics rows and checkpoint come next), or as
# the second figure is about to be saved.
STATUS_FILE = "status.json"
MOMENTS = {"metrics": "mid_epoch", "figures": "figures"}


@pytest.mark.parametrize("what", list(MOMENTS))
def test_disk_full_one_line_then_rerun_completes(
    what, ref_run: Path, tmp_path: Path, tmpfs_or_none, case
):
    case.expect(
        f"disk full ({what})",
        "one line naming the file + fix, exit!=0, not finished, nothing half-written; "
        "rerun after freeing: identical",
    )
    disk = tmpfs_or_none("64m")
    if disk is None:  # no tmpfs here: writes under the run directory raise ENOSPC instead
        run = tmp_path / "run"
        full = train(run, fault=f"enospc@{MOMENTS[what]}", once=tmp_path / ".fired")
    else:
        run = disk / "run"
        full = train(
            run,
            fault=f"fill@{MOMENTS[what]}",
            once=tmp_path / ".fired",
            CDI_FAULT_DIR=str(disk),
        )
    assert (tmp_path / ".fired").exists(), f"the disk was never filled: {tail(full)}"
    line = error_line(full)
    problems = one_line_problems(full)
    named = re.findall(re.escape(str(run)) + r"/[^\s:;,'\"]+", line)
    if not named:
        problems.append("the line names no file in the run directory")
    elif all(n.endswith(STATUS_FILE) for n in named):
        # status.json is the failure record; naming it hides the result file that failed
        problems.append("names only status.json, not the result file that failed")
    elif what == "figures" and not any(n.endswith(".png") for n in named):
        problems.append("the disk filled before a figure, but the line names no figure")
    if "space" not in line.lower():
        problems.append("the line does not say the disk is full")
    if "free" not in line.lower():
        problems.append("the line gives no fix (free space)")
    state = status_of(run)
    if state is None or state == "finished":
        problems.append(f"status {state} after the failure")
    partial = half_written(run)
    logging_noise = "--- Logging error ---" in full.stderr

    if disk is not None:
        (disk / "ballast").unlink()
    rerun = train(run)
    diffs = differences(ref_run, run)
    case.observe(
        ("(ENOSPC stand-in, no tmpfs) " if disk is None else "")
        + f"exit {full.returncode}, {short(line, 70)!r}, status {state}, "
        f"{len(partial)} half-written{' (logging-error tracebacks too)' if logging_noise else ''}; "
        f"rerun exit {rerun.returncode}, {len(diffs)} files differ"
    )
    assert problems == [], problems
    assert partial == [], partial
    assert rerun.returncode == 0, tail(rerun)
    assert diffs == [], diffs
    assert status_of(run) == "finished"
