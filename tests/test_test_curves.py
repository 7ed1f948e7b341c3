"""Test accuracy per epoch (``data.test_each_epoch``), for learning curves.

``test_epoch/{loss,acc}`` are measured at every validation on the test set and must equal an
independent recomputation (plain torch on the raw test file, from the weights each epoch
validated); ``trainer.test``'s ``test/*`` keys stay as they were; a datamodule that names no
``val_stages`` works as before; and nothing may select on a test metric (the sweep objective,
a checkpoint or early-stopping monitor).
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
import torchvision
from conftest import REPO, SMALL, compose_cfg, small_cfg
from torch.utils.data import DataLoader, TensorDataset

from cdi_experiments.lightning.classifier import Classifier
from cdi_experiments.lightning.datamodule import ImageDataModule
from cdi_experiments.run import build
from cdi_experiments.run import train as train_mod
from cdi_experiments.run.schema import ConfigError, check_config, task_config

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081  # typed here, not imported: an independent check


def _trainer(**kwargs) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        **kwargs,
    )


def _mlp() -> Classifier:
    torch.manual_seed(0)
    return Classifier(
        model_cfg={
            "_target_": "cdi_experiments.models.MLP",
            "input_shape": [1, 28, 28],
            "num_classes": 10,
            "hidden": [32],
        }
    )


# ----------------------------------------------------------------------------- without cdi-train


def test_val_size_zero_logs_the_test_set_per_epoch_and_no_val() -> None:
    dm = ImageDataModule("mnist", limit=300, val_size=0, test_each_epoch=True)
    lit = _mlp()
    trainer = _trainer()
    trainer.fit(lit, datamodule=dm)
    logged = sorted(trainer.callback_metrics)
    assert logged == ["test_epoch/acc", "test_epoch/loss", "train/acc", "train/loss"]
    again = lit.evaluate(dm.test_dataloader())  # the final model on the same 300 test images
    assert again["count"] == 300
    assert float(trainer.callback_metrics["test_epoch/acc"]) == pytest.approx(again["acc"])
    assert float(trainer.callback_metrics["test_epoch/loss"]) == pytest.approx(again["loss"])


class _OneValLoader(pl.LightningDataModule):
    """A user's datamodule: one validation loader and no ``val_stages`` attribute."""

    def __init__(self, loaders: int = 1) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.data = TensorDataset(torch.randn(64, 1, 28, 28, generator=g), torch.arange(64) % 10)
        self.loaders = loaders

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=16)

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        loader = DataLoader(self.data, batch_size=32)
        return loader if self.loaders == 1 else [loader] * self.loaders


def test_a_datamodule_without_val_stages_logs_val_as_before() -> None:
    trainer = _trainer()
    trainer.fit(_mlp(), datamodule=_OneValLoader())
    assert sorted(trainer.callback_metrics) == ["train/acc", "train/loss", "val/acc", "val/loss"]


def test_two_val_loaders_without_val_stages_is_one_line_naming_the_fix() -> None:
    with pytest.raises(ValueError) as err:
        _trainer(num_sanity_val_steps=0).fit(_mlp(), datamodule=_OneValLoader(loaders=2))
    assert str(err.value) == (
        "validation dataloader 1 has no metric namespace: the datamodule's val_stages is "
        "('val',); give the datamodule a val_stages attribute naming one stage per "
        "val_dataloader loader, e.g. ('val', 'val_ood')"
    )


def test_val_stages_may_not_reuse_the_test_namespace() -> None:
    dm = _OneValLoader(loaders=2)
    dm.val_stages = ("val", "test")
    with pytest.raises(ValueError) as err:
        _trainer().fit(_mlp(), datamodule=dm)
    assert str(err.value) == (
        "datamodule.val_stages=('val', 'test') is not allowed; name each validation loader's "
        "metrics once, with a non-empty string without '/' other than 'train' and 'test', "
        "e.g. ('val', 'test_epoch')"
    )


# ----------------------------------------------------------------------------- the schema


def test_the_objective_refuses_test_epoch_metrics_in_one_line() -> None:
    with pytest.raises(ConfigError) as err:
        check_config(task_config(compose_cfg(["objective=test_epoch/acc"])))
    assert str(err.value) == (
        "objective='test_epoch/acc' is not allowed; it is measured on the test set, and tuning "
        "on it leaks the test set into the model choice; use a validation metric, e.g. "
        "objective=val/acc (or val/loss with hydra.sweeper.direction=minimize)"
    )


@pytest.mark.parametrize("monitor", ["test_epoch/acc", "test/loss"])
def test_no_callback_may_monitor_a_test_metric(monitor: str) -> None:
    early = [
        "+callbacks.es._target_=pytorch_lightning.callbacks.EarlyStopping",
        f"+callbacks.es.monitor={monitor}",
    ]
    with pytest.raises(ConfigError) as err:
        check_config(task_config(compose_cfg(early)))
    assert str(err.value) == (
        f"callbacks.es.monitor={monitor!r} is not allowed; it is measured on the test set, and "
        "choosing a checkpoint or stopping on it leaks the test set into the model choice; use "
        "a validation metric, e.g. callbacks.es.monitor=val/loss"
    )
    check_config(task_config(compose_cfg([*early[:1], "+callbacks.es.monitor=val/loss"])))


