"""``train(cfg)`` and ``cdi-train`` on real MNIST: what a run directory holds, bit-exact
reproducibility, exact resume (also with dropout), and refusing to resume under another
identity without touching the run.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import SHRINK, cli_ok, run_cli, small_cfg
from omegaconf import OmegaConf, open_dict
from pytorch_lightning.callbacks import Callback

from cdi_experiments.cli.train import main
from cdi_experiments.paths import RunPaths
from cdi_experiments.run import train as T
from cdi_experiments.run.schema import ConfigError, task_config

pytestmark = pytest.mark.integration

MODELS = ("mlp", "mlp_dropout", "cnn", "attention")
ERR = "cdi-train: error: "


def read_csv(path: Path) -> pd.DataFrame:
    return pd.read_csv(path)


def snapshot(root: Path) -> dict[str, tuple[str, int]]:
    """Every file below ``root``: sha256 and mtime."""
    return {
        str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def assert_same_results(a: Path, b: Path) -> None:
    """The two run directories' metrics, layer, histogram and prune tables are equal exactly."""
    for name in ("metrics.csv", "layer_changes.csv", "delta_histograms.csv", "prune_results.csv"):
        da, db = read_csv(a / name), read_csv(b / name)
        assert list(da.columns) == list(db.columns), name
        pd.testing.assert_frame_equal(da, db, check_exact=True, obj=name)


@pytest.fixture(scope="module")
def model_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple]:
    """One short real-data run per model, in-process: ``{model: (cfg, metrics, objects)}``."""
    runs = {}
    for model in MODELS:
        cfg = small_cfg(tmp_path_factory.mktemp(model), [f"model={model}"])
        metrics, objects = T.train(cfg)
        runs[model] = (cfg, metrics, objects)
    return runs


@pytest.mark.parametrize("model", MODELS)
def test_run_directory(model: str, model_runs: dict) -> None:
    cfg, metrics, objects = model_runs[model]
    root = Path(cfg.run_dir)
    paths = RunPaths(root)
    callback = objects["callback"]

    df = read_csv(paths.metrics)
    assert {"test/acc", "test/loss", "train/acc", "val/acc"} <= set(df.columns)
    test_acc = df["test/acc"].dropna()
    assert len(test_acc) == 1 and test_acc.iloc[0] == pytest.approx(metrics["test/acc"])
    assert 0.1 < metrics["test/acc"] <= 1.0  # above chance after one epoch on 1000 images
    # One awake column per tracked tensor (and "all") and threshold, logged at the epoch's end.
    tracked = [*callback.plan.names(), "all"]
    assert len(tracked) > 2
    awake = [f"awake/{n}@{t:g}" for n in tracked for t in cfg.tracking.thresholds]
    assert set(awake) <= set(df.columns)
    assert sorted(c for c in df.columns if c.startswith("awake/")) == sorted(awake)
    row = df.dropna(subset=awake)
    assert len(row) == 1 and int(row["epoch"].iloc[0]) == 0
    values = row[awake].iloc[0]
    assert ((values >= 0) & (values <= 100)).all()
    assert values[f"awake/all@{0:g}"] > 50  # one epoch of Adam moves most weights

    prune = read_csv(root / "prune_results.csv")
    assert "prune" in paths.prune.name
    assert {"criterion", "acc_before", "acc_after"} <= set(prune.columns)
    assert set(prune["criterion"]) == set(cfg.prune.criteria)
    assert prune["acc_before"].tolist() == pytest.approx([metrics["test/acc"]] * len(prune))

    assert [p.name for p in paths.checkpoints.glob("*.ckpt")] == ["last.ckpt"]
    ckpt = torch.load(paths.last_ckpt, map_location="cpu", weights_only=True)
    assert ckpt["hyper_parameters"]["model_cfg"]["_target_"] == cfg.model._target_

    info = json.loads(paths.run_info.read_text())
    assert info["config"] == OmegaConf.to_container(task_config(cfg), resolve=True)
    # Outside a Hydra job there is no group choice: the model's class name labels the run.
    assert info["model_name"] == cfg.model._target_.rsplit(".", 1)[1].lower()
    assert info["generator"]["fingerprint"] == callback.fingerprint
    assert len(callback.fingerprint) == 64
    assert info["versions"]["torch"] == str(torch.__version__)
    assert info["final_metrics"]["test/acc"] == pytest.approx(metrics["test/acc"])

    # figures: readable PNGs of the awakened shares and of accuracy after pruning
    figures = sorted(p.name for p in paths.figures.rglob("*.png"))
    assert "awake_per_epoch.png" in figures and any(f.endswith("_layers.png") for f in figures)
    for png in paths.figures.rglob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000

    # export: the sleeping-pruned model with its masks made permanent (plain tensors)
    exported = torch.load(paths.pruned_model, map_location="cpu", weights_only=True)
    sleeping = prune[prune["criterion"] == "sleeping"].iloc[0]
    state = exported["state_dict"]
    assert not any(k.endswith(("_orig", "_mask")) for k in state)
    assert exported["sparsity"] == pytest.approx(sleeping["sparsity"])
    trained = objects["model"].model.state_dict()
    for name in json.loads(sleeping["layer_sparsity"]):
        pruned_here = (state[name] == 0) & (trained[name] != 0)
        assert torch.equal(state[name][~pruned_here], trained[name][~pruned_here])


