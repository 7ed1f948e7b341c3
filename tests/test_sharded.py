"""Sharded parameters (DTensor: FSDP2, tensor parallel, FSDP x TP) and meta-device models get
the same initial weights, the same analysis and the same rewind as one process on whole
tensors.

The torchrun tests run ``tests/_sharded_worker.py`` once per world size (1, 2, 3, 4; gloo on
the CPU), which saves everything sharded after gathering it with ``full_tensor()``; each test
here recomputes the same thing on plain tensors in this process and compares: weights bit for
bit, counts and histogram bins exactly.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _sharded_worker import SCHEME_PARAMS, SEED, THRESHOLDS, FsdpNet, TpNet, per_element_schemes
from torch import nn

from cdi_experiments.generator.core import DEFAULT_CHUNK_ELEMS
from cdi_experiments.modules import (
    DELTA_EDGES,
    DeltaStats,
    InitPlan,
    RecordedPlan,
    analyze_module,
    awakened_masks,
    delta_stats,
    init_module,
    rewind,
)
from cdi_experiments.modules.analysis import param_deltas

WORKER = Path(__file__).with_name("_sharded_worker.py")
WORLD_SIZES = (1, 2, 3, 4)


def bits(t: torch.Tensor) -> torch.Tensor:
    """Raw bits, so NaNs compare equal to themselves (other dtypes as they are)."""
    if not t.is_floating_point():
        return t
    return t.detach().contiguous().view(torch.int32 if t.element_size() == 4 else torch.int64)


def assert_same_tensors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(want)
    for name in want:
        assert got[name].shape == want[name].shape, name
        assert torch.equal(bits(got[name]), bits(want[name])), name


def plain_net(layout: str) -> nn.Module:
    return FsdpNet() if layout.startswith("fsdp") else TpNet()


def loaded(layout: str, state: dict[str, torch.Tensor]) -> nn.Module:
    net = plain_net(layout)
    net.load_state_dict(state, strict=False)  # parameters only (LayerNorm has no buffers)
    return net


# ----------------------------------------------------------------------------- one process


def _meta_and_eager(build, **kw) -> tuple[nn.Module, nn.Module]:
    eager = build()
    with torch.device("meta"):
        meta = build()
    init_module(eager, SEED, **kw)
    init_module(meta, SEED, device="cpu", **kw)
    return meta, eager


@pytest.mark.parametrize("scheme", [*per_element_schemes(), "orthogonal"])
def test_meta_device_init_equals_eager_init(scheme: str) -> None:
    def build() -> nn.Module:
        return nn.Sequential(FsdpNet(), nn.BatchNorm1d(4))

    torch.manual_seed(0)
    meta, eager = _meta_and_eager(build, scheme=scheme, params=SCHEME_PARAMS.get(scheme))
    assert not any(t.is_meta for t in [*meta.parameters(), *meta.buffers()])
    assert_same_tensors(dict(meta.named_parameters()), dict(eager.named_parameters()))
    # running statistics: their constants, not the uninitialized memory to_empty gave
    assert_same_tensors(dict(meta.named_buffers()), dict(eager.named_buffers()))


def test_meta_device_init_refuses_what_it_cannot_fill() -> None:
    class Extra(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 2)
            self.scale = nn.Parameter(torch.ones(2))  # no init_module rule covers it

    with torch.device("meta"):
        net, lin = Extra(), nn.Linear(3, 2)
    with pytest.raises(ValueError, match=r"^parameter 'scale' is on the meta device and "):
        init_module(net, device="cpu")
    assert net.fc.weight.is_meta  # refused before materializing anything
    with pytest.raises(ValueError, match=r"^'weight' is on the meta device: pass init_module"):
        init_module(lin)
    with pytest.raises(ValueError, match=r"^parameter 'bias' is on the meta device .*biases=False"):
        init_module(lin, biases=False, device="cpu")
    mixed = nn.Sequential(nn.Linear(3, 2))
    with torch.device("meta"):
        mixed.append(nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"partly on the meta device \('1.weight'\) and partly"):
        init_module(mixed, device="cpu")


def test_plain_analysis_equals_independent_recount() -> None:
    """The chunked, fused path on whole tensors counts what DeltaStats.add counts from
    deltas taken against ``plan.initial`` (one whole regeneration per parameter)."""
    torch.manual_seed(3)
    net = FsdpNet()
    plan = init_module(net, SEED, "he", zero_mean_conv=True)
    with torch.no_grad():
        for p in net.parameters():
            p.add_((torch.rand(p.shape) < 0.4) * torch.randn(p.shape) * 1e-3)
    got = delta_stats(net, plan, THRESHOLDS, chunk_elems=37)
    total = DeltaStats(THRESHOLDS)
    for name, p in net.named_parameters():
        want = DeltaStats(THRESHOLDS)
        delta = (p.detach().double() - plan.initial(name).double()).abs().numpy()
        want.add(delta)
        total.add(delta)
        assert (got[name].total, got[name].zeros, got[name].changed) == (
            want.total,
            want.zeros,
            want.changed,
        ), name
        assert np.array_equal(got[name].hist, want.hist), name
        assert got[name].max == want.max
        assert got[name].total_sum == pytest.approx(want.total_sum, rel=1e-12)
    assert got["__total__"].changed == total.changed
    assert got[next(iter(plan.names()))].hist.sum() > 0  # the weights did move


# ----------------------------------------------------------------------------- torchrun


@pytest.fixture(scope="module", params=WORLD_SIZES, ids=lambda n: f"world{n}")
def sharded(request, tmp_path_factory) -> dict:
    """What the worker gathered at one world size."""
    world = request.param
    out = tmp_path_factory.mktemp(f"sharded{world}")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += [f"--nproc-per-node={world}", str(WORKER), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(out / f"world{world}.pt", weights_only=False)


@pytest.mark.integration
def test_sharded_init_equals_single_process_init(sharded: dict) -> None:
    world = sharded["world"]
    assert sharded["layouts"] == ["fsdp", "fsdp_meta", "tp"] + (["2d", "2d_meta"] * (world == 4))
    schemes_seen = {k.split("/")[1] for k in sharded["init"] if k.startswith("fsdp/")}
    assert schemes_seen == {*per_element_schemes(), "orthogonal"}
    for key, gathered in sharded["init"].items():
        layout, scheme, zero_mean = key.split("/")
        torch.manual_seed(123)
        ref = plain_net(layout)
        init_module(
            ref,
            SEED,
            scheme,
            params=SCHEME_PARAMS.get(scheme),
            zero_mean_conv=bool(int(zero_mean)),
        )
        assert_same_tensors(gathered, dict(ref.named_parameters()))
    placements = sharded["placements"]
    if world > 1:  # the layouts really are sharded as the test means them to be
        assert placements["fsdp"]["fc1.weight"] == "(Shard(dim=0),)"
        assert placements["tp"]["row.weight"] == "(Shard(dim=1),)"
        assert placements["tp"]["row.bias"] == "(Replicate(),)"
    if world == 4:
        assert placements["2d"]["col.weight"].startswith("(_StridedShard(dim=0")
        assert placements["2d"]["row.bias"] == "(Shard(dim=0), Replicate())"


@pytest.mark.integration
def test_lsuv_on_a_dtensor_is_refused_with_its_name(sharded: dict) -> None:
    assert sharded["lsuv_error"] == (
        "init scheme 'lsuv' needs whole weights and forward passes, but 'conv.weight' is a "
        "sharded DTensor; initialize before sharding or use a per-element scheme"
    )


@pytest.mark.integration
def test_naive_per_rank_torch_init_is_not_world_size_invariant(sharded: dict) -> None:
    """The issue's counterexample, to show the comparison above can fail: a meta Linear,
    fully_shard, to_empty, manual_seed(0), reset_parameters."""
    with torch.device("meta"):
        ref = nn.Linear(64, 32)
    ref.to_empty(device="cpu")
    torch.manual_seed(0)
    ref.reset_parameters()
    same = torch.equal(sharded["naive_torch"]["weight"], ref.weight.detach())
    assert same == (sharded["world"] == 1)


def _stats_equal(got: dict, want: DeltaStats, what: str) -> None:
    assert (got["total"], got["zeros"], got["nan"]) == (want.total, want.zeros, want.nan), what
    assert got["changed"] == [want.changed[t] for t in THRESHOLDS], what
    assert np.array_equal(got["hist"].numpy(), want.hist), what
    assert got["max"] == want.max, what
    assert got["total_sum"] == pytest.approx(want.total_sum, rel=1e-12, abs=1e-300), what


@pytest.mark.integration
def test_sharded_analysis_masks_and_rewind_equal_single_process(sharded: dict) -> None:
    world = sharded["world"]
    for key, case in sharded["analysis"].items():
        layout = key.split("/")[0]
        plan = InitPlan.from_dict(case["plan"])
        state = case["perturbed"]
        moved = "fc1.weight" if "fc1.weight" in state else "col.weight"
        assert not torch.equal(bits(state[moved]), bits(case["initial"][moved]))
        # statistics: one process over the gathered weights
        want = delta_stats(state, plan, THRESHOLDS, chunk_elems=1 << 20)
        for name in [*plan.names(), "__total__"]:
            _stats_equal(case["stats"][name], want[name], f"{key} {name}")
        assert sum(want[n].nan for n in plan.names()) == 1
        assert sum(want[n].hist.sum() for n in plan.names()) > 100
        # the table (quantiles come from the reduced histograms: exact too)
        table = analyze_module(state, plan, THRESHOLDS)
        for col, values in case["table"].items():
            if col == "mean_delta":
                assert values == pytest.approx(table[col].tolist(), rel=1e-12), key
            else:
                assert values == table[col].tolist(), f"{key} {col}"
        # a replicated shard is counted once: a plain sum over ranks would not be
        for name in plan.names():
            assert case["stats"][name]["total"] == state[name].numel()
        if world > 1 and layout == "tp":
            assert case["naive_counts"]["row.bias"] == world * state["row.bias"].numel()
        if layout.startswith("2d"):  # FSDP over dp only: each tp peer holds a copy
            assert case["naive_counts"]["norm.weight"] == 2 * state["norm.weight"].numel()
        # masks: DTensors laid out like their parameters, gathering to the whole mask
        masks = awakened_masks(state, plan, 1e-4)
        assert_same_tensors(case["masks"], masks)
        assert all(case["mask_is_dtensor"].values()) or layout == "tp"
        # the pruning Mask wants whole masks, and says how to get them
        first = next(n for n, d in case["mask_is_dtensor"].items() if d)
        assert case["mask_error"] == (
            f"mask for {first!r} is a sharded DTensor; pass mask.full_tensor() (on every "
            "rank), or build masks from a full state dict"
        )
        # rewind: survivors back to w0 under the mask, then everything
        ref = loaded(layout, state)
        rewind(ref, plan, masks)
        assert_same_tensors(case["rewound_masked"], dict(ref.named_parameters()))
        assert_same_tensors(case["rewound"], case["initial"])
        if "recorded_plan" in case:
            recorded = RecordedPlan(case["recorded_plan"])
            want = delta_stats(case["recorded_perturbed"], recorded, THRESHOLDS)
            for name in [*recorded.names(), "__total__"]:
                _stats_equal(case["recorded_stats"][name], want[name], f"recorded {name}")


@pytest.mark.integration
def test_sharded_init_memory_is_one_chunk(sharded: dict) -> None:
    """Init of a 4096 x 4096 FSDP2 weight: extra memory is one generation chunk (float32
    values plus row states), not the local shard and not the whole tensor."""
    rows = [len(c) for c in torch.arange(4096).chunk(sharded["world"])]  # FSDP2's split
    for rank, n in zip(sharded["memory"], rows, strict=True):
        assert rank["local_bytes"] == n * 4096 * 4
        assert rank["traced_peak_bytes"] <= 8 * rank["chunk_elems"] + (1 << 20)
        assert rank["traced_peak_bytes"] < rank["local_bytes"] // 2


def test_param_deltas_refuses_a_shape_mismatch() -> None:
    plan = init_module(nn.Linear(3, 2), SEED)
    with pytest.raises(ValueError, match=r"^weight: shape \(3, 3\) does not match its init plan"):
        list(param_deltas({"weight": torch.zeros(3, 3)}, plan, "weight"))
    assert DELTA_EDGES[0] == 0.0


@pytest.mark.parametrize("scheme", ["he", "uniform", "torch_default"])
def test_chunked_init_of_a_tensor_larger_than_a_chunk_equals_whole_generation(
    scheme: str,
) -> None:
    """init_module writes a tensor of more than one generation chunk in row chunks; the
    result equals generating it whole (InitPlan.initial: one generate call, no index)."""
    net = nn.Linear(700, 2000)  # 1.4M weights: two chunks
    assert net.weight.numel() > DEFAULT_CHUNK_ELEMS
    plan = init_module(net, SEED, scheme)
    assert torch.equal(net.weight.detach(), plan.initial("weight"))
