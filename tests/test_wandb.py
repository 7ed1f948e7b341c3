"""W&B, offline: our ``.wandb`` reader, what a training run logs there (equal to the CSV
logger's values), the run id kept across a resume, one W&B run per sweep job, a crash marked
as failed. Nothing here reaches the network.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pandas as pd
import pytest
import torch
import wandb
import wandb_offline as W
from conftest import SHRINK, cli_ok, run_cli, small_cfg

from cdi_experiments.run import train as T

WANDB_ENV = ("WANDB_MODE", "WANDB_DISABLED", "WANDB_PROJECT", "WANDB_RUN_ID", "WANDB_DIR")


@pytest.fixture(autouse=True)
def _no_wandb_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Start from a clean environment: offline must be our default, not the test runner's."""
    for name in WANDB_ENV:
        monkeypatch.delenv(name, raising=False)


def finished_runs(wandb_dir: Path) -> list[Path]:
    """The run files below ``wandb_dir``, once wandb-core has written their exit records."""
    files = W.run_files(wandb_dir)
    for f in files:
        W.wait_for_exit(f)
    return files


def record_types(path: Path) -> list[int]:
    """The LevelDB record types in a file, read independently of the module under test."""
    data, pos, types = path.read_bytes(), 7, []
    while pos + 7 <= len(data):
        if W.BLOCK - pos % W.BLOCK < 7:
            pos += W.BLOCK - pos % W.BLOCK
            continue
        _, length, kind = struct.unpack_from("<IHB", data, pos)
        types.append(kind)
        pos += 7 + length
    return types


# ----------------------------------------------------------------------------- the reader


def test_reader_roundtrip(tmp_path: Path) -> None:
    big = "x" * 100_000  # one record over three 32 KiB blocks: FIRST, MIDDLE..., LAST
    run = wandb.init(
        project="p", group="g", tags=["t"], id="reader1", mode="offline", dir=str(tmp_path),
        config={"lr": 0.5, "model": {"name": "mlp"}},
    )  # fmt: skip
    for step in range(3):
        run.log({"a/b@1e-05": step / 4, "n": step, "h": wandb.Histogram([0, 1, 1, 2])}, step=step)
    run.log({"big": big}, step=3)
    run.summary["final"] = 7
    wandb.finish(exit_code=3)

    [path] = finished_runs(tmp_path / "wandb")
    assert path.name == "run-reader1.wandb"
    assert {W.FIRST, W.MIDDLE, W.LAST} <= set(record_types(path))
    assert W.run(path) == {
        "run_id": "reader1", "project": "p", "group": "g", "tags": ["t"], "name": "",
        "exit_code": 3,
    }  # fmt: skip
    assert W.config(path) == {"lr": 0.5, "model": {"name": "mlp"}}
    h = W.history(path)
    assert h["_step"].tolist() == [0, 1, 2, 3]
    assert h["a/b@1e-05"].tolist()[:3] == [0.0, 0.25, 0.5]
    assert h["big"].iloc[3] == big
    assert h["h"].iloc[0]["_type"] == "histogram" and sum(h["h"].iloc[0]["values"]) == 4
    s = W.summary(path)
    assert s["final"] == 7 and s["n"] == 2 and s["big"] == big


def test_reader_rejects_corruption(tmp_path: Path) -> None:
    wandb.init(project="p", id="bad1", mode="offline", dir=str(tmp_path))
    wandb.log({"x": 1})
    wandb.finish()
    [path] = finished_runs(tmp_path / "wandb")
    data = bytearray(path.read_bytes())
    assert len(list(W.read_records(path))) > 3

    data[20] ^= 0xFF  # inside the first record's payload
    broken = tmp_path / "broken.wandb"
    broken.write_bytes(bytes(data))
    with pytest.raises(W.WandbFileError, match="CRC mismatch in the record at byte 7"):
        list(W.read_records(broken))
    broken.write_bytes(b"PK\x03\x04" + bytes(data[4:]))
    with pytest.raises(W.WandbFileError, match="is not a W&B run file header"):
        list(W.read_records(broken))


# ----------------------------------------------------------------------------- training


def awake_by_epoch(frame: pd.DataFrame) -> pd.DataFrame:
    """The rows holding awake/... values, indexed by epoch, awake columns only, sorted."""
    cols = sorted(c for c in frame.columns if c.startswith("awake/"))
    rows = frame.dropna(subset=[cols[0]])
    return rows.set_index(rows["epoch"].astype(int))[cols].astype(float)