def test_two_runs_are_identical(model_runs: dict, tmp_path: Path) -> None:
    cfg, _, objects = model_runs["mlp_dropout"]  # dropout: the RNG stream must repeat too
    again = small_cfg(tmp_path / "again", ["model=mlp_dropout"])
    T.train(again)
    assert_same_results(Path(cfg.run_dir), tmp_path / "again")
    a = torch.load(Path(cfg.run_dir) / "checkpoints/last.ckpt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "again/checkpoints/last.ckpt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- resume

RESUME = ["model=mlp_dropout"]  # dropout: exact only because RngState is checkpointed


def test_resume_cli_continues_exactly(tmp_path: Path) -> None:
    run, ref = tmp_path / "run", tmp_path / "uninterrupted"
    args = [*SHRINK, *RESUME, f"hydra.run.dir={run}"]
    # Interrupted: the first epoch only (via `python -m`), then the same command for 2 epochs.
    cli_ok(run_cli([*args, "trainer.max_epochs=1"], cwd=tmp_path, module=True))
    first = read_csv(run / "metrics.csv")
    proc = cli_ok(run_cli([*args, "trainer.max_epochs=2"], cwd=tmp_path))
    assert f"resuming from {run / 'checkpoints' / 'last.ckpt'}" in proc.stdout
    assert "Restored all states from the checkpoint" in proc.stdout + proc.stderr

    # The uninterrupted reference, in-process.
    T.train(small_cfg(ref, [*RESUME, "trainer.max_epochs=2"]))
    assert_same_results(run, ref)

    df = read_csv(run / "metrics.csv")
    # Epoch 0's rows are the first run's, kept (not retrained and logged again); its test row
    # (epoch 1 after one epoch) is gone, replaced by the 2-epoch run's.
    pd.testing.assert_frame_equal(df[df.epoch == 0], first[first.epoch == 0], check_exact=True)
    assert df["train/acc"].notna().sum() == 2 and df["test/acc"].notna().sum() == 1
    steps_per_epoch = int(first.loc[first["train/acc"].notna(), "step"].iloc[0]) + 1
    ckpt = torch.load(run / "checkpoints/last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 2 * steps_per_epoch  # epoch 0 was not trained twice
    # The run dir is not duplicated by Hydra, nor anything written to the cwd's outputs/.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "uninterrupted"]


class CrashInSecondEpoch(Callback):
    """Raises at the 3rd batch of epoch 1: epoch 0's checkpoint exists, epoch 1 is half done."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.current_epoch == 1 and batch_idx == 3:
            raise RuntimeError("simulated crash")


def test_resume_after_crash_in_process(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    run, ref = tmp_path / "run", tmp_path / "ref"
    cfg = small_cfg(run, [*RESUME, "trainer.max_epochs=2"])
    crashing = small_cfg(run, [*RESUME, "trainer.max_epochs=2"])
    with open_dict(crashing):
        crashing.callbacks.crash = {"_target_": f"{__name__}.CrashInSecondEpoch"}
    with pytest.raises(RuntimeError, match="simulated crash"):
        T.train(crashing)
    assert (run / "checkpoints/last.ckpt").exists() and not (run / "run_info.json").exists()
    with caplog.at_level(logging.INFO, logger="cdi_experiments.run.train"):
        T.train(cfg)
    assert f"resuming from {run / 'checkpoints' / 'last.ckpt'}" in caplog.text
    T.train(small_cfg(ref, [*RESUME, "trainer.max_epochs=2"]))
    assert_same_results(run, ref)


def test_resume_refuses_another_identity(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    T.train(small_cfg(run, ["model=mlp"]))
    before = snapshot(run)

    # In-process: the library raises before anything is written.
    with pytest.raises(ConfigError, match=r"^cannot resume: .*seed: checkpoint 0 vs this run 1"):
        T.train(small_cfg(run, ["model=mlp", "seed=1"]))
    with pytest.raises(
        ConfigError, match=r"model\.hidden: checkpoint \[128, 64\] vs this run \[64\]"
    ):
        T.train(small_cfg(run, ["model=mlp", "model.hidden=[64]"]))
    with pytest.raises(ConfigError, match=r"optimizer\.lr: checkpoint 0\.001 vs this run 0\.01"):
        T.train(small_cfg(run, ["model=mlp", "optimizer.lr=0.01"]))
    with pytest.raises(
        ConfigError, match=r"different data stream \(limit: checkpoint 1000 vs now 500\)"
    ):
        T.train(small_cfg(run, ["model=mlp", "data.limit=500"]))
    assert snapshot(run) == before

    # The command line: one line, exit 2, the run (Hydra's .hydra/ included) untouched.
    args = [*SHRINK, "model=mlp", f"hydra.run.dir={run}"]
    proc = run_cli([*args, "seed=1"], cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    [line] = proc.stderr.splitlines()
    assert line.startswith(ERR + "cannot resume: ") and "seed: checkpoint 0 vs this run 1" in line
    monkey_argv = [*args, "init=zeros"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("sys.argv", ["cdi-train", *monkey_argv])
        with pytest.raises(SystemExit) as exc:
            main()
    assert exc.value.code == 2
    [line] = capsys.readouterr().err.splitlines()
    assert (
        line.startswith(ERR + "cannot resume: ")
        and "init.scheme: checkpoint 'he' vs this run 'zeros'" in line
    )
    assert snapshot(run) == before

    # resume=false starts over in the same directory.
    T.train(small_cfg(run, ["model=mlp", "seed=1", "resume=false"]))
    info = json.loads((run / "run_info.json").read_text())
    assert info["config"]["seed"] == 1
