"""DeterministicInitCallback in a user's own Lightning project: their LightningModule (not our
Classifier), a stock ``pl.Trainer``, nothing else of ours. The README shows the same snippet.

The reference numbers are recomputed independently: initial weights from the generator facade
(``DeterministicNoiseGenerator(seed).init_matrix(layer_id_for(name), ...)``), biases zeros,
and ``|w - w0|`` statistics in plain numpy over whole tensors.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import pytorch_lightning as pl
import torch
from conftest import assert_awake_row
from pytorch_lightning.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import cdi_experiments
from cdi_experiments import DeterministicInitCallback, DeterministicNoiseGenerator, layer_id_for
from cdi_experiments.datasets import load_tensors

THRESHOLDS = (0.0, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2)


# ------------------------------------------------------------------ the user's own project


class LitMLP(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 10))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit_user_project(log_dir) -> tuple[LitMLP, pl.Trainer]:
    x, y = load_tensors("mnist")
    data = TensorDataset(x[:1000].float() / 255, y[:1000])
    model = LitMLP()
    trainer = pl.Trainer(
        max_epochs=1,
        callbacks=[DeterministicInitCallback(seed=0, scheme="he")],
        logger=CSVLogger(log_dir, name="", version=""),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(model, DataLoader(data, batch_size=64))
    return model, trainer


# ------------------------------------------------------------------ the checks


@pytest.mark.integration
def test_own_lightning_module_logs_awake_metrics_equal_to_an_independent_recomputation(
    tmp_path,
):
    model, trainer = fit_user_project(tmp_path)
    weights = {n: p.detach().numpy() for n, p in model.named_parameters()}
    assert list(weights) == ["net.1.weight", "net.1.bias", "net.3.weight", "net.3.bias"]
    gen = DeterministicNoiseGenerator(0)
    deltas = {}
    for name, w in weights.items():
        w0 = (
            np.zeros(w.shape, np.float32)
            if name.endswith("bias")
            else gen.init_matrix(layer_id_for(name), w.shape, "he")
        )
        deltas[name] = np.abs(w.astype(np.float64) - w0.astype(np.float64))
    deltas["all"] = np.concatenate([d.reshape(-1) for d in deltas.values()])

    metrics = pd.read_csv(tmp_path / "metrics.csv")
    [row] = [r for _, r in metrics.dropna(subset=["awake/all@0"]).iterrows()]
    logged = {k for k in metrics.columns if k.startswith(("awake/", "delta_"))}
    assert len(logged) == 14 * 5  # 4 parameters + all, 14 keys each (<= 16 tensors: per param)
    assert_awake_row(row, deltas, THRESHOLDS)
    assert 50 < row["awake/all@1e-05"] < 100  # training moved things: not a vacuous check
    assert float(trainer.callback_metrics["awake/all@0.01"]) == pytest.approx(
        row["awake/all@0.01"], rel=1e-12
    )


@pytest.mark.integration
def test_the_package_exports_the_callback_lazily():
    """``import cdi_experiments`` stays free of Lightning and pandas until the callback or an
    analysis helper is used (a fresh interpreter: this one has imported both already)."""
    code = (
        "import sys, cdi_experiments as c; "
        "print('pytorch_lightning' in sys.modules, 'pandas' in sys.modules); "
        "from cdi_experiments import DeterministicInitCallback, analyze_module, rewind; "
        "print('pytorch_lightning' in sys.modules, DeterministicInitCallback.__module__, "
        "analyze_module.__module__, 'DeterministicInitCallback' in dir(c))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split("\n")
    assert out[0] == "False False"
    assert out[1] == (
        "True cdi_experiments.lightning.callback cdi_experiments.modules.analysis True"
    )
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        cdi_experiments.nope  # noqa: B018
