"""``scripts/reproduce.sh --quick`` end to end: every experiment runs, the paper's tables,
figures and RESULTS.md come out, their numbers agree with the runs' own files, and a relaunch
trains nothing again."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from cdi_experiments.run import paper as P

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parent.parent
# jobs per experiment in the quick profile (1 seed; the sleeping grid on MNIST only)
JOBS = {"mnist_demo": 4, "fashion_init_comparison": 12, "pruning": 4, "sleeping": 12}
TABLES = (
    "claims",
    "mnist_demo",
    "fashion_init_comparison",
    "sleeping_last_epoch",
    "sleeping_all_params",
    "pruning",
    "signal_propagation",
)
FIGURES = ("learning_curves", "prune_accuracy", "signal_propagation", "sleeping_mlp_mnist")


def reproduce(out: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "scripts/reproduce.sh", "--quick", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1800,
        env={**os.environ, "HYDRA_FULL_ERROR": "1"},
    )


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    # CDI_REPRODUCE_QUICK_OUT=<dir>: check (and relaunch into) a quick profile's output already
    # made there instead of making a new one (the relaunch test then writes into that dir)
    reuse = os.environ.get("CDI_REPRODUCE_QUICK_OUT")
    out = Path(reuse) if reuse else tmp_path_factory.mktemp("paper") / "paper-quick"
    proc = reproduce(out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def job_dirs(out: Path, experiment: str) -> list[Path]:
    root = out / "runs" / experiment
    return sorted(p for p in root.iterdir() if p.is_dir() and (p / "run_info.json").is_file())


def test_every_experiment_ran_to_the_end(quick) -> None:
    out, _ = quick
    for experiment, n in JOBS.items():
        jobs = job_dirs(out, experiment)
        assert len(jobs) == n, experiment
        for job in jobs:
            assert json.loads((job / "status.json").read_text())["state"] == "finished", job
    signal = pd.read_csv(out / P.SIGNAL_CSV)
    assert set(signal["scheme"]) == set(P.SCHEMES)
    assert set(signal["activation"]) == {"tanh", "relu"}
    assert sorted(signal["layer"].unique()) == list(range(1, 21))
    assert P.read_bench(out / P.BENCH_TXT) is not None


def test_tables_and_figures_in_every_format(quick) -> None:
    out, _ = quick
    for name in TABLES:
        for ext in ("csv", "md", "tex"):
            assert (out / "tables" / f"{name}.{ext}").stat().st_size > 0, f"{name}.{ext}"
    for name in FIGURES:
        for ext in ("png", "pdf"):
            assert (out / "figures" / f"{name}.{ext}").stat().st_size > 0, f"{name}.{ext}"
    demo = pd.read_csv(out / "tables" / "mnist_demo.csv")
    assert set(demo["init"]) == {"torch_default", "zeros", "ones"} | {
        i for i in demo["init"] if "fc1=zeros" in i
    }
    assert len(demo) == 4


def test_results_state_every_claim_with_the_runs_numbers(quick) -> None:
    out, _ = quick
    text = (out / P.RESULTS_MD).read_text()
    table = [line for line in text.splitlines() if line.startswith("| ") and "**" in line]
    assert len(table) == 7
    for line in table:
        verdict = re.search(r"\*\*(.+)\*\*", line).group(1)
        assert verdict != "not measured", line
    assert "scripts/reproduce.sh --quick" in text
    assert "cpu: " in text and "logical_cpus: " in text
    assert re.search(r"- launch \S+ \S+ UTC: experiments took [0-9.]+ min wall", text)
    # the zero-init number is the demo run's own test accuracy (metrics.csv, read here)
    zero = next(j for j in job_dirs(out, "mnist_demo") if ",init=zeros," in f",{j.name},")
    acc = pd.read_csv(zero / "metrics.csv")["test/acc"].dropna().iloc[-1]
    assert f"MNIST demo: test accuracy {acc:.4f} (n=1)" in text
    # the sleeping shares are 100 - the runs' own awake/all@1e-05 at their last epoch
    shares = []
    for job in job_dirs(out, "sleeping"):
        awake = pd.read_csv(job / "metrics.csv")["awake/all@1e-05"].dropna().iloc[-1]
        shares.append(100 - awake)
    assert f"{min(shares):.2f} % to {max(shares):.2f} % sleeping" in text


def test_relaunch_trains_nothing_again(quick) -> None:
    out, _ = quick
    stamps = {
        job: (job / "metrics.csv").stat().st_mtime_ns
        for experiment in JOBS
        for job in job_dirs(out, experiment)
    }
    signal = (out / P.SIGNAL_CSV).stat().st_mtime_ns
    proc = reproduce(out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for job, stamp in stamps.items():
        assert (job / "metrics.csv").stat().st_mtime_ns == stamp, job
    assert (out / P.SIGNAL_CSV).stat().st_mtime_ns == signal
    assert (out / P.RESULTS_MD).is_file()
