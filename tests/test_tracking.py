"""DeterministicInitCallback against independent recomputations.

The reference numbers never go through the callback's own path (``InitPlan``,
``param_deltas``, ``DeltaStats``): initial weights come from the generator facade
(``DeterministicNoiseGenerator(seed).init_matrix(layer_id_for(name), ...)``) or ``generate``,
and ``|w - w0|`` statistics from plain numpy over whole tensors.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import pytorch_lightning as pl
import torch
from conftest import assert_awake_row, quick_cfg

from cdi_experiments import DeterministicNoiseGenerator, layer_id_for
from cdi_experiments.generator import bits as B
from cdi_experiments.generator.core import TensorInit, generate
from cdi_experiments.lightning.callback import DeterministicInitCallback, InitIdentityError
from cdi_experiments.modules import InitPlan
from cdi_experiments.run import build
from cdi_experiments.run import train as train_mod
from cdi_experiments.run.schema import ConfigError

THRESHOLDS = (0.0, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2)
QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9, 0.99)
# 8 log-spaced bins per decade from 1e-10 to 10, rebuilt here rather than imported
EDGES = np.concatenate([[0.0], np.logspace(-10, 1, 89), [np.inf]])
BIN_FACTOR = 10 ** (1 / 8)


class Snapshots(pl.Callback):
    """Copies the network's parameters at every training epoch end."""

    def __init__(self) -> None:
        self.weights: dict[int, dict[str, np.ndarray]] = {}

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.weights[trainer.current_epoch] = {
            k: v.detach().cpu().numpy().copy() for k, v in pl_module.model.named_parameters()
        }


def train_with(cfg, *extra_callbacks: pl.Callback):
    """``train.train(cfg)``, with extra callbacks slipped into the ones it builds."""
    real = build.build_callbacks

    def callbacks(*args, **kwargs):
        return [*real(*args, **kwargs), *extra_callbacks]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(build, "build_callbacks", callbacks)
        return train_mod.train(cfg)


def independent_w0(name: str, shape: tuple[int, ...], seed: int, scheme: str) -> np.ndarray:
    """Initial value through the facade: weights by the scheme, biases zeros (he, xavier...)."""
    if name.endswith("bias"):
        return np.zeros(shape, dtype=np.float32)
    return DeterministicNoiseGenerator(seed).init_matrix(layer_id_for(name), shape, scheme)


def abs_deltas(weights: dict[str, np.ndarray], seed: int, scheme: str) -> dict[str, np.ndarray]:
    out = {
        n: np.abs(
            w.astype(np.float64) - independent_w0(n, w.shape, seed, scheme).astype(np.float64)
        )
        for n, w in weights.items()
    }
    out["all"] = np.concatenate([d.reshape(-1) for d in out.values()])
    return out


def metric_rows(metrics: pd.DataFrame) -> dict[int, pd.Series]:
    """The metrics.csv row holding the awakened shares, per epoch."""
    rows = metrics.dropna(subset=["awake/all@0"])
    return {int(r["epoch"]): r for _, r in rows.iterrows()}


# ----------------------------------------------------------------------------- a real run


@pytest.fixture(scope="module")
def he_run(tmp_path_factory):
    """3 epochs of the MLP on 1000 real MNIST images, he init, seed 0, weights per epoch."""
    run_dir = tmp_path_factory.mktemp("he_run")
    cfg = quick_cfg(run_dir, "trainer.max_epochs=3", "prune.enabled=false")
    snaps = Snapshots()
    metrics, objects = train_with(cfg, snaps)
    return SimpleNamespace(dir=run_dir, cfg=cfg, snaps=snaps, objects=objects, metrics=metrics)