def test_test_each_epoch_must_be_a_boolean() -> None:
    with pytest.raises(ConfigError) as err:
        check_config(task_config(compose_cfg(["data.test_each_epoch=1"])))
    assert str(err.value) == (
        "data.test_each_epoch=1 is not allowed; use true (also log test_epoch/{loss,acc} every "
        "epoch, for learning curves) or false"
    )


def test_the_learning_curve_experiments_turn_it_on_and_the_default_does_not() -> None:
    assert compose_cfg().data.test_each_epoch is False
    for name in ("mnist_demo", "fashion_init_comparison"):
        assert compose_cfg([f"experiment={name}"]).data.test_each_epoch is True


# ----------------------------------------------------------------------------- a real run


class _ValidatedWeights(pl.Callback):
    """The model's state at the start of every (non-sanity) validation: what it measured."""

    def __init__(self) -> None:
        self.states: dict[int, dict[str, torch.Tensor]] = {}

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule):
        if not trainer.sanity_checking:
            self.states[trainer.current_epoch] = {
                k: v.detach().clone() for k, v in pl_module.model.state_dict().items()
            }


def _independent_test_metrics(state: dict[str, torch.Tensor]) -> tuple[int, float]:
    """Correct predictions and mean cross-entropy on the first SMALL raw MNIST test images,
    with the MLP's forward written out (no package code: not the datamodule, not the model)."""
    raw = torchvision.datasets.MNIST(str(REPO / "data"), train=False, download=False)
    x = (raw.data[:SMALL].float() / 255 - MNIST_MEAN) / MNIST_STD  # (N, 28, 28)
    h = x.reshape(SMALL, -1)  # (N, 784)
    layers = sorted({k.split(".")[0] for k in state}, key=lambda n: int(n.removeprefix("fc")))
    for k, name in enumerate(layers):
        h = h @ state[f"{name}.weight"].T + state[f"{name}.bias"]
        if k < len(layers) - 1:
            h = torch.relu(h)
    y = raw.targets[:SMALL]
    return int((h.argmax(1) == y).sum()), float(F.cross_entropy(h.double(), y))


@pytest.fixture(scope="module")
def two_epochs(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    run_dir = tmp_path_factory.mktemp("test_curves") / "run"
    cfg = small_cfg(
        run_dir, ["data.test_each_epoch=true", "trainer.max_epochs=2", "prune.enabled=false"]
    )
    seen = _ValidatedWeights()
    real = build.build_callbacks
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(build, "build_callbacks", lambda *a, **k: [*real(*a, **k), seen])
        metrics, _ = train_mod.train(cfg)
    return SimpleNamespace(dir=Path(run_dir), metrics=metrics, states=seen.states)


@pytest.mark.integration
def test_test_epoch_acc_per_epoch_equals_an_independent_recomputation(two_epochs) -> None:
    csv = pd.read_csv(two_epochs.dir / "metrics.csv")
    assert not [c for c in csv.columns if "dataloader_idx" in c]
    rows = csv.dropna(subset=["test_epoch/acc"]).set_index("epoch")
    assert sorted(rows.index) == [0, 1] == sorted(two_epochs.states)
    for epoch, state in two_epochs.states.items():
        correct, loss = _independent_test_metrics(state)
        assert rows.loc[epoch, "test_epoch/acc"] == pytest.approx(correct / SMALL, abs=1e-9)
        assert rows.loc[epoch, "test_epoch/loss"] == pytest.approx(loss, rel=1e-5)
        assert rows.loc[epoch, "val/acc"] != rows.loc[epoch, "test_epoch/acc"]  # other images
    assert rows.loc[0, "test_epoch/acc"] != rows.loc[1, "test_epoch/acc"]  # not a stale value
    # trainer.test's keys are as they were: the final model, so the last epoch's value
    final = csv.dropna(subset=["test/acc"])
    assert len(final) == 1
    assert final["test/acc"].iloc[0] == rows.loc[1, "test_epoch/acc"]
    assert two_epochs.metrics["test/acc"] == pytest.approx(rows.loc[1, "test_epoch/acc"])


@pytest.mark.integration
def test_the_report_reads_test_epoch_per_epoch_and_the_figure_draws_it(two_epochs) -> None:
    from cdi_experiments.run import figures as F
    from cdi_experiments.run.runs import load_runs

    csv = pd.read_csv(two_epochs.dir / "metrics.csv").dropna(subset=["test_epoch/acc"])
    epochs = load_runs([two_epochs.dir]).epochs
    assert list(epochs["test_epoch/acc"]) == list(csv["test_epoch/acc"])  # epochs 0 and 1
    fig = F.learning_curves(epochs, hue="init", panel="data")
    (ax,) = [a for a in fig.axes if a.get_visible()]
    assert sorted(ln.get_linestyle() for ln in ax.get_lines() if ln.get_gid() is None) == [
        "-",
        "--",
    ]
    assert not ax.containers  # no after-training marker: the dashed curve's last point is it
