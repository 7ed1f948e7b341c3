"""Layer ids, initial weights and metric keys do not depend on wrappers: ``torch.compile``,
DistributedDataParallel (a real one, on a gloo process group of one rank), DataParallel and
activation checkpointing give what the bare model gets.

The reference initial weights come from the generator facade under the *bare* model's
parameter names, never through the naming code under test.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import pytorch_lightning as pl
import torch
import torch.distributed as dist
from pytorch_lightning.loggers import CSVLogger
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.utils.data import DataLoader, TensorDataset

from cdi_experiments import DeterministicInitCallback, DeterministicNoiseGenerator, layer_id_for
from cdi_experiments.datasets import load_tensors
from cdi_experiments.modules import analyze_module, canonical_name, init_module
from cdi_experiments.pruning import prunable_names, sleeping_mask

BARE_NAMES = ["0.weight", "0.bias", "1.weight", "1.bias", "3.weight", "3.bias"]


def make_net() -> nn.Module:
    torch.manual_seed(123)  # the same torch-default weights before init, whatever the wrapper
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 26 * 26, 10)
    )


@pytest.fixture
def gloo_group(tmp_path):
    """A real process group: world size 1, in this process (DDP needs one to wrap)."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def wrapped_variants() -> dict[str, nn.Module]:
    variants = {
        "compiled": torch.compile(make_net(), backend="eager"),
        "ddp": nn.parallel.DistributedDataParallel(make_net()),
        "ddp(compiled)": nn.parallel.DistributedDataParallel(
            torch.compile(make_net(), backend="eager")
        ),
        "checkpointed": checkpoint_wrapper(make_net()),
    }
    if not torch.cuda.is_available():  # with a GPU, DataParallel moves the module onto it
        variants["data_parallel"] = nn.DataParallel(make_net())
    return variants


def setup_callback(module: nn.Module, **kwargs) -> DeterministicInitCallback:
    cb = DeterministicInitCallback(seed=0, scheme="he", **kwargs)
    cb.setup(SimpleNamespace(datamodule=None), SimpleNamespace(model=module), "fit")
    return cb


def test_wrapped_models_get_the_bare_models_ids_weights_fingerprint_and_keys(gloo_group):
    bare = make_net()
    bare_cb = setup_callback(bare)
    assert bare_cb.plan.names() == BARE_NAMES
    gen = DeterministicNoiseGenerator(0)
    for name in ("0.weight", "3.weight"):  # independent reference under the bare names
        p = dict(bare.named_parameters())[name]
        expected = gen.init_matrix(layer_id_for(name), tuple(p.shape), "he")
        np.testing.assert_array_equal(p.detach().numpy(), expected)
    bare_keys = list(bare_cb.metrics_from(bare_cb.analyse(bare)))
    assert "awake/0.weight@1e-05" in bare_keys

    for label, wrapped in wrapped_variants().items():
        cb = setup_callback(wrapped)
        # the names in the module tree (checkpoint_wrapper's named_parameters hides its own)
        actual = [
            f"{m}.{n}" if m else n
            for m, module in wrapped.named_modules()
            for n, _ in module.named_parameters(recurse=False)
        ]
        assert actual != BARE_NAMES, label  # the wrapper really renames them
        assert [canonical_name(wrapped, n) for n in actual] == BARE_NAMES, label
        assert cb.plan.names() == BARE_NAMES, label
        assert cb.plan.to_dict() == bare_cb.plan.to_dict(), label  # same layer ids, same specs
        assert cb.fingerprint == bare_cb.fingerprint, label
        for (n, p), (bn, bp) in zip(
            wrapped.named_parameters(), bare.named_parameters(), strict=True
        ):
            assert torch.equal(p, bp), (label, n, bn)  # bit-identical initial weights
        assert list(cb.metrics_from(cb.analyse(wrapped))) == bare_keys, label


def test_analysis_and_pruning_of_a_wrapped_model_use_canonical_names(gloo_group):
    bare, wrapped = (
        make_net(),
        nn.parallel.DistributedDataParallel(torch.compile(make_net(), backend="eager")),
    )
    plan = init_module(bare, seed=0, scheme="he")
    assert init_module(wrapped, seed=0, scheme="he").to_dict() == plan.to_dict()
    with torch.no_grad():  # the same move in both: every 7th conv weight by 1e-3
        for module in (bare, wrapped):
            w = dict(module.named_parameters())[
                "0.weight" if module is bare else "module._orig_mod.0.weight"
            ]
            w.view(-1)[::7] += 1e-3
    pd.testing.assert_frame_equal(analyze_module(wrapped, plan), analyze_module(bare, plan))
    # a state dict saved from the compiled module resolves too
    compiled_state = wrapped.module.state_dict()
    assert next(iter(compiled_state)).startswith("_orig_mod.")
    pd.testing.assert_frame_equal(analyze_module(compiled_state, plan), analyze_module(bare, plan))
    assert prunable_names(wrapped, plan) == prunable_names(bare, plan) == ["0.weight", "3.weight"]
    mask = sleeping_mask(wrapped, plan, 1e-4)
    assert mask == sleeping_mask(bare, plan, 1e-4)
    assert mask.layer_pruned()["0.weight"] == 36 - len(range(0, 36, 7))


def test_a_users_own_submodule_called_module_keeps_its_name():
    class Holder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.module = nn.Linear(3, 2)  # not a wrapper: a plain attribute named "module"

    bare = init_module(Holder(), seed=0, scheme="he")
    compiled = init_module(torch.compile(Holder(), backend="eager"), seed=0, scheme="he")
    assert bare.names() == compiled.names() == ["module.weight", "module.bias"]
    assert bare.blocks["module.weight"][0].spec.layer_id == layer_id_for("module.weight")


class LitNet(pl.LightningModule):
    """A user's module holding a (possibly compiled) network under its own attribute."""

    def __init__(self, compiled: bool) -> None:
        super().__init__()
        net = make_net()
        self.net = torch.compile(net, backend="eager") if compiled else net

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def fit_awake_metrics(log_dir, compiled: bool) -> pd.Series:
    x, y = load_tensors("mnist")
    data = TensorDataset(x[:256, None].float() / 255, y[:256])
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(
        max_epochs=1,
        callbacks=[DeterministicInitCallback(seed=0, scheme="he")],
        logger=CSVLogger(log_dir, name="", version=""),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        deterministic=True,
    )
    trainer.fit(LitNet(compiled), DataLoader(data, batch_size=32))
    metrics = pd.read_csv(log_dir / "metrics.csv")
    [row] = [r for _, r in metrics.dropna(subset=["awake/all@0"]).iterrows()]
    return row[[k for k in metrics.columns if k.startswith(("awake/", "delta_"))]]


@pytest.mark.integration
def test_a_compiled_model_logs_the_same_awake_numbers_as_uncompiled(tmp_path):
    bare = fit_awake_metrics(tmp_path / "bare", compiled=False)
    compiled = fit_awake_metrics(tmp_path / "compiled", compiled=True)
    assert "awake/net.0.weight@1e-05" in bare.index and len(bare) == 14 * 7
    assert list(compiled.index) == list(bare.index)
    np.testing.assert_array_equal(compiled.to_numpy(), bare.to_numpy())
    assert bare["awake/all@1e-05"] > 10  # it trained