def test_last_epoch_metrics_equal_an_independent_recomputation_from_the_checkpoint(he_run):
    ckpt = torch.load(he_run.dir / "checkpoints" / "last.ckpt", weights_only=True)
    weights = {
        k.removeprefix("model."): v.numpy()
        for k, v in ckpt["state_dict"].items()
        if k.startswith("model.")
    }
    assert list(weights) == [
        "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias", "fc3.weight", "fc3.bias",
    ]  # fmt: skip
    deltas = abs_deltas(weights, seed=0, scheme="he")
    rows = metric_rows(pd.read_csv(he_run.dir / "metrics.csv"))
    assert sorted(rows) == [0, 1, 2]
    last = rows[2]
    for name, d in deltas.items():
        for t in THRESHOLDS:
            logged = last[f"awake/{name}@{t:g}"]
            count = int((d > t).sum())
            assert round(logged * d.size / 100) == count, (name, t)
            assert logged == pytest.approx(100 * count / d.size, rel=1e-9, abs=0), (name, t)
        assert last[f"delta_mean/{name}"] == pytest.approx(d.mean(), rel=1e-9)
        assert last[f"delta_max/{name}"] == d.max()  # exact: a float64 of a float32 difference
    # the run moved things: not a vacuous comparison
    assert 50 < last["awake/all@1e-05"] < 100
    assert last["awake/all@0.01"] < last["awake/all@1e-05"]


def test_generator_facade_agrees_with_the_scalar_reference(he_run):
    """The facade's matrix equals the pure-Python scalar path element by element, so the
    reference w0 above is not just the callback's code path again."""
    gen = DeterministicNoiseGenerator(0)
    rng = np.random.default_rng(1)
    for name, shape in (("fc1.weight", (128, 784)), ("fc3.weight", (10, 64))):
        w0 = gen.init_matrix(layer_id_for(name), shape, "he")
        for i, j in zip(rng.integers(0, shape[0], 5), rng.integers(0, shape[1], 5), strict=True):
            ref = math.sqrt(2.0 / shape[1]) * B.gaussian(0, layer_id_for(name), int(i), int(j))
            assert w0[i, j] == np.float32(ref)


def test_every_epochs_metrics_equal_snapshots(he_run):
    rows = metric_rows(pd.read_csv(he_run.dir / "metrics.csv"))
    assert sorted(he_run.snaps.weights) == [0, 1, 2]
    previous = None
    for epoch, weights in he_run.snaps.weights.items():
        deltas = abs_deltas(weights, seed=0, scheme="he")
        row = rows[epoch]
        assert_awake_row(row, deltas, THRESHOLDS)
        if previous is not None:  # epochs differ, so a stale snapshot would be caught
            assert row["delta_mean/all"] != previous
        previous = row["delta_mean/all"]


def test_quantiles_within_one_histogram_bin_of_numpy(he_run):
    """``delta_qNN`` is read off the fixed-edge histogram (``DeltaStats.quantile``): it lies in
    the bin of the nearest-rank quantile (numpy's ``inverted_cdf``), so within a factor
    10**(1/8). Against numpy's default linear interpolation that holds on large tensors only;
    on fc3.bias (10 entries) neighbouring order statistics are bins apart."""
    weights = he_run.snaps.weights[2]
    deltas = abs_deltas(weights, seed=0, scheme="he")
    row = metric_rows(pd.read_csv(he_run.dir / "metrics.csv"))[2]
    for name, d in deltas.items():
        for q in QUANTILES:
            logged = row[f"delta_q{round(q * 100):02d}/{name}"]
            exact = np.quantile(d, q, method="inverted_cdf")
            if exact == 0:
                assert logged == 0, (name, q)
                continue
            assert exact / BIN_FACTOR <= logged <= exact * BIN_FACTOR, (name, q, logged, exact)
            if d.size >= 1000:
                linear = np.quantile(d, q)
                assert linear / BIN_FACTOR <= logged <= linear * BIN_FACTOR, (name, q)


