"""Sweeps (``cdi-train -m``): a job whose loss turns non-finite fails alone, recorded with its
reason, and the sweep exits non-zero naming it; a relaunched sweep skips finished jobs, resumes
the interrupted one and ends identical to an uninterrupted sweep."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from faults.common import (
    TINY,
    changed,
    differences,
    short,
    snapshot,
    status_of,
    status_record,
    tail,
    tool,
)

pytestmark = pytest.mark.faults

SEEDS = "seed=0,1"


def sweep(sweep_dir: Path, *args: str, **fenv: str):
    return tool(
        "cdi-train", ["-m", *TINY, *args, f"hydra.sweep.dir={sweep_dir}"], sweep_dir.parent, fenv
    )


def jobs(sweep_dir: Path) -> dict[str, Path]:
    return {p.name: p for p in sorted(sweep_dir.iterdir()) if p.is_dir() and p.name != ".hydra"}


def results(job: Path) -> dict[str, tuple]:
    """A job's result files with their mtimes (Hydra's launch record left out)."""
    return {
        k: v
        for k, v in snapshot(job, mtimes=True).items()
        if not k.startswith(".hydra/") and k != "train.log"
    }


@pytest.fixture(scope="session")
def ref_sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted two-job sweep."""
    out = tmp_path_factory.mktemp("ref_sweep") / "sweep"
    proc = sweep(out, SEEDS)
    assert proc.returncode == 0, tail(proc)
    return out


def test_nan_job_fails_alone_and_sweep_says_so(tmp_path: Path, case):
    case.expect(
        "NaN loss in a -m sweep",
        "that job failed with its reason, the other finished, sweep exit!=0 naming it",
    )
    out = tmp_path / "sweep"
    proc = sweep(out, "optimizer.lr=1e12,0.001")
    # Hydra may render the value as 1e12 or 1000000000000.0 in the job's directory name
    by_lr = {("0.001" if "lr=0.001" in name else "1e12"): job for name, job in jobs(out).items()}
    bad, good = by_lr.get("1e12"), by_lr.get("0.001")
    bad_state = status_of(bad) if bad else None
    reason = json.dumps(status_record(bad)).lower() if bad else ""
    good_state = status_of(good) if good else None
    says_failed = "fail" in proc.stderr.lower()
    listed = [ln for ln in proc.stderr.splitlines() if bad is not None and bad.name in ln]
    listed = listed if says_failed else []
    case.observe(
        f"sweep exit {proc.returncode}; NaN job: status {bad_state}"
        f"{' (reason names nan)' if 'nan' in reason or 'finite' in reason else ''}; "
        f"other job: status {good_state}; listed: {short(listed[-1], 50) if listed else 'no'}"
    )
    assert bad is not None and good is not None, tail(proc)
    assert proc.returncode not in (0, -signal.SIGKILL), tail(proc)
    assert bad_state == "failed"
    assert "nan" in reason or "finite" in reason, reason
    assert good_state == "finished"
    assert (good / "prune_results.csv").is_file()
    assert listed, "the sweep's stderr does not list the failed job"


def test_sweep_relaunch_skips_finished_resumes_interrupted(ref_sweep: Path, tmp_path: Path, case):
    case.expect(
        "sweep relaunch",
        "finished job skipped (untouched), killed job resumed; all identical to uninterrupted",
    )
    out = tmp_path / "sweep"
    killed = sweep(
        out,
        SEEDS,
        CDI_FAULT="kill@mid_epoch",
        CDI_FAULT_WHERE="seed=1",
        CDI_FAULT_ONCE=str(tmp_path / ".fired"),
    )
    assert killed.returncode == -signal.SIGKILL, f"the fault did not fire: {tail(killed)}"
    names = sorted(jobs(out))
    assert len(names) == 2, names
    first_before = results(out / names[0])

    again = sweep(out, SEEDS)
    touched = changed(first_before, results(out / names[0]))
    diffs = {n: differences(ref_sweep / n, out / n) for n in sorted(jobs(ref_sweep))}
    states = {n: status_of(out / n) for n in names}
    n_diff = sum(len(d) for d in diffs.values())
    case.observe(
        f"relaunch exit {again.returncode}; finished job: {len(touched)} files rewritten; "
        f"states {list(states.values())}; {n_diff} files differ"
        + (f" ({short('; '.join(sum(diffs.values(), [])), 60)})" if n_diff else "")
    )
    assert again.returncode == 0, tail(again)
    assert touched == [], touched
    assert all(d == [] for d in diffs.values()), diffs
    assert set(states.values()) == {"finished"}, states