def test_training_logs_offline_and_resumes_the_same_run(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    over = ["logger=many", "logger.wandb.group=grp", "logger.wandb.tags=[cdi,test]"]
    env_before = {k: v for k, v in os.environ.items() if k.startswith("WANDB")}
    T.train(small_cfg(run_dir, [*over, "trainer.max_epochs=1"]))
    T.train(small_cfg(run_dir, [*over, "trainer.max_epochs=2"]))  # resumes
    assert {k: v for k, v in os.environ.items() if k.startswith("WANDB")} == env_before
    assert wandb.run is None  # finished

    ckpt = torch.load(run_dir / "checkpoints/last.ckpt", weights_only=True)
    [state] = [v for k, v in ckpt["callbacks"].items() if k.startswith("DeterministicInit")]
    run_id = state["extra"]["wandb_run_id"]
    files = finished_runs(run_dir / "wandb")
    assert len(files) == 2  # one offline run folder per process, both of the same W&B run
    assert all(f.name == f"run-{run_id}.wandb" and f"-{run_id}" in f.parent.name for f in files)
    for f in files:
        info = W.run(f)
        assert (info["run_id"], info["project"], info["group"]) == (
            run_id,
            "cdi-experiments",
            "grp",
        )
        assert info["tags"] == ["cdi", "test"] and info["exit_code"] == 0
        assert info["name"] == "mlp-mnist-he-s0"
        assert W.config(f)["init"]["scheme"] == "he" and W.config(f)["seed"] == 0

    first, second = (W.history(f) for f in files)
    csv = pd.read_csv(run_dir / "metrics.csv")
    logged = pd.concat([awake_by_epoch(first), awake_by_epoch(second)])
    assert logged.index.tolist() == [0, 1]
    expected = awake_by_epoch(csv)
    assert len(expected.columns) == 7 * 6  # 6 tensors + all, 6 thresholds
    pd.testing.assert_frame_equal(logged, expected, check_exact=True, check_names=False)

    # Weight histograms: at init and after each epoch, once per process's epochs.
    hist = [h for f in (first, second) for h in f["weights/fc1.weight"].dropna()]
    assert len(hist) == 3 and all(h["_type"] == "histogram" for h in hist)
    assert sum(hist[0]["values"]) == 128 * 784  # every weight counted
    # The prune table: a W&B table file, plus per-criterion accuracies in the summary.
    summary = W.summary(files[1])
    assert summary["prune/results"]["_type"] == "table-file"
    table = next((files[1].parent / "files").rglob("prune/results_*.table.json"))
    rows = json.loads(table.read_text())
    prune = pd.read_csv(run_dir / "prune_results.csv")
    assert len(rows["data"]) == len(prune)
    key = "prune/sleeping/matched@1e-05/acc_after"
    sleeping = (prune.criterion == "sleeping") & (prune.target == "matched@1e-05")
    assert summary[key] == pytest.approx(prune.loc[sleeping, "acc_after"].item())
    assert summary["test/acc"] == pytest.approx(csv["test/acc"].dropna().iloc[0])


def test_crashed_run_is_marked_failed(tmp_path: Path) -> None:
    cfg = small_cfg(tmp_path / "run", ["logger=wandb", "prune=off"])
    cfg.extra_callbacks = {"crash": {"_target_": "conftest.CrashAfterFirstEpoch"}}
    with pytest.raises(RuntimeError, match="simulated crash"):
        T.train(cfg)
    assert wandb.run is None
    [path] = finished_runs(tmp_path / "run/wandb")
    assert W.run(path)["exit_code"] == 1


def test_sweep_jobs_get_their_own_wandb_runs(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    args = ["-m", *SHRINK, "data.limit=500", "logger=wandb", "prune=off", "init=zeros,he"]
    cli_ok(run_cli([*args, f"hydra.sweep.dir={sweep}"], cwd=tmp_path))
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert len(jobs) == 2
    ids = set()
    for job, scheme in zip(jobs, ("zeros", "he"), strict=True):
        [path] = finished_runs(job / "wandb")  # without wandb.finish(), job 1 logs into job 0's
        info = W.run(path)
        assert info["exit_code"] == 0 and W.config(path)["init"]["scheme"] == scheme
        assert not W.history(path).dropna(subset=["awake/all@0"]).empty
        ids.add(info["run_id"])
    assert len(ids) == 2
