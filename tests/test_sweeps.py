"""``cdi-train -m``: every job in its own directory with its own results, with the basic,
joblib and submitit-local launchers; the SLURM launcher's config (no SLURM here).
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import cli_ok, run_cli, small_cfg

from cdi_experiments.run import train as T

QUICK = [
    "experiment=quick",
    "data.limit=500",
    "trainer.enable_progress_bar=false",
    "++trainer.enable_model_summary=false",
]
pytestmark = pytest.mark.integration

RESULTS = ("metrics.csv", "prune_results.csv", "run_info.json", "checkpoints/last.ckpt")


def jobs_of(sweep: Path) -> list[Path]:
    """The sweep's job directories, in job order (Hydra names them ``<num>_<overrides>``)."""
    jobs = [p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith(".")]
    return sorted(jobs, key=lambda p: int(p.name.split("_")[0]))


def check_jobs(sweep: Path, expected: list[dict[str, str]]) -> list[dict]:
    """Each job directory holds a complete run of its own config; returns the run_info's."""
    jobs = jobs_of(sweep)
    assert len(jobs) == len(expected)
    infos = []
    for job, want in zip(jobs, expected, strict=True):
        for name in RESULTS:
            assert (job / name).is_file(), f"{job.name} has no {name}"
        info = json.loads((job / "run_info.json").read_text())
        assert info["config"]["init"]["scheme"] == want["init"]
        assert info["config"]["data"]["name"] == want["data"]
        assert "test/acc" in pd.read_csv(job / "metrics.csv").columns
        infos.append(info)
    return infos


def test_basic_sweep(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    args = ["-m", "init=zeros,he", "data=mnist,fashion_mnist", *QUICK, f"hydra.sweep.dir={sweep}"]
    cli_ok(run_cli(args, cwd=tmp_path))
    expected = [
        {"init": i, "data": d} for i in ("zeros", "he") for d in ("mnist", "fashion_mnist")
    ]  # Hydra's order: the last override varies fastest
    infos = check_jobs(sweep, expected)
    assert (sweep / "multirun.yaml").is_file()
    assert len({i["pid"] for i in infos}) == 1  # the basic launcher: one process, in turn
    fingerprints = {i["generator"]["fingerprint"] for i in infos}
    assert len(fingerprints) == 2  # init decides the weights, the dataset does not
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep"]  # nothing in ./outputs


def test_joblib_sweep_runs_in_parallel_processes(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    args = ["-m", "launcher=joblib", "init=zeros,he", *QUICK, f"hydra.sweep.dir={sweep}"]
    proc = cli_ok(run_cli(args, cwd=tmp_path))
    assert "Joblib.Parallel(n_jobs=2" in proc.stdout + proc.stderr
    infos = check_jobs(sweep, [{"init": "zeros", "data": "mnist"}, {"init": "he", "data": "mnist"}])
    assert len({i["pid"] for i in infos}) == 2  # each job in its own worker process
    # A parallel job computes what a serial run computes.
    ref = tmp_path / "ref"
    T.train(small_cfg(ref, [*QUICK, "init=he"]))
    pd.testing.assert_frame_equal(
        pd.read_csv(jobs_of(sweep)[1] / "metrics.csv"), pd.read_csv(ref / "metrics.csv")
    )


def test_submitit_local_sweep(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    args = [
        "-m",
        "launcher=submitit_local",
        "hydra.launcher.timeout_min=5",
        "init=zeros,he",
        *QUICK,
        f"hydra.sweep.dir={sweep}",
    ]
    cli_ok(run_cli(args, cwd=tmp_path))
    infos = check_jobs(sweep, [{"init": "zeros", "data": "mnist"}, {"init": "he", "data": "mnist"}])
    assert len({i["pid"] for i in infos}) == 2
    logs = sorted((sweep / ".submitit").rglob("*_log.out"))
    assert len(logs) == 2  # submitit's per-job logs under the sweep dir
    assert all("run summary" in p.read_text() for p in logs)


def test_slurm_launcher_cfg_from_the_cli(tmp_path: Path) -> None:
    proc = cli_ok(
        run_cli(
            ["launcher=slurm", "hydra.launcher.partition=gpu", "--cfg", "hydra"],
            cwd=tmp_path,
        )
    )
    launcher = yaml.safe_load(proc.stdout)["hydra"]["launcher"]
    assert launcher["_target_"].endswith("submitit_launcher.SlurmLauncher")
    assert launcher["partition"] == "gpu" and launcher["gpus_per_node"] == 1
    assert sorted(tmp_path.iterdir()) == []  # printing the config runs nothing
