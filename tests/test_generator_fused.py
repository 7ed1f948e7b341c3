"""The n-d grid kernels and the fused generate-compare-histogram summary.

Properties: the numba grid kernels give the numpy backend's bits on every shape (conv
kernels, 1-D, 5-D, strided blocks); ``delta_summary`` equals ``DeltaStats.add`` over the
whole block (an independent path: numpy's histogram over materialized deltas), whatever the
chunking, for the fused kernel and the numpy reference alike, on adversarial weights (NaN,
+-inf, exact zeros, deltas exactly on bin edges); and the CUDA path (skipped without a GPU)
gives the CPU's bits.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from cdi_experiments.generator import core
from cdi_experiments.modules.analysis import DELTA_EDGES, DeltaStats

THRESHOLDS = (0.0, 1e-7, 1e-5, 1e-3, 0.5)
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
needs_numba = pytest.mark.skipif(core._nk is None, reason="numba is not installed")


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    a, b = np.ascontiguousarray(a), np.ascontiguousarray(b)
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    ints = {2: np.int16, 4: np.int32, 8: np.int64}[a.dtype.itemsize]
    return bool(np.array_equal(a.view(ints), b.view(ints)))


# ------------------------------------------------------------------------------ grid kernels

SHAPES = [(7,), (3, 5), (64, 3, 3, 3), (2, 3, 4, 5, 6), (33, 1), (1, 1, 1)]
SCHEMES = [("he", {}), ("xavier_uniform", {}), ("custom", {"std": 0.02}), ("torch_default", {})]


@needs_numba
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("scheme,params", SCHEMES, ids=[s for s, _ in SCHEMES])
def test_grid_kernels_equal_numpy_backend(shape: tuple, scheme: str, params: dict) -> None:
    spec = core.TensorInit(2**63 + 5, 123456789, shape, scheme, params)
    strided = tuple(slice(1, None, 2) if n > 2 else slice(None) for n in shape)
    for index in (None, strided):
        for dt in (np.float16, np.float32, np.float64):
            fast = core.generate(spec, index, dtype=dt, backend="numba")
            ref = core.generate(spec, index, dtype=dt, backend="numpy")
            assert same_bits(fast, ref), (shape, scheme, index, dt)


@needs_numba
def test_parallel_parts_and_tiles_cover_every_element_once() -> None:
    # large enough for several parallel parts and many tiles, with rows shorter than a tile
    # and rows that straddle tile and part boundaries
    spec = core.TensorInit(9, 10, (1001, 7, 13))
    fast = core.generate(spec, dtype=np.float64, backend="numba")
    ref = core.generate(spec, dtype=np.float64, backend="numpy")
    assert same_bits(fast, ref)
    # every element of a block equals the scalar reference at its coordinates
    idx = (np.array([0, 500, 1000]), np.array([6]), np.array([0, 12]))
    block = core.generate(spec, idx, dtype=np.float64, backend="numba")
    for a, i in enumerate(idx[0]):
        for c, k in enumerate(idx[2]):
            want = core.B.gaussian(9, 10, int(i), 6, int(k)) * spec.draw.std
            assert block[a, 0, c] == want


@needs_numba
@pytest.mark.parametrize(
    "shape,index",
    [
        ((257, 130, 3, 3), None),  # 8 parallel parts, groups of 9 straddling tiles and parts
        ((257, 130, 3, 3), (slice(3, 250), slice(None), slice(1, 3), slice(None))),
        ((40, 5, 3, 2, 2), None),  # 5-D: the last two axes grouped, three odometer axes
        ((300, 7, 8, 1), None),  # rows of one element
        ((600, 9, 4, 16), None),  # groups of exactly GROUP_MAX
        ((600, 9, 5, 13), None),  # 65 elements: walked row by row
    ],
    ids=str,
)
def test_grouped_walk_equals_numpy_backend(shape: tuple, index: Any) -> None:
    # blocks whose last two axes are small (conv kernels) take the grouped walk: its
    # patterns, group odometer and restarts at part boundaries give the numpy backend's bits
    spec = core.TensorInit(11, 12, shape)
    fast = core.generate(spec, index, dtype=np.float64, backend="numba")
    ref = core.generate(spec, index, dtype=np.float64, backend="numpy")
    assert same_bits(fast, ref)
    w = fast + np.where(np.arange(fast.size).reshape(fast.shape) % 3 == 0, 1e-4, 0.0)
    got = core.delta_summary(
        w, spec, index, thresholds=THRESHOLDS, edges=DELTA_EDGES, backend="numba"
    )
    _assert_equal(got, _stats(np.abs(w - ref)))


# ------------------------------------------------------------------------------ delta summary


def _perturbed(spec: core.TensorInit, dtype: Any, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(w, w0)``: w0 regenerated; w = w0 moved at random, with NaN, +-inf, untouched
    elements, and elements whose delta is exactly a histogram edge (in float64)."""
    rng = np.random.default_rng(seed)
    w0 = core.generate(spec, dtype=dtype, backend="numpy")
    w = w0.copy()
    f = w.reshape(-1)
    u = rng.random(f.size)
    moved = u < 0.3
    f[moved] += rng.normal(0.0, 1e-3, moved.sum()).astype(dtype)
    f[(u > 0.30) & (u < 0.34)] = np.nan
    f[(u > 0.34) & (u < 0.36)] = np.inf
    f[(u > 0.36) & (u < 0.38)] = -np.inf
    on_edge = np.flatnonzero((u > 0.40) & (u < 0.55))
    edges = DELTA_EDGES[rng.integers(1, DELTA_EDGES.size - 1, on_edge.size)]
    f[on_edge] = (w0.reshape(-1)[on_edge].astype(np.float64) + edges).astype(dtype)
    return w, w0


