"""``log_per``: how many metric keys a model logs, and that per-type figures are exact merges
of the per-parameter ones.

The reference groups parameters by ``type(owner).__name__`` from ``named_modules()`` and
computes ``|w - w0|`` in numpy against a copy of the weights taken right after init: neither
goes through ``DeltaStats`` nor the callback's grouping.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import pytorch_lightning as pl
import torch
import torchvision
from pytorch_lightning.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from cdi_experiments import DeterministicInitCallback
from cdi_experiments.datasets import load_tensors

THRESHOLDS = (0.0, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2)
BIN_FACTOR = 10 ** (1 / 8)


def resnet18() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10)


def setup(model: nn.Module, **kwargs) -> DeterministicInitCallback:
    cb = DeterministicInitCallback(seed=0, scheme="he", **kwargs)
    cb.setup(SimpleNamespace(datamodule=None), SimpleNamespace(model=model), "fit")
    return cb


def nudge(model: nn.Module) -> None:
    """Move every parameter partly, by amounts spread over several decades."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            move = torch.rand(p.shape, generator=g) < 0.6
            p.add_(move * 10 ** (-6 + 4 * torch.rand(p.shape, generator=g)))


def by_type(model: nn.Module, deltas: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    groups: dict[str, list[np.ndarray]] = {}
    for mname, module in model.named_modules():
        for local, _ in module.named_parameters(recurse=False):
            name = f"{mname}.{local}" if mname else local
            groups.setdefault(f"{type(module).__name__}.{local}", []).append(deltas[name])
    return {k: np.concatenate([d.reshape(-1) for d in v]) for k, v in groups.items()}


@pytest.fixture(scope="module")
def resnet_run():
    """A resnet18 initialized by the callback (default arguments), then moved by ``nudge``:
    initialized and analysed once for every test below."""
    model = resnet18()
    cb = setup(model)
    w0 = {n: p.detach().numpy().astype(np.float64) for n, p in model.named_parameters()}
    nudge(model)
    return SimpleNamespace(model=model, cb=cb, w0=w0, stats=cb.analyse(model))


@pytest.mark.parametrize(
    ("log_per", "groups"),
    [("auto", 5), ("type", 5), ("total", 0), ("parameter", 62)],
)
def test_resnet18_key_counts(resnet_run, log_per, groups):
    cb = copy.copy(resnet_run.cb)  # the same set-up callback, another log_per
    cb.log_per = log_per
    keys = cb.metrics_from(resnet_run.stats)
    assert len(keys) == 14 * (groups + 1)  # + all
    if log_per in ("auto", "type"):
        assert len(keys) < 100
        assert {k.split("/")[1].split("@")[0] for k in keys} == {
            "Conv2d.weight", "BatchNorm2d.weight", "BatchNorm2d.bias",
            "Linear.weight", "Linear.bias", "all",
        }  # fmt: skip


def test_auto_logs_per_parameter_up_to_16_tensors():
    small = nn.Sequential(*[nn.Linear(4, 4) for _ in range(8)])  # 16 tensors
    assert setup(small).resolved_log_per() == "parameter"
    bigger = nn.Sequential(*[nn.Linear(4, 4) for _ in range(9)])  # 18 tensors
    assert setup(bigger).resolved_log_per() == "type"


def test_per_type_metrics_equal_an_independent_recomputation(resnet_run):
    model, w0 = resnet_run.model, resnet_run.w0
    metrics = resnet_run.cb.metrics_from(resnet_run.stats)
    deltas = {n: np.abs(p.detach().numpy().astype(np.float64) - w0[n]) for n, p in
              model.named_parameters()}  # fmt: skip
    groups = by_type(model, deltas)
    groups["all"] = np.concatenate([d.reshape(-1) for d in deltas.values()])
    assert len(groups) == 6
    for g, d in groups.items():
        for t in THRESHOLDS:
            count = int((d > t).sum())
            assert metrics[f"awake/{g}@{t:g}"] == pytest.approx(100 * count / d.size, rel=1e-12)
        assert metrics[f"delta_max/{g}"] == d.max()
        assert metrics[f"delta_mean/{g}"] == pytest.approx(d.mean(), rel=1e-9)
        for q in (0.1, 0.5, 0.9):
            exact = np.quantile(d, q, method="inverted_cdf")
            logged = metrics[f"delta_q{round(q * 100):02d}/{g}"]
            assert (
                (logged == 0) if exact == 0 else exact / BIN_FACTOR <= logged <= exact * BIN_FACTOR
            )
    # the moves span decades, so thresholds split the groups: a real comparison
    assert 0 < metrics["awake/Conv2d.weight@0.0001"] < metrics["awake/Conv2d.weight@0"] < 100


class LitResNet(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = resnet18()

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.model(x.expand(-1, 3, -1, -1)), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


@pytest.mark.integration
def test_resnet18_fit_logs_under_100_keys_and_keeps_per_parameter_csv_rows(tmp_path):
    x, y = load_tensors("mnist")
    loader = DataLoader(TensorDataset(x[:64, None].float() / 255, y[:64]), batch_size=32)
    pl.Trainer(
        max_epochs=1,
        callbacks=[DeterministicInitCallback(seed=0, out_dir=str(tmp_path))],
        logger=CSVLogger(tmp_path, name="", version="log"),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    ).fit(LitResNet(), loader)
    metrics = pd.read_csv(tmp_path / "log" / "metrics.csv")
    keys = [k for k in metrics.columns if k.startswith(("awake/", "delta_"))]
    assert len(keys) == 84
    layers = pd.read_csv(tmp_path / "layer_changes.csv")
    assert len(set(layers["name"])) == 62 + 1  # every parameter, and all
    hist = pd.read_csv(tmp_path / "delta_histograms.csv")
    assert set(hist["name"]) == set(layers["name"])
    last = layers[layers["epoch"] == 0].set_index("name")
    assert metrics.dropna(subset=["awake/all@0"]).iloc[0]["awake/all@1e-05"] == pytest.approx(
        last.loc["all", "awake_pct@1e-05"], rel=1e-12
    )
