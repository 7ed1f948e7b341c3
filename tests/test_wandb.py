"""W&B, offline, read back with wandb's own reader (``wandb leet inspect --json``): what
``cdi-train ... logger=wandb`` logs there (equal to the CSV logger's values), the run id kept
across a resume, one W&B run per sweep job, a crash marked as failed. Nothing here reaches
the network.

``leet inspect --json`` prints one JSON object per record of a ``run-<id>.wandb`` file;
history items come flattened, a logged dict ``{"h": {"bins": ...}}`` as the key ``h.bins``.
``--summary --json`` prints the run's final state: config, summary (nested), tags, exit code.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pandas as pd
import pytest
import wandb
from conftest import REPO, SHRINK, cli_ok, run_cli

WANDB = Path(sys.executable).with_name("wandb")
WANDB_ENV = ("WANDB_MODE", "WANDB_DISABLED", "WANDB_PROJECT", "WANDB_RUN_ID", "WANDB_DIR")
QUICK = [a for a in SHRINK if not a.startswith("logger=")]  # each test picks its loggers


@pytest.fixture(autouse=True)
def _no_wandb_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Start from a clean environment: offline must be our default, not the test runner's."""
    for name in WANDB_ENV:
        monkeypatch.delenv(name, raising=False)


def leet(path: Path, *flags: str) -> str:
    """``wandb leet inspect FLAGS PATH``'s standard output."""
    proc = subprocess.run(
        [str(WANDB), "leet", "inspect", *flags, str(path)],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def read_run(path: Path) -> SimpleNamespace:
    """A run file's records, history (one row per logged step), run record and final state.

    ``--follow`` prints until the run's exit record: ``wandb.finish()`` can return before
    wandb-core has flushed the file, so a plain read right after it may miss the end.
    """
    records = [
        json.loads(line)
        for line in leet(path, "--follow", "--json", "--idle-timeout", "60s").splitlines()
        if line.strip()
    ]
    assert records and records[-1]["type"] == "exit", f"{path}: no exit record"
    [run] = [r["run"] for r in records if r["type"] == "run"]
    history = pd.DataFrame([r["history"]["item"] for r in records if r["type"] == "history"])
    state = json.loads(leet(path, "--summary", "--json"))
    return SimpleNamespace(records=records, run=run, history=history, state=state)


def run_files(wandb_dir: Path) -> list[Path]:
    """The ``run-<id>.wandb`` files below a ``wandb/`` directory, oldest run first."""
    return sorted(wandb_dir.glob("offline-run-*/run-*.wandb"), key=lambda p: p.parent.name)


def _step_of(path: Path) -> int:
    """The step in a W&B media file name: ``<key>_<step>_<hash>.table.json``."""
    return int(path.name.split(".")[0].rsplit("_", 2)[-2])


def histogram(row: pd.Series, key: str) -> dict[str, Any]:
    """The histogram logged under ``key`` in one history row (leet flattens it)."""
    return {part: row[f"{key}.{part}"] for part in ("_type", "bins", "values")}


# ----------------------------------------------------------------------------- the reader


@pytest.mark.integration
def test_leet_reads_back_what_a_run_logged(tmp_path: Path) -> None:
    """What the tests below rely on: exact values per step, histograms under dotted keys,
    identity, config and exit code. A canary for a wandb upgrade."""
    big = "x" * 100_000  # one record over three of the log's 32 KiB blocks
    run = wandb.init(
        project="p", group="g", tags=["t"], id="leet1", name="nm", mode="offline",
        dir=str(tmp_path), config={"lr": 0.5, "model": {"name": "mlp"}},
    )  # fmt: skip
    for step in range(3):
        run.log({"a/fc1.weight@1e-05": 0.1 * step + 0.2, "n": step}, step=step)
    run.log({"weights/fc1.weight": wandb.Histogram([0, 1, 1, 2]), "big": big}, step=3)
    run.summary["final"] = 7
    wandb.finish(exit_code=3)

    [path] = run_files(tmp_path / "wandb")
    r = read_run(path)
    assert r.history["_step"].tolist() == [0, 1, 2, 3]
    assert r.history["a/fc1.weight@1e-05"].tolist()[:3] == [0.2, 0.1 + 0.2, 0.2 + 0.2]
    assert r.history["big"].iloc[3] == big
    h = histogram(r.history.iloc[3], "weights/fc1.weight")
    assert h["_type"] == "histogram" and sum(h["values"]) == 4 and len(h["bins"]) == 65
    assert (r.run["run_id"], r.run["project"], r.run["run_group"]) == ("leet1", "p", "g")
    assert (r.state["name"], r.state["tags"], r.state["exit_code"]) == ("nm", ["t"], 3)
    assert r.state["config"] == {"lr": 0.5, "model": {"name": "mlp"}}
    assert r.state["summary"]["final"] == 7 and r.state["summary"]["n"] == 2


# ----------------------------------------------------------------------------- training


def awake_by_epoch(frame: pd.DataFrame) -> pd.DataFrame:
    """The rows holding awake/... values, indexed by epoch, awake columns only, sorted."""
    cols = sorted(c for c in frame.columns if c.startswith("awake/"))
    assert cols, list(frame.columns)
    rows = frame.dropna(subset=[cols[0]])
    return rows.set_index(rows["epoch"].astype(int))[cols].astype(float)


@pytest.mark.integration
def test_training_logs_offline_and_resumes_the_same_run(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    args = [*QUICK, "logger=many", "logger.wandb.group=grp", "logger.wandb.tags=[cdi,test]"]
    args.append(f"hydra.run.dir={run_dir}")
    cli_ok(run_cli([*args, "trainer.max_epochs=1"], cwd=tmp_path))
    cli_ok(run_cli([*args, "trainer.max_epochs=2"], cwd=tmp_path))  # resumes

    files = run_files(run_dir / "wandb")
    assert len(files) == 2  # one offline run folder per process, both of the same W&B run
    first, second = (read_run(f) for f in files)
    run_id = first.run["run_id"]
    assert all(f.name == f"run-{run_id}.wandb" and f"-{run_id}" in f.parent.name for f in files)
    for r in (first, second):
        assert (r.run["run_id"], r.run["project"], r.run["run_group"]) == (
            run_id,
            "cdi-experiments",
            "grp",
        )
        assert r.run["job_type"] == "train" and r.state["exit_code"] == 0
        # the given tags, then the config's
        tags = ["cdi", "test", "model:mlp", "data:mnist", "init:he", "optimizer:adam"]
        assert r.state["tags"] == tags
        assert r.state["name"] == "mlp-mnist-he-s0"
        assert r.state["config"]["init"]["scheme"] == "he" and r.state["config"]["seed"] == 0
        # Per-layer scalars are logged but hidden from the automatic charts; totals are not.
        hidden = {
            m["metric"].get("name")
            for m in r.records
            if m["type"] == "metric" and m["metric"].get("options", {}).get("hidden")
        }
        logged = {c for c in r.history.columns if c.startswith(("awake/", "delta_"))}
        per_layer = {c for c in logged if not c.split("/", 1)[1].startswith("all")}
        assert per_layer and hidden == per_layer

    csv = pd.read_csv(run_dir / "metrics.csv")
    logged = pd.concat([awake_by_epoch(first.history), awake_by_epoch(second.history)])
    assert logged.index.tolist() == [0, 1]
    pd.testing.assert_frame_equal(logged, awake_by_epoch(csv), check_exact=True, check_names=False)

    # Weight histograms: at init and after each epoch, once per process's epochs.
    key = "weights/fc1.weight"
    hist = [
        histogram(row, key)
        for r in (first, second)
        for _, row in r.history.dropna(subset=[f"{key}.values"]).iterrows()
    ]
    assert len(hist) == 3 and all(h["_type"] == "histogram" for h in hist)
    assert sum(hist[0]["values"]) == 128 * 784  # every weight counted
    # The prune table: a W&B table file, plus per-criterion accuracies in the summary.
    summary = second.state["summary"]
    assert summary["prune/results"]["_type"] == "table-file"
    table = next((files[1].parent / "files").rglob("prune/results_*.table.json"))
    rows = json.loads(table.read_text())
    prune = pd.read_csv(run_dir / "prune_results.csv")
    assert len(rows["data"]) == len(prune)
    assert rows["data"] == prune[rows["columns"]].values.tolist()
    # The per-layer awake view: one table (every epoch, every threshold) equal to
    # layer_changes.csv, and one line chart at 1e-05, per trained epoch.
    layers = pd.read_csv(run_dir / "layer_changes.csv")
    files_dir = files[1].parent / "files" / "media" / "table"
    tables = sorted((files_dir / "tables").glob("awake_per_layer_*.table.json"), key=_step_of)
    table = json.loads(tables[-1].read_text())
    assert table["columns"] == ["epoch", "layer", "threshold", "awake_pct"]
    got = pd.DataFrame(table["data"], columns=table["columns"])
    want = layers.melt(
        id_vars=["epoch", "name"],
        value_vars=[c for c in layers.columns if c.startswith("awake_pct@")],
        var_name="t",
        value_name="awake_pct",
    )
    want["threshold"] = want["t"].str.removeprefix("awake_pct@").astype(float)
    want = want.rename(columns={"name": "layer"})[table["columns"]]
    key_cols = ["epoch", "layer", "threshold"]
    pd.testing.assert_frame_equal(
        got.sort_values(key_cols).reset_index(drop=True),
        want.sort_values(key_cols).reset_index(drop=True),
        check_exact=True,
        check_dtype=False,
    )
    charts = sorted((files_dir / "charts").glob("awake_per_layer_table_*.table.json"), key=_step_of)
    chart = json.loads(charts[-1].read_text())
    chart = pd.DataFrame(chart["data"], columns=chart["columns"])
    at = want[(want.threshold == 1e-05) & (want.epoch >= 0)]
    assert sorted(map(tuple, chart[["step", "lineKey", "lineVal"]].values.tolist())) == sorted(
        map(tuple, at[["epoch", "layer", "awake_pct"]].values.tolist())
    )

    key = "prune/sleeping/matched@1e-05/acc_after"
    sleeping = (prune.criterion == "sleeping") & (prune.target == "matched@1e-05")
    assert summary[key] == prune.loc[sleeping, "acc_after"].item()
    assert summary["test/acc"] == csv["test/acc"].dropna().iloc[0]


@pytest.mark.integration
def test_crashed_run_is_marked_failed(tmp_path: Path) -> None:
    crash = "+callbacks.crash._target_=conftest.CrashAfterFirstEpoch"  # tests/conftest.py
    env = {
        "PYTHONPATH": os.pathsep.join(
            filter(None, [str(REPO / "tests"), os.environ.get("PYTHONPATH")])
        )
    }
    proc = run_cli([*QUICK, "logger=wandb", "prune=off", crash], cwd=tmp_path, env=env)
    assert proc.returncode != 0 and "simulated crash" in proc.stdout + proc.stderr, proc.stderr
    [path] = run_files(tmp_path / "run/wandb")
    r = read_run(path)
    assert r.state["exit_code"] == 1 and r.state["state"] == "failed"


@pytest.mark.integration
def test_sweep_jobs_get_their_own_wandb_runs(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    args = ["-m", *QUICK, "data.limit=500", "logger=wandb", "prune=off", "init=zeros,he"]
    cli_ok(run_cli([*args, f"hydra.sweep.dir={sweep}"], cwd=tmp_path))
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert len(jobs) == 2
    ids, names = set(), set()
    for job, scheme in zip(jobs, ("zeros", "he"), strict=True):
        [path] = run_files(job / "wandb")  # without wandb.finish(), job 1 logs into job 0's
        r = read_run(path)
        assert r.state["exit_code"] == 0 and r.state["config"]["init"]["scheme"] == scheme
        assert not r.history.dropna(subset=["awake/all@0"]).empty
        ids.add(r.run["run_id"])
        # Grouped by the sweep; named by the job's overrides (its swept value among them).
        assert r.run["run_group"] == "sweep" and r.run["job_type"] == "train"
        assert r.state["name"].startswith(f"mlp-mnist-{scheme}-s0:")
        assert f"init={scheme}" in r.state["name"].split(":", 1)[1].split(",")
        assert f"init:{scheme}" in r.state["tags"]
        names.add(r.state["name"])
    assert len(ids) == 2 and len(names) == 2
