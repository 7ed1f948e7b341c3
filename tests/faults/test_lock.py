"""Two ``cdi-train`` processes on one ``hydra.run.dir``: the second gets one line naming the
first one's PID, exit 2, and writes nothing; the first finishes complete."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from faults.common import (
    changed,
    differences,
    error_line,
    one_line_problems,
    popen_train,
    short,
    snapshot,
    status_of,
    train,
)

pytestmark = pytest.mark.faults

WAIT_S = 300  # for the first run to reach its hold point (a cap, not an assertion on time)


def test_second_writer_refused_first_finishes(ref_run: Path, tmp_path: Path, case):
    case.expect(
        "two writers, one run dir",
        "2nd: exit 2, one line with 1st's PID, writes nothing; 1st: complete, identical",
    )
    run, gate = tmp_path / "run", tmp_path / "gate"
    gate.mkdir()
    first = popen_train(
        run,
        CDI_FAULT="hold@mid_epoch",
        CDI_FAULT_DIR=str(gate),
        CDI_FAULT_ONCE=str(tmp_path / ".fired"),
    )
    try:
        deadline = time.monotonic() + WAIT_S
        while not (gate / "ready").exists() and first.poll() is None:
            assert time.monotonic() < deadline, "the first run never reached mid-epoch"
            time.sleep(0.05)
        assert first.poll() is None, (run.parent / "run.stderr").read_text()[-2000:]
        before = snapshot(run)
        second = train(run)
        after = snapshot(run)
    finally:
        (gate / "release").write_text("")
        rc_first = first.wait(timeout=WAIT_S)
    written = changed(before, after)
    problems = one_line_problems(second, str(first.pid))
    if second.returncode != 2:
        problems.append(f"exit {second.returncode}, not 2")
    diffs = differences(ref_run, run)
    case.observe(
        f"2nd: exit {second.returncode}, {short(error_line(second), 50)!r}, "
        f"wrote {len(written)} files; 1st: exit {rc_first}, {len(diffs)} files differ"
    )
    assert problems == [], problems
    assert written == [], written
    assert rc_first == 0, (run.parent / "run.stderr").read_text()[-2000:]
    assert diffs == [], diffs
    assert status_of(run) == "finished"
