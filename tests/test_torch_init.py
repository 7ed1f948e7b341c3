"""Deterministic initialization of whole modules (``init_module``) and their analysis against
the regenerated initial values (``analyze_module``, ``awakened_masks``, ``rewind``).

Every expected value is rebuilt independently of ``torch_init``: from a ``TensorInit`` written
out in the test with ``layer_id_for(name)``, from the original tool's
``DeterministicNoiseGenerator`` numbering, or from the generator's addressed primitives
(``gaussian``, ``u01``) element by element. The analysis is checked against numpy on a model
really trained with Adam on real MNIST, whose always-blank pixels leave part of the first
layer bit-for-bit unchanged (the zero mass of the delta distribution).
"""

from __future__ import annotations

import copy
import json
import math
import re
import tracemalloc
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune

from cdi_experiments.datasets import load_tensors
from cdi_experiments.generator import bits as B
from cdi_experiments.generator import schemes
from cdi_experiments.generator.core import TensorInit, generate_tensor, layer_id_for
from cdi_experiments.generator.facade import DeterministicNoiseGenerator
from cdi_experiments.modules import (
    DeltaStats,
    InitPlan,
    analyze_module,
    awakened_masks,
    init_module,
    param_deltas,
    rewind,
)

THRESHOLDS = (0.0, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality of two float tensors (shape and dtype included; -0.0 != 0.0)."""
    a, b = a.detach().cpu().contiguous(), b.detach().cpu().contiguous()
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return torch.equal(a.view(ints), b.view(ints))


def spec_tensor(
    seed: int, name: str, shape: tuple[int, ...], scheme: str, **kw: Any
) -> torch.Tensor:
    """The initial value of parameter ``name``, built without torch_init."""
    return generate_tensor(TensorInit(seed, layer_id_for(name), shape, scheme, **kw))


class MLP(nn.Module):
    """Named attributes; ``extra`` inserts a layer in the middle of the module order."""

    def __init__(self, extra: bool = False) -> None:
        super().__init__()
        self.fc1 = nn.Linear(20, 16)
        if extra:
            self.mid = nn.Linear(16, 16)
        self.fc2 = nn.Linear(16, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.fc1(x))
        if hasattr(self, "mid"):
            x = F.relu(self.mid(x))
        return self.head(F.relu(self.fc2(x)))


# ------------------------------------------------------------------------------ layer ids


@pytest.mark.parametrize(
    ("scheme", "params"),
    [("he", {}), ("xavier_uniform", {}), ("custom", {"std": 0.3}), ("torch_default", {})],
)
def test_every_parameter_is_its_name_addressed_generation(scheme: str, params: dict) -> None:
    model = MLP()
    plan = init_module(model, 5, scheme, params=params)
    assert plan.names() == [n for n, _ in model.named_parameters()]
    for name, p in model.named_parameters():
        if name.endswith("weight"):
            want = spec_tensor(5, name, tuple(p.shape), scheme, params=params)
        elif scheme == "torch_default":  # the bias has its own addressable draw
            fan_in = model.get_submodule(name.rpartition(".")[0]).weight.shape[1]
            want = spec_tensor(5, name, tuple(p.shape), scheme, fan_in=fan_in, fan_out=fan_in)
        else:
            want = torch.zeros_like(p)
        assert same_bits(p, want), name
        assert [b.spec.layer_id for b in plan.blocks[name]] == [layer_id_for(name)]


def test_inserting_a_layer_leaves_every_other_layer_bit_identical() -> None:
    base, grown = MLP(), MLP(extra=True)
    init_module(base, 3, "torch_default")
    init_module(grown, 3, "torch_default")
    grown_params = dict(grown.named_parameters())
    assert set(grown_params) - dict(base.named_parameters()).keys() == {"mid.weight", "mid.bias"}
    for name, p in base.named_parameters():
        assert same_bits(p, grown_params[name]), name
    # the same insertion renumbers everything after it in "index" mode: why names are default
    base_i, grown_i = MLP(), MLP(extra=True)
    init_module(base_i, 3, "he", layer_ids="index")
    init_module(grown_i, 3, "he", layer_ids="index")
    assert same_bits(base_i.fc1.weight, grown_i.fc1.weight)
    assert not torch.equal(base_i.head.weight, grown_i.head.weight)


def test_index_ids_are_the_original_tools_numbering() -> None:
    # a norm layer between the Linears must not shift the weights' or the biases' numbering
    model = nn.Sequential(nn.Linear(12, 9), nn.LayerNorm(9), nn.Linear(9, 7), nn.Linear(7, 300))
    plan = init_module(model, 21, "torch_default", layer_ids="index")
    gen = DeterministicNoiseGenerator(21)
    linears = [model[0], model[2], model[3]]
    for k, (lin, prefix) in enumerate(zip(linears, ("0", "2", "3"), strict=True)):
        out_f, in_f = lin.weight.shape
        want_w = gen.init_matrix(k, (out_f, in_f), "torch_default")
        assert np.array_equal(lin.weight.detach().numpy(), want_w), k
        # U(+-1/sqrt(fan_in)) from selector 2 of (2**32 + k, i), computed here element-wise
        bound = 1.0 / math.sqrt(in_f)
        u = gen.u01(2**32 + k, np.arange(out_f), B.SEL_UNIFORM)
        want_b = (-bound + 2 * bound * u).astype(np.float32)
        assert np.array_equal(lin.bias.detach().numpy(), want_b), k
        assert plan.blocks[f"{prefix}.weight"][0].spec.layer_id == k
        assert plan.blocks[f"{prefix}.bias"][0].spec.layer_id == 2**32 + k
    assert float(model[3].bias.detach().abs().max()) > 0.9 / math.sqrt(7)  # really spans the bound
    assert same_bits(model[1].weight, torch.ones(9)) and same_bits(model[1].bias, torch.zeros(9))
    with pytest.raises(ValueError, match=re.escape("layer_ids must be one of ('name', 'index')")):
        init_module(model, layer_ids="position")


# ------------------------------------------------------------------------------ layer types


class Zoo(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(3, 4, 5)
        self.c2 = nn.Conv2d(3, 8, (3, 5))
        self.ct = nn.ConvTranspose2d(3, 64, (2, 4))  # weight (in, out, kh, kw)
        self.emb = nn.Embedding(50, 12)
        self.fc = nn.Linear(12, 6)
        self.ln = nn.LayerNorm(6)
        self.bn = nn.BatchNorm1d(6)
        self.scale = nn.Parameter(torch.full((3,), 7.0))  # bare parameter: not ours to touch
        with torch.no_grad():  # norms and biases start far from what init_module writes
            for name, p in self.named_parameters():
                if name.startswith(("ln", "bn")) or name.endswith("bias"):
                    p.normal_()


def test_conv_kernels_are_addressed_by_all_their_coordinates() -> None:
    model = Zoo()
    plan = init_module(model, 8, "he")
    gen = DeterministicNoiseGenerator(8)
    for name in ("c1.weight", "c2.weight", "ct.weight"):
        w = model.get_submodule(name.split(".")[0]).weight.detach().numpy()
        fan_in = math.prod(w.shape[1:])  # torch's convention: size(1) * receptive field
        assert fan_in == nn.init._calculate_fan_in_and_fan_out(torch.empty(w.shape))[0]
        grids = np.meshgrid(*[np.arange(n) for n in w.shape], indexing="ij")
        want = (math.sqrt(2.0 / fan_in) * gen.gaussian(layer_id_for(name), *grids)).astype(
            np.float32
        )
        assert np.array_equal(w, want), name
        assert same_bits(model.get_parameter(name), spec_tensor(8, name, w.shape, "he"))
        assert plan.shape(name) == w.shape
    assert model.c2.weight.shape == (8, 3, 3, 5)
    for name in ("c1.bias", "c2.bias", "ct.bias", "fc.bias"):  # biases zero by default
        assert same_bits(model.get_parameter(name), torch.zeros_like(model.get_parameter(name)))
        assert plan.blocks[name][0].spec.scheme == "zeros"


def test_zero_mean_conv_is_init_conv_kernel() -> None:
    plain, centred = Zoo(), Zoo()
    init_module(plain, 8, "he")
    init_module(centred, 8, "he", zero_mean_conv=True)
    gen = DeterministicNoiseGenerator(8)
    for name in ("c1.weight", "c2.weight"):
        w = centred.get_parameter(name).detach().numpy()
        assert np.array_equal(w, gen.init_conv_kernel(layer_id_for(name), w.shape, "he"))
        means = w.astype(np.float64).mean(axis=tuple(range(1, w.ndim)))  # one per filter
        assert np.abs(means).max() < 1e-7
        w_plain = plain.get_parameter(name).detach().numpy().astype(np.float64)
        plain_means = w_plain.mean(axis=tuple(range(1, w.ndim)))
        assert np.abs(plain_means).max() > 1e-3  # so centring really did something
        shift = w_plain - w.astype(np.float64)
        np.testing.assert_allclose(
            shift,
            np.broadcast_to(plain_means[(...,) + (None,) * (w.ndim - 1)], shift.shape),
            atol=1e-6,
        )
    assert same_bits(plain.fc.weight, centred.fc.weight)  # Linear and Embedding are not convs
    assert same_bits(plain.emb.weight, centred.emb.weight)


def test_transposed_conv_and_embedding_use_torchs_fan_in() -> None:
    model = Zoo()
    init_module(model, 4, "torch_default")
    # ConvTranspose2d's weight is (in, out, kh, kw): torch's fan_in is out * kh * kw = 512
    fan_in = nn.init._calculate_fan_in_and_fan_out(model.ct.weight)[0]
    assert fan_in == 64 * 8
    bias = model.ct.bias.detach()
    want = spec_tensor(4, "ct.bias", (64,), "torch_default", fan_in=fan_in, fan_out=fan_in)
    assert same_bits(bias, want)
    assert float(bias.abs().max()) <= 1 / math.sqrt(fan_in)
    assert float(bias.abs().max()) > 0.8 / math.sqrt(fan_in) and (bias != 0).all()
    w = model.ct.weight.detach()
    assert float(w.abs().max()) <= 1 / math.sqrt(fan_in)
    # Embedding (num, dim): fan_in = embedding_dim, like torch's _calculate_fan_in_and_fan_out
    he = Zoo()
    init_module(he, 4, "he")
    e = he.emb.weight.detach().numpy()
    gen = DeterministicNoiseGenerator(4)
    rows, cols = np.meshgrid(np.arange(50), np.arange(12), indexing="ij")
    want_e = math.sqrt(2.0 / 12) * gen.gaussian(layer_id_for("emb.weight"), rows, cols)
    assert np.array_equal(e, want_e.astype(np.float32))
    assert e.std() == pytest.approx(math.sqrt(2.0 / 12), rel=0.1)


def test_norms_biases_and_unsupported_parameters() -> None:
    model = Zoo()
    plan = init_module(model, 1, "he")
    for norm in ("ln", "bn"):
        for local, value in (("weight", 1.0), ("bias", 0.0)):
            name = f"{norm}.{local}"
            assert same_bits(model.get_parameter(name), torch.full((6,), value)), name
            assert plan.blocks[name][0].spec.scheme == ("ones" if value else "zeros")
    assert same_bits(model.scale, torch.full((3,), 7.0)) and "scale" not in plan.blocks
    assert set(plan.names()) == {n for n, _ in model.named_parameters()} - {"scale"}

    no_norms = Zoo()
    ln_before = no_norms.ln.weight.detach().clone()
    plan = init_module(no_norms, 1, "he", norms=False)
    assert not any(n.startswith(("ln.", "bn.")) for n in plan.names())
    assert same_bits(no_norms.ln.weight, ln_before)

    no_bias = Zoo()
    fc_bias = no_bias.fc.bias.detach().clone()
    plan = init_module(no_bias, 1, "he", biases=False)
    assert same_bits(no_bias.fc.bias, fc_bias) and "fc.bias" not in plan.blocks
    assert "ln.bias" in plan.blocks  # norm biases follow ``norms``, not ``biases``


class Attention(nn.Module):
    def __init__(self, kdim: int | None = None, vdim: int | None = None) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(32, 4, kdim=kdim, vdim=vdim)


def test_packed_attention_splits_into_q_k_v_blocks() -> None:
    model = Attention()
    plan = init_module(model, 2, "custom")  # std 1/sqrt(fan_in) = 1/sqrt(d_model)
    w = model.attn.in_proj_weight.detach()  # (3E, E)
    blocks = plan.blocks["attn.in_proj_weight"]
    assert [(b.start, b.stop) for b in blocks] == [(0, 32), (32, 64), (64, 96)]
    for k, part in enumerate("qkv"):
        name = f"attn.in_proj_weight.{part}"
        assert blocks[k].spec.layer_id == layer_id_for(name)
        block = w[32 * k : 32 * (k + 1)]
        assert same_bits(block, spec_tensor(2, name, (32, 32), "custom"))
        assert float(block.std()) == pytest.approx(1 / math.sqrt(32), rel=0.1)
    assert not torch.equal(w[:32], w[32:64]) and not torch.equal(w[32:64], w[64:])
    assert plan.shape("attn.in_proj_weight") == (96, 32)
    assert same_bits(plan.initial("attn.in_proj_weight"), w)
    out_w = model.attn.out_proj.weight
    assert same_bits(out_w, spec_tensor(2, "attn.out_proj.weight", (32, 32), "custom"))
    for name in ("attn.in_proj_bias", "attn.out_proj.bias"):
        p = model.get_parameter(name)
        assert name in plan.blocks and same_bits(p, torch.zeros_like(p))


def test_attention_with_separate_key_and_value_dims() -> None:
    model = Attention(kdim=20, vdim=24)
    assert model.attn.in_proj_weight is None
    plan = init_module(model, 2, "custom")
    for part, fan_in in (("q", 32), ("k", 20), ("v", 24)):
        name = f"attn.{part}_proj_weight"
        p = model.get_parameter(name)
        assert p.shape == (32, fan_in)
        assert same_bits(p, spec_tensor(2, name, (32, fan_in), "custom"))
        assert float(p.detach().std()) == pytest.approx(1 / math.sqrt(fan_in), rel=0.15)
        assert len(plan.blocks[name]) == 1


# ------------------------------------------------------------------------------ overrides


class Nested(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 5)
        self.block = nn.Module()
        self.block.other = nn.Linear(5, 5)
        self.block.inner = nn.Module()
        self.block.inner.fc = nn.Linear(5, 4)
        self.block.inner.fc2 = nn.Linear(4, 4)


def test_override_zeroes_one_layer_only() -> None:
    model = MLP()
    plan = init_module(model, 0, "he", overrides={"fc1": "zeros"})
    assert not model.fc1.weight.any() and not model.fc1.bias.any()
    assert plan.blocks["fc1.weight"][0].spec.scheme == "zeros"
    assert same_bits(model.fc2.weight, spec_tensor(0, "fc2.weight", (8, 16), "he"))
    assert same_bits(model.head.weight, spec_tensor(0, "head.weight", (3, 8), "he"))


def test_mapping_override_and_longest_prefix() -> None:
    overrides = {
        "block": "zeros",
        "block.inner": {"scheme": "custom", "std": 0.5},
        "block.inner.fc.weight": "ones",
    }
    for order in (overrides, dict(reversed(overrides.items()))):  # key order does not matter
        model = Nested()
        init_module(model, 9, "xavier", overrides=order)
        assert same_bits(model.fc1.weight, spec_tensor(9, "fc1.weight", (5, 6), "xavier"))
        assert not model.block.other.weight.any()
        assert same_bits(model.block.inner.fc.weight, torch.ones(4, 5))
        want = spec_tensor(9, "block.inner.fc2.weight", (4, 4), "custom", params={"std": 0.5})
        assert same_bits(model.block.inner.fc2.weight, want)


def test_override_reaches_norm_layers_and_ignores_unsupported_parameters() -> None:
    class WithNorm(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.ln = nn.LayerNorm(4)
            self.extra = nn.Parameter(torch.full((3,), 7.0))  # not a supported layer's

    model = WithNorm()
    plan = init_module(model, 0, "he", overrides={"ln": {"scheme": "constant", "value": 0.5}})
    assert torch.equal(model.ln.weight, torch.full((4,), 0.5))
    assert torch.equal(plan.initial("ln.bias"), torch.full((4,), 0.5))
    with pytest.raises(
        ValueError,
        match=r"^init override\(s\) \['extra'\] matched no parameter; names look like fc.weight",
    ):
        init_module(WithNorm(), 0, "he", overrides={"extra": "zeros"})


def test_override_matching_nothing_is_refused_with_the_module_untouched() -> None:
    model = MLP()
    before = copy.deepcopy(model.state_dict())
    # prefixes match whole dotted components: "fc" is not a prefix of "fc1"
    with pytest.raises(ValueError) as err:
        init_module(model, 0, "he", overrides={"fc": "zeros", "fc9.weight": "ones"})
    assert str(err.value) == (
        "init override(s) ['fc', 'fc9.weight'] matched no parameter; names look like "
        "fc1.weight, fc1.bias, fc2.weight, fc2.bias"
    )
    for name, value in model.state_dict().items():
        assert same_bits(value, before[name]), name
    with pytest.raises(ValueError, match="unknown init scheme 'hee'"):
        init_module(model, 0, "he", overrides={"fc2": "hee"})
    for name, value in model.state_dict().items():
        assert same_bits(value, before[name]), name


def test_bad_schemes_and_lsuv_without_a_batch() -> None:
    with pytest.raises(ValueError) as err:
        init_module(MLP(), 0, "hee")
    assert str(err.value) == (
        f"unknown init scheme 'hee'; choose one of: {', '.join(schemes.names())} "
        "(or 'lsuv' for modules)"
    )
    assert "xavier_uniform" in str(err.value) and "torch_default" in str(err.value)
    with pytest.raises(ValueError) as err:
        init_module(MLP(), 0, "lsuv")
    assert str(err.value) == (
        "init scheme 'lsuv' is data-dependent: pass lsuv_batch=<an input batch>"
    )
    with pytest.raises(ValueError, match=re.escape("needs a 'scheme' key, got ['std']")):
        init_module(MLP(), 0, overrides={"fc1": {"std": 0.1}})
    with pytest.raises(ValueError, match=re.escape("takes parameters [std], got ['gain']")):
        init_module(MLP(), 0, "custom", params={"gain": 2.0})


# ------------------------------------------------------------------------------ MNIST


@pytest.fixture(scope="module")
def mnist() -> tuple[torch.Tensor, torch.Tensor]:
    x, y = load_tensors("mnist")
    n = 2000
    return x[:n].reshape(n, -1).to(torch.float32) / 255.0, y[:n]  # (n, 784), (n,)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(784, 64)
        self.ln = nn.LayerNorm(64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.ln(self.fc1(x))))


SEED = 7


def initial_of(name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """Net's initial value under ``init_module(net, SEED, "he")``, rebuilt independently."""
    if name == "ln.weight":
        return torch.ones(shape)
    if name.endswith("bias"):
        return torch.zeros(shape)
    return spec_tensor(SEED, name, shape, "he")


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, seed: int = 0) -> float:
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)  # no weight decay: zero grad = no move
    order = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (64,), generator=order)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loss.item()


