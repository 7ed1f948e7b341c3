"""Bring your own: a model from a user's package on PYTHONPATH, any torch optimizer, an LR
scheduler, any Lightning logger (MLflow) and callback, all from the command line's config
keys; and seeds beyond Lightning's 32 bits.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import cli_ok, quick_cfg, run_cli

from cdi_experiments.generator import bits as B
from cdi_experiments.run.train import lightning_seed, train

TINY_NET = '''
from torch import nn


class TinyNet(nn.Module):
    """A user's own model: one hidden layer of ``width``."""

    def __init__(self, width: int, input_shape=(1, 28, 28), num_classes: int = 10) -> None:
        super().__init__()
        n_in = 1
        for d in input_shape:
            n_in *= d
        self.fc1 = nn.Linear(n_in, width)
        self.out = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.out(self.fc1(x.flatten(1)).relu())
'''
TINY = ["data.limit=300", "prune.sparsities=[0.5]", "prune.criteria=[sleeping,magnitude]"]


@pytest.fixture
def user_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``mypkg.nets.TinyNet`` in a folder on the path, as a user's own code would be."""
    pkg = tmp_path / "src" / "mypkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "nets.py").write_text(TINY_NET)
    monkeypatch.syspath_prepend(str(tmp_path / "src"))
    for name in [m for m in sys.modules if m == "mypkg" or m.startswith("mypkg.")]:
        monkeypatch.delitem(sys.modules, name)
    return tmp_path / "src"


def test_lightning_seed_keeps_32_bit_seeds_and_folds_larger_ones() -> None:
    assert [lightning_seed(s) for s in (0, 7, 2**32 - 1)] == [0, 7, 2**32 - 1]
    big = 2**32
    assert lightning_seed(big) == B.hash64(big) >> 32
    assert lightning_seed(2**64 - 1) < 2**32


@pytest.mark.integration
def test_own_model_optimizer_scheduler_logger_and_callback(
    user_package: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    cfg = quick_cfg(
        run,
        *TINY,
        "model=custom",
        "model._target_=mypkg.nets.TinyNet",
        "+model.width=16",
        "optimizer=custom",
        "optimizer._target_=torch.optim.RMSprop",
        "+optimizer.lr=1e-3",
        "scheduler=cosine",
        "trainer.max_epochs=2",
        "logger=mlflow",
        "+logger.csv._target_=cdi_experiments.lightning.csv_logger.ResumableCSVLogger",
        "+callbacks.es._target_=pytorch_lightning.callbacks.EarlyStopping",
        "+callbacks.es.monitor=val/loss",
        "+callbacks.es.patience=5",
    )
    metrics, objects = train(cfg)
    lit = objects["model"]
    assert type(lit.model).__name__ == "TinyNet" and lit.model.fc1.out_features == 16
    # Tracked and pruned like a built-in model: its own parameter names in the metric keys.
    df = pd.read_csv(run / "metrics.csv")
    assert {"awake/fc1.weight@1e-05", "awake/out.weight@1e-05"} <= set(df.columns)
    prune = pd.read_csv(run / "prune_results.csv")
    assert set(prune["criterion"]) == {"sleeping", "magnitude"}
    trainer = objects["trainer"]
    assert type(trainer.optimizers[0]).__name__ == "RMSprop"
    sched = trainer.lr_scheduler_configs[0].scheduler
    assert type(sched).__name__ == "CosineAnnealingLR" and sched.T_max == 2
    # Two epochs of cosine annealing from 1e-3 with T_max=2: the LR reached its minimum 0.
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
    assert any(type(c).__name__ == "EarlyStopping" for c in trainer.callbacks)
    # The checkpoint rebuilds the user's model from its stored config.
    hp = torch.load(run / "checkpoints/last.ckpt", weights_only=True)["hyper_parameters"]
    assert hp["model_cfg"] == {
        "_target_": "mypkg.nets.TinyNet",
        "width": 16,
        "input_shape": [1, 28, 28],
        "num_classes": 10,
    }
    assert hp["optimizer"] == {"_target_": "torch.optim.RMSprop", "lr": 1e-3}
    # MLflow's file store in the run directory holds the run's metrics.
    files = [p.parts for p in (run / "mlruns").rglob("*") if p.is_file() and "metrics" in p.parts]
    logged = {"/".join(parts[parts.index("metrics") + 1 :]) for parts in files}
    assert {"val/acc", "train/loss", "test/acc"} <= logged
    info = json.loads((run / "run_info.json").read_text())
    assert info["model_name"] == "tinynet"
    assert 0 <= metrics["test/acc"] <= 1


@pytest.mark.integration
def test_seed_beyond_32_bits_trains(tmp_path: Path) -> None:
    run = tmp_path / "run"
    metrics, objects = train(quick_cfg(run, *TINY, "seed=4294967296", "prune=off"))
    assert objects["callback"].seed == 4294967296
    assert json.loads((run / "run_info.json").read_text())["config"]["seed"] == 4294967296
    assert "test/acc" in metrics


@pytest.mark.integration
def test_own_model_from_the_command_line(user_package: Path, tmp_path: Path) -> None:
    proc = run_cli(
        [
            "experiment=quick",
            *TINY,
            "prune=off",
            "trainer.enable_progress_bar=false",
            "model=custom",
            "model._target_=mypkg.nets.TinyNet",
            "+model.width=8",
        ],
        cwd=tmp_path,
        env={"PYTHONPATH": str(user_package)},
    )
    cli_ok(proc)
    hp = torch.load(tmp_path / "run/checkpoints/last.ckpt", weights_only=True)["hyper_parameters"]
    assert hp["model_cfg"]["_target_"] == "mypkg.nets.TinyNet" and hp["model_cfg"]["width"] == 8