def _stats(delta: np.ndarray) -> DeltaStats:
    st = DeltaStats(THRESHOLDS)
    st.add(delta)
    return st


def _assert_equal(got: core.DeltaSummary, want: DeltaStats) -> None:
    assert (got.total, got.zeros, got.nan, got.max) == (want.total, want.zeros, want.nan, want.max)
    assert got.changed.tolist() == [want.changed[t] for t in THRESHOLDS]
    assert got.hist.tolist() == want.hist.tolist()
    assert got.total_sum == pytest.approx(want.total_sum, rel=1e-12)


@pytest.mark.parametrize("backend", ["numba", "numpy"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize(
    "spec",
    [
        core.TensorInit(3, 9, (24, 70), "he"),
        core.TensorInit(3, 9, (16, 8, 3, 3), "xavier_uniform"),
        core.TensorInit(4, 1, (1000,), "custom", {"std": 0.5}),
    ],
    ids=["he", "xavier_uniform_conv", "custom_1d"],
)
def test_delta_summary_equals_deltastats(backend: str, dtype: Any, spec: core.TensorInit) -> None:
    if backend == "numba" and core._nk is None:
        pytest.skip("numba is not installed")
    w, w0 = _perturbed(spec, dtype, seed=spec.shape[0])
    want = _stats(np.abs(w.astype(np.float64) - w0.astype(np.float64)))
    assert want.nan and want.zeros and want.max == np.inf  # the adversarial cases are there
    for chunk in (1 << 20, 500, 37):  # 37: chunks end mid-row of every shape here
        got = core.delta_summary(
            w, spec, thresholds=THRESHOLDS, edges=DELTA_EDGES, chunk_elems=chunk, backend=backend
        )
        _assert_equal(got, want)


@needs_numba
def test_fused_equals_reference_on_blocks_and_other_edges() -> None:
    spec = core.TensorInit(5, 6, (40, 50), "he")
    w, w0 = _perturbed(spec, np.float32, seed=1)
    index = (slice(3, 31, 3), np.array([0, 7, 49]))
    block = np.ascontiguousarray(w[np.ix_(np.arange(40)[index[0]], index[1])])
    # a first edge above zero (small deltas fall outside) and a finite last edge (inf too)
    for edges in (DELTA_EDGES, [1e-4, 1e-3, 2e-3, 0.1, 1.0], [0.0, np.inf]):
        fused = core.delta_summary(block, spec, index, thresholds=(), edges=edges, chunk_elems=5)
        ref = core.delta_summary(
            block, spec, index, thresholds=(), edges=edges, chunk_elems=5, backend="numpy"
        )
        assert fused.hist.tolist() == ref.hist.tolist()
        want = np.histogram(
            (d := np.abs(block.astype(np.float64) - w0[np.ix_(np.arange(40)[index[0]], index[1])]))[
                (d > 0) & ~np.isnan(d)
            ],
            bins=np.asarray(edges, dtype=np.float64),
        )[0]
        assert fused.hist.tolist() == want.tolist()
        assert (fused.total, fused.zeros, fused.nan) == (ref.total, ref.zeros, ref.nan)


def test_delta_summary_of_bfloat16_compares_in_bfloat16() -> None:
    spec = core.TensorInit(1, 2, (64, 32))
    w0 = core.generate_tensor(spec, dtype=torch.bfloat16)
    got = core.delta_summary(w0.clone(), spec, thresholds=(0.0,), edges=DELTA_EDGES)
    assert (got.total, got.zeros, got.changed.tolist()) == (2048, 2048, [0])


def test_summaries_merge_across_shards() -> None:
    spec = core.TensorInit(8, 8, (37, 11))
    w, w0 = _perturbed(spec, np.float32, seed=3)
    whole = core.delta_summary(w, spec, thresholds=THRESHOLDS, edges=DELTA_EDGES)
    merged = core.DeltaSummary.empty(len(THRESHOLDS), DELTA_EDGES.size - 1)
    for a, b in ((0, 10), (10, 11), (11, 37)):  # uneven Shard(0) pieces
        merged.merge(
            core.delta_summary(
                w[a:b], spec, (slice(a, b),), thresholds=THRESHOLDS, edges=DELTA_EDGES
            )
        )
    assert (merged.total, merged.zeros, merged.nan, merged.max) == (
        whole.total,
        whole.zeros,
        whole.nan,
        whole.max,
    )
    assert merged.changed.tolist() == whole.changed.tolist()
    assert merged.hist.tolist() == whole.hist.tolist()


def test_delta_summary_bad_inputs() -> None:
    spec = core.TensorInit(1, 2, (4, 5))
    w = core.generate(spec)
    kw: dict[str, Any] = {"thresholds": (0.0,), "edges": DELTA_EDGES}
    with pytest.raises(ValueError, match=r"weights have shape \(4, 5\) but index .* \(2, 5\)"):
        core.delta_summary(w, spec, (slice(0, 2),), **kw)
    with pytest.raises(ValueError, match="edges must be a 1-D increasing sequence"):
        core.delta_summary(w, spec, thresholds=(0.0,), edges=[0.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="threshold must be finite and >= 0"):
        core.delta_summary(w, spec, thresholds=(-1.0,), edges=DELTA_EDGES)
    with pytest.raises(ValueError, match="chunk_elems must be >= 1, got 0"):
        core.delta_summary(w, spec, chunk_elems=0, **kw)
    with pytest.raises(ValueError, match="cannot merge a summary of 2 thresholds"):
        core.DeltaSummary.empty(1, 3).merge(core.DeltaSummary.empty(2, 3))


# ------------------------------------------------------------------------------ GPU path


@CUDA
@pytest.mark.parametrize("shape", [(257, 129), (64, 3, 3, 3), (1000,)], ids=str)
@pytest.mark.parametrize("scheme", ["he", "xavier_uniform", "torch_default"])
def test_cuda_generates_the_cpu_bits(shape: tuple, scheme: str) -> None:
    spec = core.TensorInit(42, 7, shape, scheme)
    strided = tuple(slice(1, None, 3) for _ in shape)
    for index in (None, strided):
        for dt in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
            gpu = core.generate_tensor(spec, index, dtype=dt, device="cuda", backend="torch")
            cpu = core.generate_tensor(spec, index, dtype=dt)
            assert gpu.is_cuda and gpu.dtype == dt
            ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[cpu.element_size()]
            assert torch.equal(gpu.cpu().view(ints), cpu.view(ints)), (shape, scheme, index, dt)
            # a CUDA out with a CPU backend: generated on the CPU, copied into out
            out = torch.empty(cpu.shape, dtype=dt, device="cuda")
            assert core.generate_tensor(spec, index, out=out, backend="numpy") is out
            assert torch.equal(out.cpu().view(ints), cpu.view(ints))


@CUDA
def test_delta_summary_of_cuda_weights_equals_cpu() -> None:
    spec = core.TensorInit(3, 4, (128, 64))
    w, _ = _perturbed(spec, np.float32, seed=2)
    kw: dict[str, Any] = {"thresholds": THRESHOLDS, "edges": DELTA_EDGES}
    gpu = core.delta_summary(torch.from_numpy(w).cuda(), spec, **kw)
    cpu = core.delta_summary(w, spec, **kw)
    assert gpu.hist.tolist() == cpu.hist.tolist() and gpu.changed.tolist() == cpu.changed.tolist()


# ------------------------------------------------------------------------------ out=


@pytest.mark.parametrize("scheme", ["he", "xavier_uniform", "zeros", "orthogonal"])
def test_generate_into_out_equals_a_fresh_array(scheme: str) -> None:
    spec = core.TensorInit(6, 7, (12, 10), scheme)
    index = (slice(2, 9),)
    want = core.generate(spec, index)
    buf = np.full((9, 10), np.nan, dtype=np.float32)
    got = core.generate(spec, index, out=buf[2:9])  # a C-contiguous view: filled in place
    assert same_bits(got, want) and same_bits(buf[2:9], want)
    assert np.isnan(buf[:2]).all() and np.isnan(buf[9:]).all()  # nothing else written
    strided = np.zeros((7, 20), dtype=np.float32)[:, ::2]  # not contiguous: copied into
    assert same_bits(core.generate(spec, index, out=strided), want)
    t = torch.zeros(20, 10, dtype=torch.float64)
    core.generate_tensor(spec, index, out=t[5:12])
    assert same_bits(t[5:12].numpy(), core.generate(spec, index, dtype=np.float64))
    b = torch.zeros(7, 10, dtype=torch.bfloat16)
    core.generate_tensor(spec, index, out=b)
    assert torch.equal(
        b.view(torch.int16),
        core.generate_tensor(spec, index, dtype=torch.bfloat16).view(torch.int16),
    )


def test_generate_out_bad_inputs() -> None:
    spec = core.TensorInit(6, 7, (12, 10))
    with pytest.raises(
        ValueError, match=r"out must be a numpy array of shape \(12, 10\) and dtype float32"
    ):
        core.generate(spec, out=np.empty((12, 10), np.float64))
    with pytest.raises(ValueError, match=r"out must be a tensor of shape \(3, 10\), got \(4, 10\)"):
        core.generate_tensor(spec, (slice(0, 3),), out=torch.empty(4, 10))