@pytest.fixture(scope="module")
def trained(mnist: tuple[torch.Tensor, torch.Tensor]) -> tuple[Net, InitPlan]:
    x, y = mnist
    model = Net()
    plan = init_module(model, SEED, "he")
    train(model, x, y, 300)
    with torch.no_grad():
        assert float((model(x).argmax(1) == y).float().mean()) > 0.85  # it really trained
    return model, plan


def numpy_deltas(model: nn.Module) -> dict[str, np.ndarray]:
    return {
        name: np.abs(
            p.detach().numpy().astype(np.float64)
            - initial_of(name, tuple(p.shape)).numpy().astype(np.float64)
        )
        for name, p in model.named_parameters()
    }


def test_analysis_equals_an_independent_numpy_recomputation(trained) -> None:
    model, plan = trained
    table = analyze_module(model, plan, THRESHOLDS)
    deltas = numpy_deltas(model)
    assert table["name"].tolist() == [*deltas, "__total__"]
    everything = np.concatenate([d.reshape(-1) for d in deltas.values()])
    for name, delta in [*deltas.items(), ("__total__", everything)]:
        row = table.set_index("name").loc[name]
        assert row["numel"] == delta.size
        assert row["max_delta"] == delta.max()
        assert row["mean_delta"] == pytest.approx(delta.mean(), rel=1e-9)
        for t in THRESHOLDS:
            changed = int((delta > t).sum())
            assert row[f"changed@{t:g}"] == changed, (name, t)
            assert row[f"awake_pct@{t:g}"] == pytest.approx(100.0 * changed / delta.size, 1e-12)
    assert table.iloc[-1]["numel"] == sum(p.numel() for p in model.parameters())
    for t in THRESHOLDS:  # the total row is the sum of the rows above it
        assert table.iloc[-1][f"changed@{t:g}"] == table.iloc[:-1][f"changed@{t:g}"].sum()
    row = table.set_index("name").loc["fc1.weight"]
    assert row["layer_id"] == str(layer_id_for("fc1.weight")) and row["shape"] == "64x784"