def test_histogram_csv_counts_are_exact_and_bound_an_unlisted_threshold(he_run):
    hist = pd.read_csv(he_run.dir / "delta_histograms.csv")
    assert set(hist["epoch"]) == {-1, 0, 1, 2}
    assert set(hist["low"]) <= set(EDGES) and set(hist["high"]) <= set(EDGES)
    for epoch, weights in he_run.snaps.weights.items():
        deltas = abs_deltas(weights, seed=0, scheme="he")
        for name, d in deltas.items():
            h = hist[(hist["epoch"] == epoch) & (hist["name"] == name)]
            assert h["count"].sum() == d.size
            zeros = h[h["high"] == 0]["count"].sum()
            assert zeros == int((d == 0).sum())
            binned = h[h["high"] > 0]
            expected = np.histogram(d[d > 0], bins=EDGES)[0]
            got = np.zeros_like(expected)
            got[np.searchsorted(EDGES, binned["low"].to_numpy())] = binned["count"].to_numpy()
            np.testing.assert_array_equal(got, expected)
            # awakened share at 3e-4, which is not a tracked threshold, to bin resolution
            t = 3e-4
            lo = EDGES[EDGES <= t].max()
            hi = EDGES[EDGES > t].min()
            at_least = int(binned[binned["low"] >= hi]["count"].sum())  # |d| >= hi
            at_most = int(binned[binned["low"] >= lo]["count"].sum())  # |d| >= lo
            true = int((d > t).sum())
            assert at_least <= true <= at_most, (epoch, name)
            assert at_most - at_least < d.size * 0.25  # one bin: a real bound, not [0, n]


def test_layer_changes_csv_agrees_with_metrics_csv(he_run):
    layers = pd.read_csv(he_run.dir / "layer_changes.csv")
    rows = metric_rows(pd.read_csv(he_run.dir / "metrics.csv"))
    assert sorted(set(layers["epoch"])) == [-1, 0, 1, 2]
    init = layers[layers["epoch"] == -1]
    assert (init[[f"awake_pct@{t:g}" for t in THRESHOLDS]].to_numpy() == 0).all()
    assert (init["max_delta"] == 0).all()
    numel = dict(zip(init["name"], init["numel"], strict=True))
    assert numel["all"] == sum(v for k, v in numel.items() if k != "all") == 109386
    for _, r in layers[layers["epoch"] >= 0].iterrows():
        m, name = rows[r["epoch"]], r["name"]
        for t in THRESHOLDS:
            assert r[f"awake_pct@{t:g}"] == pytest.approx(m[f"awake/{name}@{t:g}"], rel=1e-12)
        assert r["mean_delta"] == pytest.approx(m[f"delta_mean/{name}"], rel=1e-12)
        assert r["max_delta"] == m[f"delta_max/{name}"]


def test_checkpoint_loads_weights_only_and_carries_the_identity(he_run):
    ckpt = torch.load(he_run.dir / "checkpoints" / "last.ckpt", weights_only=True)
    (state,) = [v for k, v in ckpt["callbacks"].items() if k.startswith("DeterministicInit")]
    ident = state["identity"]
    assert ident["seed"] == 0 and ident["scheme"] == "he"
    assert ident["generator_version"] == B.GENERATOR_VERSION
    plan = InitPlan.from_dict(state["plan"])
    assert ident["fingerprint"] == plan.fingerprint() == he_run.objects["callback"].fingerprint
    assert len(ident["fingerprint"]) == 64

    def plain(x):
        if isinstance(x, dict):
            return all(isinstance(k, str) and plain(v) for k, v in x.items())
        if isinstance(x, list):
            return all(plain(v) for v in x)
        return x is None or type(x) in (str, int, float, bool)

    assert plain(state)


def test_numpy_scalars_in_the_config_do_not_reach_the_checkpoint(tmp_path):
    """A numpy scalar would make ``torch.load(..., weights_only=True)`` refuse the file."""
    with pytest.raises(Exception, match="weights_only|WeightsUnpickler|global"):
        torch.save({"x": np.float64(0.02)}, tmp_path / "np.pt")
        torch.load(tmp_path / "np.pt", weights_only=True)
    cb = DeterministicInitCallback(
        seed=np.int64(3), scheme="custom", params={"std": np.float64(0.02)}, thresholds=[0, 1e-5]
    )
    model = torch.nn.Linear(4, 3)
    cb.setup(SimpleNamespace(datamodule=None), SimpleNamespace(model=model), "fit")
    torch.save({"cb": cb.state_dict()}, tmp_path / "cb.pt")
    loaded = torch.load(tmp_path / "cb.pt", weights_only=True)["cb"]
    assert type(loaded["identity"]["params"]["std"]) is float
    assert type(loaded["identity"]["seed"]) is int


