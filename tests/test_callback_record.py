"""``mode="record"``: the model keeps its own init; the callback stores a copy of it and
everything downstream (metrics, checkpoint, resume, analysis, masks, rewind, pruning) works
from that copy.

References are built from a ``copy.deepcopy`` of the model taken before the callback ran,
and plain torch/numpy arithmetic, never through ``RecordedPlan`` or ``param_deltas``.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from cdi_experiments import DeterministicInitCallback, InitIdentityError, InitPlan, RecordedPlan
from cdi_experiments.datasets import load_tensors
from cdi_experiments.modules import analyze_module, awakened_masks, plan_from_dict, rewind
from cdi_experiments.pruning import magnitude_increase, movement, sleeping_mask

THRESHOLDS = (0.0, 1e-5, 1e-3)


def user_net(seed: int) -> nn.Module:
    torch.manual_seed(seed)  # the user's own init: torch's defaults under their seed
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.LayerNorm(32), nn.Linear(32, 10))


def recorded(module: nn.Module, **kwargs) -> DeterministicInitCallback:
    cb = DeterministicInitCallback(mode="record", thresholds=THRESHOLDS, **kwargs)
    cb.setup(SimpleNamespace(datamodule=None), SimpleNamespace(model=module), "fit")
    return cb


def nudge(module: nn.Module) -> None:
    """A fixed, partial move: every third entry of every parameter by 1e-4 * (k % 5)."""
    with torch.no_grad():
        for p in module.parameters():
            flat = p.view(-1)
            flat[::3] += 1e-4 * (torch.arange(flat[::3].numel()) % 5)


def test_record_keeps_the_users_weights_and_stores_a_copy_in_their_dtype():
    model = user_net(7).double()
    before = copy.deepcopy(model)
    cb = recorded(model)
    for (n, p), (_, q) in zip(model.named_parameters(), before.named_parameters(), strict=True):
        assert torch.equal(p, q), n  # untouched
    assert isinstance(cb.plan, RecordedPlan)
    assert cb.plan.names() == ["1.weight", "1.bias", "2.weight", "2.bias", "3.weight", "3.bias"]
    for name, p in before.named_parameters():
        stored = cb.plan.tensors[name]
        assert stored.dtype == torch.float64 and stored.device.type == "cpu"
        assert torch.equal(stored, p)
        assert stored.data_ptr() != dict(model.named_parameters())[name].data_ptr()  # a copy
    assert cb.plan.nbytes == sum(p.numel() * 8 for p in model.parameters())
    assert cb.identity() == {"mode": "record", "biases": True, "fingerprint": cb.fingerprint}


def test_record_metrics_equal_an_independent_recomputation():
    model = user_net(3)
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    cb = recorded(model)
    nudge(model)
    metrics = cb.metrics_from(cb.analyse(model))
    deltas = {n: (p.detach().double() - w0[n].double()).abs() for n, p in model.named_parameters()}
    deltas["all"] = torch.cat([d.reshape(-1) for d in deltas.values()])
    for name, d in deltas.items():
        for t in THRESHOLDS:
            expected = 100 * int((d > t).sum()) / d.numel()
            assert metrics[f"awake/{name}@{t:g}"] == pytest.approx(expected, rel=1e-12)
        assert metrics[f"delta_max/{name}"] == float(d.max())
        assert metrics[f"delta_mean/{name}"] == pytest.approx(float(d.mean()), rel=1e-9)
    assert 0 < metrics["awake/all@0"] < 100  # partial: not a vacuous comparison


def test_record_checkpoint_state_loads_weights_only_and_resumes_against_the_record(tmp_path):
    model = user_net(1)
    cb = recorded(model)
    torch.save({"cb": cb.state_dict()}, tmp_path / "cb.pt")
    state = torch.load(tmp_path / "cb.pt", weights_only=True)["cb"]
    plan = InitPlan.from_dict(state["plan"])  # the call the prune stage uses, either kind
    assert isinstance(plan, RecordedPlan) and isinstance(
        plan_from_dict(state["plan"]), RecordedPlan
    )
    assert plan.fingerprint() == cb.fingerprint == state["identity"]["fingerprint"]

    # a resume builds the model afresh (another init), then restores the callback's state
    again = recorded(user_net(2))
    assert again.fingerprint != cb.fingerprint
    again.load_state_dict(state)
    assert again.fingerprint == cb.fingerprint
    for name in cb.plan.names():
        assert torch.equal(again.plan.tensors[name], cb.plan.tensors[name])


def test_modes_do_not_resume_each_other():
    record = recorded(user_net(0))
    generate = DeterministicInitCallback(seed=0, scheme="he")
    generate.setup(SimpleNamespace(datamodule=None), SimpleNamespace(model=user_net(0)), "fit")
    with pytest.raises(
        InitIdentityError,
        match=r"mode: checkpoint 'generate' vs this run 'record'.*mode='generate'",
    ):
        record.load_state_dict(generate.state_dict())
    with pytest.raises(
        InitIdentityError, match=r"mode: checkpoint 'record' vs this run 'generate'"
    ):
        generate.load_state_dict(record.state_dict())


def test_analysis_masks_rewind_and_pruning_work_from_a_record():
    model = user_net(4)
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    plan = recorded(model).plan
    nudge(model)
    table = analyze_module(model, plan, THRESHOLDS).set_index("name")
    assert table.loc["1.weight", "scheme"] == "recorded"
    d = (model[1].weight.detach().double() - w0["1.weight"].double()).abs()
    assert table.loc["1.weight", "changed@1e-05"] == int((d > 1e-5).sum())

    awake = awakened_masks(model, plan, 1e-5)
    assert torch.equal(awake["1.weight"], d > 1e-5)
    mask = sleeping_mask(model, plan, 1e-5)
    assert torch.equal(mask["1.weight"], d > 1e-5)  # keep what moved
    assert list(mask) == ["1.weight", "3.weight"]
    w = model[3].weight.detach()
    assert torch.equal(
        movement(w, plan, "3.weight", 0), (w.double() - w0["3.weight"].double()).abs()
    )
    assert torch.equal(
        magnitude_increase(w, plan, "3.weight", 0),
        w.double().abs() - w0["3.weight"].double().abs(),
    )

    rewind(model, plan)
    for name, p in model.named_parameters():
        assert torch.equal(p, w0[name]), name


class LitUser(pl.LightningModule):
    def __init__(self, seed: int) -> None:
        super().__init__()
        self.model = user_net(seed)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.model(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.integration
def test_record_mode_fit_and_resume_measure_from_the_first_runs_init(tmp_path):
    x, y = load_tensors("mnist")
    loader = DataLoader(TensorDataset(x[:256].float() / 255, y[:256]), batch_size=64)

    def trainer(epochs: int, version: str) -> pl.Trainer:
        return pl.Trainer(
            max_epochs=epochs,
            callbacks=[
                DeterministicInitCallback(mode="record", thresholds=THRESHOLDS),
                ModelCheckpoint(tmp_path / "ckpt", save_last=True),
            ],
            logger=CSVLogger(tmp_path, name="", version=version),
            enable_progress_bar=False,
            enable_model_summary=False,
        )

    first = LitUser(seed=11)
    w0 = {n: p.detach().clone() for n, p in first.model.named_parameters()}
    trainer(1, "a").fit(first, loader)
    ckpt = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    (state,) = [v for k, v in ckpt["callbacks"].items() if k.startswith("DeterministicInit")]
    assert set(state["plan"]["tensors"]) == set(w0)

    resumed = LitUser(seed=99)  # another init: only the record knows the run's w0
    trainer(2, "b").fit(resumed, loader, ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    metrics = pd.read_csv(tmp_path / "b" / "metrics.csv").dropna(subset=["awake/all@0"])
    [row] = [r for _, r in metrics.iterrows()]
    d = torch.cat(
        [
            (p.detach().double() - w0[n].double()).abs().reshape(-1)
            for n, p in resumed.model.named_parameters()
        ]
    )
    for t in THRESHOLDS:
        assert row[f"awake/all@{t:g}"] == pytest.approx(100 * int((d > t).sum()) / d.numel())
    assert row["delta_max/all"] == float(d.max())
    assert np.isfinite(row["delta_mean/all"]) and row["awake/all@1e-05"] > 10