def test_analysis_is_the_same_from_a_state_dict_and_in_small_chunks(trained) -> None:
    model, plan = trained
    table = analyze_module(model, plan, THRESHOLDS)
    pd.testing.assert_frame_equal(analyze_module(model.state_dict(), plan, THRESHOLDS), table)
    small = analyze_module(model, plan, THRESHOLDS, chunk_elems=1000)
    floats = ["mean_delta"]  # a sum: chunking changes only the order of the additions
    pd.testing.assert_frame_equal(small.drop(columns=floats), table.drop(columns=floats))
    np.testing.assert_allclose(small["mean_delta"], table["mean_delta"], rtol=1e-12)
    first = [c for _, c in param_deltas(model, plan, "fc1.weight", chunk_elems=1000)]
    assert max(c.size for c in first) <= 1000 and sum(c.size for c in first) == 64 * 784


def test_quantiles_are_within_one_histogram_bin(trained) -> None:
    model, plan = trained
    qs = (0.1, 0.5, 0.9)
    table = analyze_module(model, plan, quantiles=qs).set_index("name")
    bin_ratio = 10 ** (1 / 8)
    deltas = numpy_deltas(model)
    deltas["__total__"] = np.concatenate([d.reshape(-1) for d in deltas.values()])
    for name, delta in deltas.items():
        for q in qs:
            got = table.loc[name, f"q{round(q * 100):02d}_delta"]
            # The order statistic at rank ceil(q * n) lies in the bin the estimate comes from,
            # for any n. numpy's default (linear) interpolates between two order statistics,
            # which in a tiny tensor can sit bins apart (fc2.bias, 10 values: a ratio of 0.19
            # at q=0.1), so that comparison is made where the statistics are dense.
            methods = ["inverted_cdf"] + (["linear"] if delta.size >= 500 else [])
            for method in methods:
                want = np.quantile(delta, q, method=method)
                if want == 0:
                    assert got == 0.0, (name, q, method)
                else:
                    assert want / bin_ratio <= got <= want * bin_ratio, (name, q, method, got)
    # fc1's columns under always-blank pixels never move: an exact zero mass in its deltas
    x_dead = deltas["fc1.weight"] == 0
    zero_share = x_dead.mean()
    assert 0.1 < zero_share < 0.5
    assert table.loc["fc1.weight", "q10_delta"] == 0.0
    stats = DeltaStats((0.0,))
    stats.add(deltas["fc1.weight"])
    assert stats.zeros == int(x_dead.sum())
    assert stats.quantile(zero_share * 0.99) == 0.0
    assert stats.quantile(zero_share + 0.01) > 0.0
    assert stats.quantile(1.0) == deltas["fc1.weight"].max()
    with pytest.raises(ValueError, match=re.escape("quantile must be in [0, 1], got 1.5")):
        stats.quantile(1.5)