def test_resume_same_identity_continues_other_identity_is_refused(he_run, tmp_path):
    same = tmp_path / "same"
    shutil.copytree(he_run.dir, same)
    cfg = quick_cfg(same, "trainer.max_epochs=4", "prune.enabled=false", "test_after_fit=false")
    _, objects = train_mod.train(cfg)
    history = pd.DataFrame(objects["callback"].history)
    assert sorted(set(history["epoch"])) == [-1, 0, 1, 2, 3]  # restored, then one more
    layers = pd.read_csv(same / "layer_changes.csv")
    before = pd.read_csv(he_run.dir / "layer_changes.csv")
    pd.testing.assert_frame_equal(layers[layers["epoch"] <= 2].reset_index(drop=True), before)

    other = tmp_path / "other"
    shutil.copytree(he_run.dir, other)
    cfg = quick_cfg(other, "trainer.max_epochs=4", "prune.enabled=false", "init=xavier")
    # the callback names its own argument; the app may restate it as a config key
    with pytest.raises(ConfigError, match=r"scheme: checkpoint 'he' vs this run 'xavier'"):
        train_mod.train(cfg)


# ----------------------------------------------------------------------------- setup


def setup_from_config(*overrides: str, seed: int = 0):
    """Model and callback built from the real configs, the callback's setup run on them."""
    cfg = quick_cfg(Path("unused"), f"seed={seed}", *overrides)
    dm = build.build_datamodule(cfg)
    lit = build.build_lit_module(cfg, dm)
    cb = build.init_callback(build.build_callbacks(cfg, None))
    cb.setup(SimpleNamespace(datamodule=dm if cfg.init.scheme == "lsuv" else None), lit, "fit")
    return lit.model, cb


def assert_plan_regenerates(model: torch.nn.Module, plan: InitPlan) -> None:
    params = dict(model.named_parameters())
    assert plan.names()
    for name in plan.names():
        assert torch.equal(params[name].detach(), plan.initial(name)), name
    # and through the checkpoint form of the plan
    again = InitPlan.from_dict(plan.to_dict())
    for name in plan.names():
        assert torch.equal(params[name].detach(), again.initial(name)), name


def test_setup_initializes_every_tracked_parameter_exactly():
    model, cb = setup_from_config("init=he")
    assert cb.plan.names() == [n for n, _ in model.named_parameters()]
    assert_plan_regenerates(model, cb.plan)
    assert cb.fingerprint == cb.plan.fingerprint()
    for name, p in model.named_parameters():
        expected = independent_w0(name, tuple(p.shape), 0, "he")
        np.testing.assert_array_equal(p.detach().numpy(), expected)

    other, cb1 = setup_from_config("init=he", seed=1)
    assert cb1.fingerprint != cb.fingerprint
    assert not torch.equal(model.fc1.weight, other.fc1.weight)


def test_partial_init_leaves_fc1_exactly_zero():
    model, cb = setup_from_config("init=partial")
    assert torch.count_nonzero(model.fc1.weight) == 0
    assert torch.count_nonzero(model.fc2.weight) == model.fc2.weight.numel()
    assert cb.plan.blocks["fc1.weight"][0].spec.scheme == "zeros"
    assert_plan_regenerates(model, cb.plan)


def test_lsuv_init_runs_and_regenerates_exactly():
    model, cb = setup_from_config("init=lsuv", "init.lsuv_batch_size=64")
    scales = [cb.plan.blocks[n][0].spec.scale for n in ("fc1.weight", "fc2.weight", "fc3.weight")]
    assert any(s != 1.0 for s in scales)  # the data-dependent part did something
    assert_plan_regenerates(model, cb.plan)
    again, cb2 = setup_from_config("init=lsuv", "init.lsuv_batch_size=64")
    assert cb2.fingerprint == cb.fingerprint


