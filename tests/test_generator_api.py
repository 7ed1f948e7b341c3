"""The generator's public API: ``DeterministicNoiseGenerator``, blocks of tensors, the analysis
of trained weights, and every bad input with its message.

Properties, not recorded outputs: a single weight equals its element of the matrix, any block
equals the same block of the whole (bitwise), and the analysis numbers equal an independent
numpy recomputation on a really trained model (MNIST, Adam), in which input pixels that are
zero in every training image provably leave their first-layer columns bit-for-bit unchanged.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cdi_experiments.datasets import load_tensors
from cdi_experiments.generator import bits as B
from cdi_experiments.generator import core, schemes
from cdi_experiments.generator.facade import DEFAULT_THRESHOLD, DeterministicNoiseGenerator


def same_bits(a: Any, b: Any) -> bool:
    """Bitwise equality of two float arrays (shape and dtype included)."""
    a, b = np.ascontiguousarray(np.asarray(a)), np.ascontiguousarray(np.asarray(b))
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    ints = {2: np.int16, 4: np.int32, 8: np.int64}[a.dtype.itemsize]
    return bool(np.array_equal(a.view(ints), b.view(ints)))


# ------------------------------------------------------------------------------ primitives


def test_identity_repr_version() -> None:
    gen = DeterministicNoiseGenerator(2**64 - 1)
    assert gen.seed == 2**64 - 1
    assert gen.identity() == {"seed": 2**64 - 1, "generator_version": B.GENERATOR_VERSION}
    assert repr(gen) == f"DeterministicNoiseGenerator(seed={2**64 - 1}, version=1)"
    assert DeterministicNoiseGenerator().seed == 42


def test_u01_and_gaussian_scalars_are_the_reference() -> None:
    gen = DeterministicNoiseGenerator(9)
    for idx in [(0,), (0, 0), (3, 1, 4, 1, 5), (2**64 - 1, 2**63)]:
        g, u = gen.gaussian(*idx), gen.u01(*idx)
        assert isinstance(g, float) and isinstance(u, float)
        assert g == B.gaussian(9, *idx) and u == B.u01(9, *idx)
        assert 0.0 <= u < 1.0
    assert gen.gaussian(np.uint64(3), np.int32(4)) == B.gaussian(9, 3, 4)  # numpy ints: scalar


def test_u01_and_gaussian_arrays_broadcast() -> None:
    gen = DeterministicNoiseGenerator(9)
    i = np.arange(4).reshape(4, 1, 1)
    j = np.arange(3).reshape(1, 3, 1)
    k = np.array([0, 2**63, 2**64 - 1], dtype=np.uint64).reshape(1, 1, 3)
    g, u = gen.gaussian(7, i, j, k), gen.u01(7, i, j, k)
    assert g.shape == u.shape == (4, 3, 3) and g.dtype == u.dtype == np.float64
    for a, b, c in np.ndindex(4, 3, 3):
        assert g[a, b, c] == B.gaussian(9, 7, a, b, int(k.flat[c]))
        assert u[a, b, c] == B.u01(9, 7, a, b, int(k.flat[c]))
    assert gen.gaussian(np.array(5)).shape == ()  # 0-d arrays stay 0-d
    assert gen.gaussian([1, 2]).tolist() == [B.gaussian(9, 1), B.gaussian(9, 2)]


# ------------------------------------------------------------------------------ tensors

WEIGHT_SCHEMES = [
    ("he", {}),
    ("xavier", {}),
    ("custom", {"std": 0.3}),
    ("he_uniform", {}),
    ("torch_default", {}),
    ("uniform", {"low": -2.0, "high": 3.0}),
    ("constant", {"value": 0.3}),
    ("zeros", {}),
    ("ones", {}),
]


@pytest.mark.parametrize("mode,params", WEIGHT_SCHEMES, ids=[m for m, _ in WEIGHT_SCHEMES])
def test_init_weight_equals_its_matrix_element(mode: str, params: dict[str, float]) -> None:
    gen = DeterministicNoiseGenerator(31)
    out_f, in_f = 7, 5  # torch layout: element (i, j) has fan_in = 5, fan_out = 7
    m = gen.init_matrix(4, (out_f, in_f), mode, dtype=np.float64, **params)
    for i, j in np.ndindex(out_f, in_f):
        assert gen.init_weight(4, i, j, in_f, out_f, mode, **params) == m[i, j]
    draw = schemes.resolve(mode, in_f, out_f, params)
    if draw.kind == "normal":
        assert m[2, 3] == draw.std * B.gaussian(31, 4, 2, 3)
    elif draw.kind == "uniform":
        assert m[2, 3] == draw.low + (draw.high - draw.low) * B.u01(31, 4, 2, 3, B.SEL_UNIFORM)


def test_init_matrix_layout_and_dtypes() -> None:
    gen = DeterministicNoiseGenerator(42)
    m64 = gen.init_matrix(0, (20, 10), "he", dtype=np.float64)  # (out, in): fan_in = 10
    assert m64[3, 4] == math.sqrt(2 / 10) * B.gaussian(42, 0, 3, 4)
    assert gen.init_matrix(0, (20, 10)).dtype == np.float32  # default
    for dt in (np.float16, np.float32, "float32", torch.float32, torch.float64):
        m = gen.init_matrix(0, (20, 10), "he", dtype=dt)
        assert same_bits(m, m64.astype(m.dtype))  # computed in float64, rounded once
    # the class docstring's example
    assert round(float(gen.init_matrix(0, (20, 10), mode="he")[0, 0]), 6) == 0.960776


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_init_tensor_equals_init_matrix(dtype: torch.dtype) -> None:
    gen = DeterministicNoiseGenerator(3)
    np_dt = torch.empty((), dtype=dtype).numpy().dtype
    for shape, mode in [((64, 48), "he"), ((16, 8, 3, 3), "xavier_uniform"), ((50,), "ones")]:
        t = gen.init_tensor(2, shape, mode, dtype=dtype)
        assert isinstance(t, torch.Tensor) and t.dtype == dtype and t.device.type == "cpu"
        assert tuple(t.shape) == shape
        assert same_bits(t.numpy(), gen.init_matrix(2, shape, mode, dtype=np_dt))
    blk = gen.init_tensor(2, (64, 48), "he", dtype=dtype, index=(slice(10, 20), slice(None, 8)))
    assert same_bits(blk.numpy(), gen.init_matrix(2, (64, 48), "he", dtype=np_dt)[10:20, :8])


def _round_once_to_bfloat16(x: np.ndarray) -> torch.Tensor:
    """float64 -> bfloat16 with one round-to-nearest-even (normal range): keep 7 of the 52
    stored mantissa bits, then convert exactly."""
    b = x.view(np.uint64)
    lsb = (b >> np.uint64(45)) & np.uint64(1)
    r = ((b + np.uint64((1 << 44) - 1) + lsb) & ~np.uint64((1 << 45) - 1)).view(np.float64)
    return torch.from_numpy(r).to(torch.bfloat16)


def test_init_tensor_bfloat16_is_within_half_an_ulp() -> None:
    gen = DeterministicNoiseGenerator(3)
    x = gen.init_matrix(2, (64, 64), "he", dtype=np.float64)
    t = gen.init_tensor(2, (64, 64), "he", dtype=torch.bfloat16)
    assert t.dtype == torch.bfloat16
    err = np.abs(t.to(torch.float64).numpy() - x)
    assert (err <= np.abs(x) * 2.0**-8 * (1 + 2.0**-15)).all()  # half a bf16 ulp (+ slack)
    # the single-rounding reference used below: ties to even, and sticky low bits count
    x = np.array([1 + 2**-8 + 2**-40, 1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8 + 2**-40)])
    want = [1 + 2**-7, 1.0, 1 + 2**-6, -(1 + 2**-7)]
    assert _round_once_to_bfloat16(x).double().tolist() == want


def test_init_tensor_bfloat16_is_rounded_once() -> None:
    gen = DeterministicNoiseGenerator(42)
    x = gen.init_matrix(0, (512, 1024), "he", dtype=np.float64)
    want = _round_once_to_bfloat16(x)
    got = gen.init_tensor(0, (512, 1024), "he", dtype=torch.bfloat16)
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))


def test_init_conv_kernel_is_zero_mean_he_per_filter() -> None:
    gen = DeterministicNoiseGenerator(5)
    shape = (16, 8, 3, 3)
    raw = gen.init_matrix(1, shape, "he", dtype=np.float64)  # fan_in = 8 * 3 * 3
    assert raw[2, 3, 1, 2] == math.sqrt(2 / 72) * B.gaussian(5, 1, 2, 3, 1, 2)
    centred = raw - raw.mean(axis=(1, 2, 3), keepdims=True)
    for dt in (np.float32, np.float64):
        k = gen.init_conv_kernel(1, shape, "he", dtype=dt)
        assert same_bits(k, centred.astype(dt))  # the mean is taken in float64, then rounded
    k1d = gen.init_conv_kernel(1, (4, 2, 5), "he", dtype=np.float64)  # Conv1d kernels too
    assert np.abs(k1d.mean(axis=(1, 2))).max() < 1e-15


def test_spec_is_what_init_matrix_generates() -> None:
    gen = DeterministicNoiseGenerator(8)
    spec = gen.spec(3, (12, 6), "he_uniform")
    assert (spec.seed, spec.layer_id, spec.shape, spec.scheme) == (8, 3, (12, 6), "he_uniform")
    assert same_bits(core.generate(spec), gen.init_matrix(3, (12, 6), "he_uniform"))
    custom = gen.spec(3, (12, 6), "he", std=0.5)
    assert custom.scheme == "custom" and custom.params == {"std": 0.5}


def test_layer_id_for_is_stable_and_63_bit() -> None:
    a = core.layer_id_for("fc1.weight")
    assert a == core.layer_id_for("fc1.weight") != core.layer_id_for("fc2.weight")
    assert 0 <= a < 2**63
    digest = hashlib.sha256(b"fc1.weight").digest()
    assert a == int.from_bytes(digest[:8], "little") & (2**63 - 1)


# ------------------------------------------------------------------------------ blocks = whole

BLOCK_SPECS = [("he", {}), ("he_uniform", {}), ("uniform", {}), ("constant", {"value": 0.25})]


def _selected(sel: Any, n: int) -> np.ndarray:
    return np.arange(n)[sel] if isinstance(sel, slice) else np.atleast_1d(np.asarray(sel))


def _random_index(rng: np.random.Generator, shape: tuple[int, ...]) -> tuple[Any, ...]:
    """A random per-axis selection: plain, strided and reversed slices, int arrays, ints."""
    index = []
    for n in shape[: rng.integers(1, len(shape) + 1)]:
        kind = rng.integers(0, 5)
        a = int(rng.integers(0, n))
        b = int(rng.integers(a + 1, n + 1))  # a non-empty [a, b)
        if kind == 0:
            index.append(slice(a, b))
        elif kind == 1:
            index.append(slice(a, b, int(rng.integers(2, 5))))
        elif kind == 2:
            index.append(slice(None, None, -int(rng.integers(1, 4))))
        elif kind == 3:  # unsorted, with repeats
            index.append(rng.integers(0, n, size=int(rng.integers(1, 7))))
        else:
            index.append(int(rng.integers(0, n)))
    return tuple(index)


@pytest.mark.parametrize("shape", [(37, 53), (6, 5, 4, 3)], ids=["2d", "4d"])
@pytest.mark.parametrize("scheme,params", BLOCK_SPECS, ids=[s for s, _ in BLOCK_SPECS])
def test_any_block_equals_that_block_of_the_whole(
    shape: tuple[int, ...], scheme: str, params: dict[str, float]
) -> None:
    rng = np.random.default_rng(len(shape) * 100 + len(scheme))
    spec = core.TensorInit(77, 12, shape, scheme, params)
    whole = {dt: core.generate(spec, dtype=dt) for dt in (np.float32, np.float64)}
    for trial in range(25):
        index = _random_index(rng, shape)
        sel = [_selected(s, n) for s, n in zip(index, shape, strict=False)]
        sel += [np.arange(n) for n in shape[len(index) :]]
        backend = ("numba", "numpy", "torch")[trial % 3]
        for dt, w in whole.items():
            want = w[np.ix_(*sel)]
            got = core.generate(spec, index, dtype=dt, backend=backend)
            assert same_bits(got, want), (index, backend, dt)
        t = core.generate_tensor(spec, index, dtype=torch.float32, backend=backend)
        assert same_bits(t.numpy(), whole[np.float32][np.ix_(*sel)]), (index, backend)


@pytest.mark.parametrize(
    "spec",
    [
        core.TensorInit(5, 2, (8, 4, 3, 3), "he", zero_mean=True),
        core.TensorInit(5, 2, (24, 40), "orthogonal"),
        core.TensorInit(5, 2, (40, 24), "xavier", orthogonal=True),
    ],
    ids=["zero_mean", "orthogonal", "orthogonal_rescaled"],
)
def test_blocks_of_whole_tensor_draws(spec: core.TensorInit) -> None:
    # per-filter means and QR depend on the whole: blocks are still cut from the same values
    whole = core.generate(spec, dtype=np.float64)
    rng = np.random.default_rng(0)
    for _ in range(10):
        index = _random_index(rng, spec.shape)
        sel = [_selected(s, n) for s, n in zip(index, spec.shape, strict=False)]
        sel += [np.arange(n) for n in spec.shape[len(index) :]]
        assert same_bits(core.generate(spec, index, dtype=np.float64), whole[np.ix_(*sel)])


def test_init_matrix_index_matches_whole() -> None:
    gen = DeterministicNoiseGenerator(1)
    whole = gen.init_matrix(0, (300, 200), "he")
    blk = gen.init_matrix(0, (300, 200), "he", index=(slice(100, 250, 7), [5, 3, 199]))
    assert same_bits(blk, whole[100:250:7][:, [5, 3, 199]])
    # shards of a big matrix, generated independently, reassemble the whole
    shards = [
        gen.init_matrix(0, (300, 200), "he", index=(slice(a, a + 64),)) for a in range(0, 300, 64)
    ]
    assert same_bits(np.concatenate(shards), whole)


def test_boolean_mask_index_is_refused() -> None:
    spec = core.TensorInit(0, 0, (4, 3))
    mask = np.array([True, False, True, False])
    with pytest.raises(
        ValueError,
        match=r"boolean masks are not supported as an index \(axis 0\); pass np.flatnonzero\(mask\)",
    ):
        core.generate(spec, (mask,), dtype=np.float64)


@pytest.mark.parametrize("env_backend", ["numba", "numpy", "torch"])
def test_cdi_backend_environment_override(
    env_backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CDI_BACKEND", env_backend)
    spec = core.TensorInit(3, 1, (20, 30), "he")
    want = core.generate(spec, backend="numpy")
    assert same_bits(core.generate(spec), want)
    assert same_bits(core.generate_tensor(spec).numpy(), want)
    # other kinds fall back from torch to the CPU kernels without re-reading CDI_BACKEND
    assert same_bits(
        core.generate(core.TensorInit(3, 1, (4, 4), "zeros")), np.zeros((4, 4), np.float32)
    )
    assert same_bits(
        core.generate(core.TensorInit(3, 1, (4, 4), "constant", {"value": 2.0})),
        np.full((4, 4), 2.0, np.float32),
    )


# ------------------------------------------------------------------------------ check_weight_changed


def test_check_weight_changed() -> None:
    gen = DeterministicNoiseGenerator(42)
    fan_in, fan_out = 10, 20
    w64 = gen.init_weight(0, 3, 4, fan_in, fan_out)
    w32 = gen.init_matrix(0, (fan_out, fan_in), "he")[3, 4]  # a float32 weight
    assert gen.check_weight_changed(w64, 0, 3, 4, fan_in, fan_out) == (False, 0.0)
    assert gen.check_weight_changed(w32, 0, 3, 4, fan_in, fan_out) == (False, 0.0)
    assert gen.check_weight_changed(torch.tensor(w32), 0, 3, 4, fan_in, fan_out) == (False, 0.0)
    moved = np.float32(w32 + np.float32(1e-3))
    changed, delta = gen.check_weight_changed(moved, 0, 3, 4, fan_in, fan_out)
    assert changed and delta == float(moved) - float(w32) and delta > 0
    changed, delta = gen.check_weight_changed(w64 - 0.5, 0, 3, 4, fan_in, fan_out, threshold=0.6)
    assert not changed and delta == pytest.approx(-0.5)
    # 'changed' is strictly greater than the threshold
    cw = w64 + 0.25
    d = abs(cw - w64)
    assert gen.check_weight_changed(cw, 0, 3, 4, fan_in, fan_out, threshold=d)[0] is False
    assert gen.check_weight_changed(cw, 0, 3, 4, fan_in, fan_out, threshold=d * 0.999)[0] is True
    assert gen.check_weight_changed(w64 + 1e-9, 0, 3, 4, fan_in, fan_out, threshold=0)[0] is True
    assert DEFAULT_THRESHOLD == 1e-5
    assert gen.check_weight_changed(w64 + 2e-5, 0, 3, 4, fan_in, fan_out)[0] is True


# ------------------------------------------------------------------------------ analysis


@pytest.fixture(scope="module")
def trained() -> dict[str, Any]:
    """A 784-64-10 MLP trained with Adam on 2000 real MNIST images, weights from the generator."""
    x, y = load_tensors("mnist")
    n = 2000
    x = x[:n].reshape(n, -1).to(torch.float32) / 255.0  # (n, 784)
    y = y[:n]
    gen = DeterministicNoiseGenerator(1234)
    torch.manual_seed(0)
    fc1, fc2 = nn.Linear(784, 64), nn.Linear(64, 10)
    with torch.no_grad():
        fc1.weight.copy_(gen.init_tensor(0, (64, 784), "he"))  # (out, in)
        fc2.weight.copy_(gen.init_tensor(1, (10, 64), "he"))
        fc1.bias.zero_()
        fc2.bias.zero_()
    model = nn.Sequential(fc1, nn.ReLU(), fc2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)  # no weight decay: zero grad = no move
    batches = torch.Generator().manual_seed(0)
    first_loss = None
    for _ in range(300):
        idx = torch.randint(0, n, (64,), generator=batches)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        first_loss = first_loss if first_loss is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        acc = float((model(x).argmax(1) == y).float().mean())
    return {
        "gen": gen,
        "layers": {0: fc1.weight.detach().clone(), 1: fc2.weight.detach().clone()},
        "dead_pixels": (x == 0).all(dim=0).numpy(),  # (784,)
        "first_loss": first_loss,
        "final_loss": loss.item(),
        "acc": acc,
    }


def _recompute(gen: DeterministicNoiseGenerator, w: torch.Tensor, layer: int, t: float):
    w0 = gen.init_matrix(layer, tuple(w.shape), "he", dtype=np.float32)
    delta = np.abs(w.numpy().astype(np.float64) - w0.astype(np.float64))
    changed = int((delta > t).sum())
    stats = {
        "total_weights": delta.size,
        "changed_weights": changed,
        "sleeping_weights": delta.size - changed,
        "changed_percentage": 100.0 * changed / delta.size,
        "mean_delta": float(delta.mean()),
        "max_delta": float(delta.max()),
    }
    return stats, delta > t


def test_the_toy_model_really_trained(trained: dict[str, Any]) -> None:
    assert trained["acc"] > 0.85
    assert trained["final_loss"] < 0.5 * trained["first_loss"]
    assert 50 < trained["dead_pixels"].sum() < 400  # MNIST's blank border


@pytest.mark.parametrize("threshold", [0.0, 1e-6, 1e-3])
@pytest.mark.parametrize("layer", [0, 1])
def test_analysis_equals_independent_recomputation(
    trained: dict[str, Any], layer: int, threshold: float
) -> None:
    gen, w = trained["gen"], trained["layers"][layer]
    want, want_mask = _recompute(gen, w, layer, threshold)
    assert want["changed_weights"] > 0
    for weights in (w, w.numpy()):  # torch tensors and numpy arrays alike
        for chunk in (core.DEFAULT_CHUNK_ELEMS, 1000, 1):
            got = gen.analyze_weight_matrix(weights, layer, "he", threshold, chunk_elems=chunk)
            assert set(got) == set(want)
            for key in ("total_weights", "changed_weights", "sleeping_weights", "max_delta"):
                assert got[key] == want[key], (key, chunk)
            assert got["changed_percentage"] == pytest.approx(want["changed_percentage"], 1e-12)
            assert got["mean_delta"] == pytest.approx(want["mean_delta"], rel=1e-12)
            mask = gen.get_awakened_mask(weights, layer, threshold, chunk_elems=chunk)
            assert mask.dtype == bool and np.array_equal(mask, want_mask), chunk


def test_always_blank_pixels_leave_their_columns_asleep(trained: dict[str, Any]) -> None:
    # A pixel that is 0 in every training image gives its fc1 column an exactly-zero gradient;
    # Adam without weight decay then moves it by exactly 0, so regeneration must match bits.
    gen, w = trained["gen"], trained["layers"][0]
    dead = trained["dead_pixels"]
    mask = gen.get_awakened_mask(w, 0, threshold=0.0)  # (64, 784)
    assert not mask[:, dead].any()
    assert mask[:, ~dead].mean() > 0.9  # the others did move
    w0 = gen.init_tensor(0, (64, 784), "he")
    assert torch.equal(w[:, torch.from_numpy(dead)], w0[:, torch.from_numpy(dead)])
    stats = gen.analyze_weight_matrix(w, 0, threshold=0.0)
    assert stats["sleeping_weights"] >= 64 * int(dead.sum())
    assert stats["sleeping_weights"] == int((~mask).sum())


def test_analysis_of_untouched_and_shifted_weights() -> None:
    gen = DeterministicNoiseGenerator(0)
    for dt in (np.float16, np.float32, np.float64):
        w0 = gen.init_matrix(5, (33, 17), "xavier_uniform", dtype=dt)
        stats = gen.analyze_weight_matrix(w0, 5, "xavier_uniform", threshold=0)
        assert stats["changed_weights"] == 0 and stats["max_delta"] == 0.0
        w = w0.copy()
        w[3, 4] += dt(0.5)
        mask = gen.get_awakened_mask(w, 5, threshold=0.1, mode="xavier_uniform")
        assert mask.sum() == 1 and mask[3, 4]
    # NaN weights count as moved
    w = gen.init_matrix(5, (4, 4), "he")
    w[0, 0] = np.nan
    assert gen.get_awakened_mask(w, 5, threshold=0)[0, 0]
    assert gen.analyze_weight_matrix(w, 5, threshold=0)["changed_weights"] == 1


# ------------------------------------------------------------------------------ bad inputs

GEN = DeterministicNoiseGenerator(42)
W = np.zeros((4, 4), np.float32)

BAD_INPUTS: dict[str, tuple[Callable[[], Any], str]] = {
    "threshold negative": (
        lambda: GEN.analyze_weight_matrix(W, 0, threshold=-1),
        "threshold must be finite and >= 0 (0 = exactly unchanged), got -1",
    ),
    "threshold nan": (
        lambda: GEN.analyze_weight_matrix(W, 0, threshold=float("nan")),
        "threshold must be finite and >= 0 (0 = exactly unchanged), got nan",
    ),
    "threshold inf": (
        lambda: GEN.get_awakened_mask(W, 0, threshold=float("inf")),
        "threshold must be finite and >= 0 (0 = exactly unchanged), got inf",
    ),
    "threshold str": (
        lambda: GEN.check_weight_changed(0.1, 0, 0, 0, 4, 4, threshold="abc"),
        "threshold must be a number >= 0, got 'abc'",
    ),
    "shape zero": (
        lambda: GEN.init_matrix(0, (0, 3)),
        "shape must be a non-empty sequence of positive ints, got (0, 3)",
    ),
    "shape negative": (
        lambda: GEN.init_tensor(0, (4, -3)),
        "shape must be a non-empty sequence of positive ints, got (4, -3)",
    ),
    "shape float": (
        lambda: GEN.init_matrix(0, (4.0, 3)),
        "shape must be a non-empty sequence of positive ints, got (4.0, 3)",
    ),
    "shape empty": (
        lambda: GEN.init_matrix(0, ()),
        "shape must be a non-empty sequence of positive ints, got ()",
    ),
    "shape scalar": (
        lambda: GEN.init_matrix(0, 5),
        "shape must be a sequence of positive ints, got 5",
    ),
    "dtype integer": (
        lambda: GEN.init_matrix(0, (4, 4), dtype=np.int32),
        "dtype must be float16, float32 or float64, got <class 'numpy.int32'>",
    ),
    "dtype torch integer": (
        lambda: GEN.init_tensor(0, (4, 4), dtype=torch.int32),
        "dtype must be a floating torch dtype, got torch.int32",
    ),
    "unknown mode": (
        lambda: GEN.init_matrix(0, (4, 4), "foo"),
        f"unknown init scheme 'foo'; choose one of: {', '.join(schemes.names())} "
        "(or 'lsuv' for modules)",
    ),
    "unknown parameter": (
        lambda: GEN.init_matrix(0, (4, 4), "he", gain=2.0),
        "init scheme 'he' takes parameters [none], got ['gain']",
    ),
    "constant without value": (
        lambda: GEN.init_matrix(0, (4, 4), "constant"),
        "init scheme 'constant' needs parameter 'value'; pass value=<number>",
    ),
    "uniform low >= high": (
        lambda: GEN.init_matrix(0, (4, 4), "uniform", low=1.0, high=1.0),
        "init scheme 'uniform' needs low < high, got low=1.0, high=1.0",
    ),
    "negative std": (
        lambda: GEN.init_matrix(0, (4, 4), std=-1.0),
        "init scheme 'custom': std must be >= 0, got -1.0",
    ),
    "negative index": (lambda: GEN.gaussian(0, -1), "index must be in [0, 2**64), got -1"),
    "negative index array": (
        lambda: GEN.u01(0, np.array([1, -1])),
        "indices must be non-negative",
    ),
    "index 2**64": (
        lambda: GEN.gaussian(0, 2**64),
        "index must be in [0, 2**64), got 18446744073709551616",
    ),
    "bool index": (lambda: GEN.gaussian(0, True), "indices must be integers, got dtype bool"),
    "float index": (lambda: GEN.u01(0, 1.5), "indices must be integers, got dtype float64"),
    "bool layer id": (
        lambda: GEN.init_weight(True, 0, 0, 4, 4),
        "layer_id must be a non-negative integer, got True",
    ),
    "no index": (
        lambda: GEN.gaussian(),
        "at least one index is required, e.g. gaussian(layer_id, i, j)",
    ),
    "negative seed": (
        lambda: DeterministicNoiseGenerator(-1),
        "seed must be in [0, 2**64), got -1",
    ),
    "bool seed": (
        lambda: DeterministicNoiseGenerator(True),
        "seed must be a non-negative integer, got True",
    ),
    "weights wrong shape": (
        lambda: list(core.iter_deltas(W, core.TensorInit(42, 0, (4, 5)))),
        "weights have shape (4, 4) but the init spec says (4, 5); pass the matching layer_id/shape",
    ),
    "integer weights": (
        lambda: GEN.analyze_weight_matrix(np.zeros((4, 4), np.int64), 0),
        "weights must be a floating array, got dtype int64",
    ),
    "chunk_elems 0": (
        lambda: GEN.analyze_weight_matrix(W, 0, chunk_elems=0),
        "chunk_elems must be >= 1, got 0",
    ),
    "unknown backend": (
        lambda: DeterministicNoiseGenerator(42, backend="cuda"),
        "backend must be one of auto, numba, numpy, torch, got 'cuda'",
    ),
    "unknown backend generate": (
        lambda: core.generate(core.TensorInit(0, 0, (2, 2)), backend="jax"),
        "backend must be one of auto, numba, numpy, torch, got 'jax'",
    ),
    "conv kernel 2-D": (
        lambda: GEN.init_conv_kernel(0, (4, 4)),
        "a conv kernel has shape (out, in, k...) with >= 3 dims, got (4, 4)",
    ),
    "orthogonal 1-D": (
        lambda: GEN.init_matrix(0, (8,), "orthogonal"),
        "orthogonal init needs a tensor with >= 2 dims, got shape (8,)",
    ),
    "orthogonal=True 1-D": (
        lambda: GEN.init_matrix(0, (8,), "he", orthogonal=True),
        "orthogonal init needs a tensor with >= 2 dims, got shape (8,)",
    ),
    "orthogonal=True constant": (
        lambda: GEN.init_matrix(0, (8, 8), "zeros", orthogonal=True),
        "orthogonal=True needs a random scheme, not 'zeros'",
    ),
    "init_weight orthogonal": (
        lambda: GEN.init_weight(0, 0, 0, 4, 4, "orthogonal"),
        "init_weight cannot address one element of an orthogonal draw ('orthogonal'); "
        "use init_matrix",
    ),
    "fan_in 0": (
        lambda: GEN.init_weight(0, 0, 0, 0, 4),
        "fan_in must be a positive integer, got 0",
    ),
    "index out of range": (
        lambda: GEN.init_matrix(0, (4, 4), index=(np.array([5]),)),
        "index on axis 0 must lie in [0, 4), got array([5])",
    ),
    "index selects nothing": (
        lambda: GEN.init_matrix(0, (4, 4), index=(slice(2, 2),)),
        "index (slice(2, 2, None),) selects nothing on axis 0 of shape (4, 4)",
    ),
    "index too many axes": (
        lambda: GEN.init_matrix(0, (4, 4), index=(1, 2, 3)),
        "index (1, 2, 3) has more axes than shape (4, 4)",
    ),
    "current_weight array": (
        lambda: GEN.check_weight_changed(np.zeros(2), 0, 0, 0, 4, 4),
        "current_weight must be a single number, got shape (2,)",
    ),
    "empty layer name": (
        lambda: core.layer_id_for(""),
        "a layer name must be a non-empty string, got ''",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_message(case: str) -> None:
    call, message = BAD_INPUTS[case]
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        call()


def test_boundary_inputs_are_accepted() -> None:
    assert isinstance(GEN.gaussian(0, 2**64 - 1), float)
    assert DeterministicNoiseGenerator(0).seed == 0
    assert DeterministicNoiseGenerator(2**64 - 1).seed == 2**64 - 1
    assert GEN.init_matrix(2**64 - 1, (1,), "he").shape == (1,)
    assert GEN.analyze_weight_matrix(W, 0, threshold=0)["total_weights"] == 16
    assert GEN.analyze_weight_matrix(W, 0, threshold=np.float32(1e-3))["total_weights"] == 16