@pytest.mark.parametrize("scheme", ["he", "orthogonal"])
def test_bfloat16_weights_at_init_are_unchanged_for_every_reader(scheme: str) -> None:
    # w0 is regenerated in bfloat16 for bfloat16 weights on every path: the fused summary
    # (he), the whole-matrix one (orthogonal), the masks and the per-parameter deltas
    model = nn.Sequential(nn.Linear(16, 8), nn.Linear(8, 4)).to(torch.bfloat16)
    plan = init_module(model, 0, scheme)
    table = analyze_module(model, plan, (0.0,))
    assert table["changed@0"].tolist() == [0] * 5
    assert all(int(m.sum()) == 0 for m in awakened_masks(model, plan, 0.0).values())
    for name in plan.blocks:
        assert all(float(d.max()) == 0.0 for _, d in param_deltas(model, plan, name))
    with torch.no_grad():
        model[0].weight[0, 0] += 1.0
    assert analyze_module(model, plan, (0.0,))["changed@0"].tolist()[:2] == [1, 0]


def test_a_repeated_threshold_is_counted_once() -> None:
    model = nn.Linear(8, 4)
    plan = init_module(model, 0, "he")
    with torch.no_grad():
        model.weight[0] += 1.0
    table = analyze_module(model, plan, (1e-5, 0.0, 1e-5))
    assert [c for c in table.columns if c.startswith("changed@")] == ["changed@1e-05", "changed@0"]
    assert table.set_index("name").loc["weight", "awake_pct@1e-05"] == 100 * 8 / 32