def test_torch_default_biases_are_addressable():
    model, cb = setup_from_config("init=torch_default")
    bias = model.fc1.bias.detach().numpy()
    assert np.count_nonzero(bias) == bias.size
    assert np.abs(bias).max() <= 1 / math.sqrt(784)
    ref = generate(
        TensorInit(0, layer_id_for("fc1.bias"), (128,), "torch_default", fan_in=784, fan_out=784)
    )
    np.testing.assert_array_equal(bias, ref)
    assert_plan_regenerates(model, cb.plan)


def test_attention_in_proj_gets_q_k_v_blocks_with_std_one_over_sqrt_d_model():
    model, cb = setup_from_config("model=attention", "init=custom")
    blocks = cb.plan.blocks["attn.in_proj_weight"]
    assert [(b.start, b.stop) for b in blocks] == [(0, 32), (32, 64), (64, 96)]
    w = model.attn.in_proj_weight.detach().numpy()
    gen = DeterministicNoiseGenerator(0)
    for k, part in enumerate("qkv"):
        assert blocks[k].spec.layer_id == layer_id_for(f"attn.in_proj_weight.{part}")
        assert blocks[k].spec.draw.std == pytest.approx(1 / math.sqrt(32), rel=1e-15)
        ref = gen.init_matrix(
            layer_id_for(f"attn.in_proj_weight.{part}"), (32, 32), std=1 / math.sqrt(32)
        )
        np.testing.assert_array_equal(w[32 * k : 32 * (k + 1)], ref)
        assert w[32 * k : 32 * (k + 1)].std() == pytest.approx(1 / math.sqrt(32), rel=0.1)
    assert not np.array_equal(w[:32], w[32:64])
    assert_plan_regenerates(model, cb.plan)


def test_cnn_conv_weights_are_initialized_and_tracked():
    model, cb = setup_from_config("model=cnn", "init=he")
    assert {"conv1.weight", "conv2.weight", "conv1.bias", "fc1.weight"} <= set(cb.plan.names())
    gen = DeterministicNoiseGenerator(0)
    np.testing.assert_array_equal(
        model.conv1.weight.detach().numpy(),
        gen.init_matrix(layer_id_for("conv1.weight"), (8, 1, 3, 3)),
    )
    with torch.no_grad():
        model.conv2.weight[3, 2, 1, 0] += 1e-3
    stats = cb.analyse(model)
    assert stats["conv2.weight"].changed[0.0] == 1
    assert stats["conv2.weight"].changed[1e-4] == 1
    assert stats["conv2.weight"].changed[1e-2] == 0
    assert stats["conv1.weight"].changed[0.0] == 0
    assert stats["all"].changed[0.0] == 1
    assert cb.metrics_from(stats)["awake/conv2.weight@0"] == pytest.approx(100 / (16 * 8 * 9))


# ----------------------------------------------------------------------------- state


def state_with(**changes):
    cb = DeterministicInitCallback(seed=0, scheme="he")
    cb.setup(SimpleNamespace(datamodule=None), SimpleNamespace(model=torch.nn.Linear(6, 4)), "fit")
    state = cb.state_dict()
    state["identity"] = {**state["identity"], **changes}
    return cb, state


def test_state_dict_identity_fields():
    cb, state = state_with()
    ident = state["identity"]
    assert {"seed", "scheme", "generator_version", "fingerprint"} <= set(ident)
    assert ident["fingerprint"] == cb.fingerprint