# ------------------------------------------------------------------------------ memory


def numpy_peak(fn: Any) -> tuple[Any, int]:
    """``(fn(), peak bytes of Python/numpy allocations during the call)`` (tracemalloc)."""
    tracemalloc.start()
    try:
        probe = np.empty(1 << 20, dtype=np.uint8)  # numpy's buffers are traced: not vacuous
        assert tracemalloc.get_traced_memory()[0] >= 1 << 20
        del probe
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        result = fn()
        return result, tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()


def test_chunked_analysis_memory_is_bounded_by_the_chunk() -> None:
    chunk = 1 << 18
    layer = nn.Linear(4096, 4096, bias=False)  # 16.8M float32 weights (64 MiB; torch, untraced)
    plan = init_module(layer, 3, "he")
    with torch.no_grad():
        layer.weight[::7].add_(1e-3)  # 586 rows moved, every element of them by far > 1 ulp
    table, peak = numpy_peak(lambda: analyze_module(layer, plan, (0.0,), chunk_elems=chunk))
    assert table.loc[0, "changed@0"] == 586 * 4096 and table.loc[0, "numel"] == 4096**2
    # Measured: ~7.0 MiB at 1 << 18 (about 28 bytes per chunk element: float32 w0, float64
    # copies of w and w0, the float64 delta and its masks), against 128 MiB for a whole
    # float64 w0; the bound leaves room for a second copy of the delta.
    assert peak < 60 * chunk + (1 << 20)
    assert peak < 20 * 2**20


def test_analysis_of_100m_parameters_stays_within_the_chunk() -> None:
    # the scale: a stack of Linear(4096, 4096) holding 100.7M float32 weights
    # (403 MiB, allocated by torch and untraced), built on meta and materialized by our init
    with torch.device("meta"):
        model = nn.Sequential(*[nn.Linear(4096, 4096, bias=False) for _ in range(6)])
    plan = init_module(model, 5, "he", device="cpu")
    with torch.no_grad():
        for k, layer in enumerate(model):
            layer.weight[k::3].add_(1e-3)  # a third of each layer's rows, far above 1 ulp
    table, peak = numpy_peak(lambda: analyze_module(model, plan, (0.0, 1e-2)))
    moved = [len(range(k, 4096, 3)) * 4096 for k in range(6)]
    layers = table.set_index("name")
    assert layers["numel"].tolist() == [4096**2] * 6 + [6 * 4096**2]  # the __total__ row last
    assert layers["changed@0"].tolist() == moved + [sum(moved)]
    assert layers["changed@0.01"].tolist() == [0] * 7
    # Measured 0.3 MiB (the fused kernel holds one tile per thread), against 400 MiB for a
    # regenerated float32 w0 and 40 MiB for one default chunk of the unfused path.
    assert peak < 8 * 2**20