@pytest.mark.parametrize(
    ("field", "value", "names"),
    [
        ("seed", 7, ["seed: checkpoint 7", "seed=7"]),
        (
            "scheme",
            "xavier",
            ["scheme: checkpoint 'xavier'", "DeterministicInitCallback(scheme='xavier')"],
        ),
        ("generator_version", 999, ["generator_version: checkpoint 999", "install"]),
        ("fingerprint", "0" * 64, ["fingerprint: checkpoint '000", "the model and code"]),
    ],
)
def test_load_state_dict_refuses_another_identity(field, value, names):
    cb, state = state_with(**{field: value})
    with pytest.raises(InitIdentityError) as err:
        cb.load_state_dict(state)
    msg = str(err.value)
    assert "\n" not in msg
    for part in names:
        assert part in msg
    assert "init." not in msg and "tracking." not in msg  # argument names, not config keys
    assert "new run directory" in msg
    assert err.value.diff == {field: (value, cb.identity()[field])}


def test_load_state_dict_accepts_the_same_identity():
    cb, state = state_with()
    state["history"] = [{"epoch": 0, "name": "all", "numel": 28}]
    cb.load_state_dict(state)
    assert cb.history == state["history"]
    fresh = DeterministicInitCallback(seed=0, scheme="he")  # before setup: plan from the state
    fresh.load_state_dict(state)
    assert fresh.fingerprint == cb.fingerprint
    assert fresh.plan.to_dict() == cb.plan.to_dict()


def test_load_state_dict_refuses_a_foreign_state():
    cb, _ = state_with()
    with pytest.raises(InitIdentityError, match="no 'identity'"):
        cb.load_state_dict({"history": []})


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"thresholds": [-1e-5]}, r"^thresholds: -1e-05 is not a finite number >= 0"),
        ({"thresholds": [float("nan")]}, r"^thresholds: nan"),
        ({"thresholds": []}, r"^thresholds must list at least one"),
        ({"thresholds": "1e-5"}, r"^thresholds must list"),
        ({"every_n_epochs": 0}, r"^every_n_epochs must be an integer >= 1, got 0"),
        ({"lsuv_batch_size": 0}, r"^lsuv_batch_size must be an integer >= 1, got 0"),
        ({"scheme": "hee"}, r"^scheme: unknown init scheme 'hee'; choose one of: .*he"),
        ({"quantiles": [0.5, 2]}, r"^quantiles must be fractions in \[0, 1\].*got 2"),
        ({"layer_ids": "pos"}, r"^layer_ids='pos' is not one of \('name', 'index'\)$"),
        ({"mode": "x"}, r"^mode='x' is not one of \('generate', 'record'\)$"),
        (
            {"log_per": "layer"},
            r"^log_per='layer' is not one of \('auto', 'parameter', 'type', 'total'\)$",
        ),
        ({"seed": -1}, r"^seed must be an integer >= 0"),
    ],
)
def test_init_validates_with_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DeterministicInitCallback(**kwargs)


def test_hooks_skip_the_sanity_check():
    cb = DeterministicInitCallback(seed=0, scheme="he")
    lit = SimpleNamespace(model=torch.nn.Linear(3, 2))
    cb.setup(SimpleNamespace(datamodule=None), lit, "fit")
    sanity = SimpleNamespace(sanity_checking=True, current_epoch=0, global_step=0, max_epochs=1)
    cb.on_train_start(sanity, lit)
    cb.on_train_epoch_end(sanity, lit)
    assert cb.history == []


def test_every_n_epochs_2_logs_epochs_1_3_and_the_last(tmp_path):
    cfg = quick_cfg(
        tmp_path,
        "data.limit=256",
        "trainer.max_epochs=5",
        "tracking.every_n_epochs=2",
        "trainer.num_sanity_val_steps=2",
        "prune.enabled=false",
        "test_after_fit=false",
    )
    train_mod.train(cfg)
    metrics = pd.read_csv(tmp_path / "metrics.csv")
    assert sorted(metric_rows(metrics)) == [1, 3, 4]
    assert sorted(set(metrics.dropna(subset=["val/acc"])["epoch"])) == [0, 1, 2, 3, 4]
    layers = pd.read_csv(tmp_path / "layer_changes.csv")
    assert sorted(set(layers["epoch"])) == [-1, 1, 3, 4]