# ------------------------------------------------------------------------------ LSUV


class Conv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 5, stride=2)  # (4, 12, 12) out
        self.fc1 = nn.Linear(4 * 12 * 12, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv(x.reshape(-1, 1, 28, 28))).flatten(1)
        return self.fc2(F.relu(self.fc1(x)))


def test_lsuv_is_deterministic_unit_variance_and_regenerable(mnist) -> None:
    batch = mnist[0][:256]
    a, b = Conv(), Conv()
    plan_a = init_module(a, 6, "lsuv", lsuv_batch=batch)
    plan_b = init_module(b, 6, "lsuv", lsuv_batch=batch.clone())
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        assert same_bits(pa, pb), name
    assert plan_a.fingerprint() == plan_b.fingerprint() and plan_a == plan_b

    outputs: dict[str, torch.Tensor] = {}
    for name in ("conv", "fc1", "fc2"):
        a.get_submodule(name).register_forward_hook(
            lambda _m, _i, out, n=name: outputs.__setitem__(n, out)
        )
    with torch.no_grad():
        a(batch)
    for name in ("conv", "fc1", "fc2"):
        assert float(outputs[name].double().var()) == pytest.approx(1.0, abs=0.05), name
        wname = f"{name}.weight"
        spec = plan_a.blocks[wname][0].spec
        assert spec.scheme == "orthogonal" and spec.scale != 1.0
        w = a.get_parameter(wname)
        want = generate_tensor(
            TensorInit(6, layer_id_for(wname), tuple(w.shape), "orthogonal", scale=spec.scale)
        )
        assert same_bits(w, want)
        assert same_bits(plan_a.initial(wname), w)
    rows = a.fc1.weight.detach().double() / plan_a.blocks["fc1.weight"][0].spec.scale
    torch.testing.assert_close(rows @ rows.T, torch.eye(32, dtype=torch.float64), atol=1e-5, rtol=0)
    other = init_module(Conv(), 6, "lsuv", lsuv_batch=mnist[0][256:512])
    assert other.blocks["fc1.weight"][0].spec.scale != plan_a.blocks["fc1.weight"][0].spec.scale


# ------------------------------------------------------------------------------ InitPlan


def plain_types_only(value: Any) -> bool:
    if isinstance(value, dict):
        return all(isinstance(k, str) and plain_types_only(v) for k, v in value.items())
    if isinstance(value, list):
        return all(plain_types_only(v) for v in value)
    return value is None or type(value) in (str, int, float, bool)


def test_plan_round_trips_through_json(mnist) -> None:
    model, lsuv = nn.Sequential(Zoo(), Attention(), Conv()), Conv()
    overrides = {"1": {"scheme": "custom", "std": 0.02}}
    for module, plan in (
        (model, init_module(model, 13, "torch_default", overrides=overrides)),
        (lsuv, init_module(lsuv, 13, "lsuv", lsuv_batch=mnist[0][:64])),
    ):
        d = plan.to_dict()
        assert plain_types_only(d)
        back = InitPlan.from_dict(json.loads(json.dumps(d)))
        assert back == plan and back.fingerprint() == plan.fingerprint()
        state = plan.initial_state()
        assert list(state) == plan.names()
        for name, value in state.items():
            assert same_bits(value, module.get_parameter(name)), name


def test_fingerprint_tracks_seed_and_scheme() -> None:
    prints = {}
    for seed, scheme in [(0, "he"), (1, "he"), (0, "xavier")]:
        prints[seed, scheme] = init_module(MLP(), seed, scheme).fingerprint()
    assert len(set(prints.values())) == 3
    assert init_module(MLP(), 0, "he").fingerprint() == prints[0, "he"]


# ------------------------------------------------------------------------------ masks, rewind


def test_awakened_masks_equal_the_recomputed_threshold(trained) -> None:
    model, plan = trained
    deltas = numpy_deltas(model)
    for t in (0.0, 1e-3):
        masks = awakened_masks(model, plan, t, chunk_elems=1000)
        assert list(masks) == plan.names()
        for name, mask in masks.items():
            assert mask.dtype == torch.bool
            assert np.array_equal(mask.numpy(), deltas[name] > t), (name, t)


def test_rewind_all_or_only_masked(trained) -> None:
    model, plan = trained
    full = copy.deepcopy(model)
    rewind(full, plan)
    for name, p in full.named_parameters():
        assert same_bits(p, initial_of(name, tuple(p.shape))), name

    part = copy.deepcopy(model)
    masks = awakened_masks(model, plan, 1e-3)
    masks.pop("fc2.bias")  # a parameter without a mask rewinds whole
    rewind(part, plan, masks)
    for name, p in part.named_parameters():
        w0, trained_w = initial_of(name, tuple(p.shape)), model.get_parameter(name).detach()
        m = masks.get(name, torch.ones(p.shape, dtype=torch.bool))
        assert 0 < int(m.sum()) and same_bits(p.detach(), torch.where(m, w0, trained_w)), name
    assert not masks["fc1.weight"].all()


def test_pruned_model_is_analysed_masked_and_rewinds_its_orig(trained, mnist) -> None:
    model, plan = trained
    pruned = copy.deepcopy(model)
    prune.l1_unstructured(pruned.fc1, "weight", amount=0.3)
    train(pruned, *mnist, steps=5, seed=1)  # weight_orig moved since the last forward
    mask = pruned.fc1.weight_mask.detach().clone()
    effective = pruned.fc1.weight_orig.detach() * mask
    w0 = initial_of("fc1.weight", (64, 784))
    want = np.abs(effective.double().numpy() - w0.double().numpy())

    table = analyze_module(pruned, plan, THRESHOLDS).set_index("name")
    pd.testing.assert_frame_equal(
        table, analyze_module(pruned.state_dict(), plan, THRESHOLDS).set_index("name")
    )
    assert table.loc["fc1.weight", "changed@0"] == int((want > 0).sum())
    assert table.loc["fc1.weight", "max_delta"] == want.max()
    awake = awakened_masks(pruned, plan, 1e-4)["fc1.weight"]
    assert np.array_equal(awake.numpy(), want > 1e-4)

    rewind(pruned, plan)
    assert same_bits(pruned.fc1.weight_orig, w0)
    assert same_bits(pruned.fc1.weight_mask, mask)  # the pruning survives the rewind
    assert same_bits(pruned.fc2.weight, initial_of("fc2.weight", (10, 64)))
    after = analyze_module(pruned, plan, (0.0,)).set_index("name")
    assert after.loc["fc1.weight", "changed@0"] == int(((mask == 0) & (w0 != 0)).sum())
    with torch.no_grad():
        pruned(mnist[0][:2])  # the forward hook recomputes weight = weight_orig * weight_mask
    assert same_bits(pruned.fc1.weight, w0 * mask)


def test_param_deltas_errors(trained) -> None:
    model, plan = trained
    with pytest.raises(ValueError) as err:
        list(param_deltas(MLP(), plan, "ln.weight"))
    assert str(err.value) == (
        "parameter 'ln.weight' of the init plan is missing from the model/state dict"
    )
    state = {**model.state_dict(), "fc2.weight": torch.zeros(10, 63)}
    with pytest.raises(ValueError) as err:
        list(param_deltas(state, plan, "fc2.weight"))
    assert str(err.value) == "fc2.weight: shape (10, 63) does not match its init plan (10, 64)"
    with pytest.raises(ValueError, match="analyze needs an nn.Module or a state dict, got list"):
        analyze_module([], plan)
