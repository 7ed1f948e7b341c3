"""Addressable generation of whole tensors, slices of them, and the comparison of trained
weights against their regenerated initial values.

The unit of work is a :class:`TensorInit`: everything needed to regenerate one tensor's
initial values exactly (seed, layer id, shape, scheme and its numbers). Element
``[i0, ..., ik]`` of a normal draw is ``std * gaussian(seed; layer_id, i0, ..., ik)``; torch's
layout is used, so a Linear weight is ``(out_features, in_features)`` and ``fan_in = shape[1]``.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from cdi_experiments.generator import bits as B
from cdi_experiments.generator import schemes
from cdi_experiments.generator import vectorized as V

log = logging.getLogger(__name__)

try:  # the compiled kernel is optional: numpy gives the same bits, slower
    from cdi_experiments.generator import numba_kernel as _nk
except Exception as exc:  # pragma: no cover - depends on the install
    _nk = None
    log.info("numba kernel unavailable (%s); using the numpy backend", exc)

BACKENDS = ("auto", "numba", "numpy", "torch")
DEFAULT_CHUNK_ELEMS = 1 << 20
"""Elements regenerated at once by the chunked paths. Peak extra memory of an analysis is
about 40 bytes per chunk element (uint64 keys, float64 values, deltas): ~40 MiB by default."""

_NP_FLOATS = {np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)}
_TORCH_FLOATS = {torch.float16, torch.bfloat16, torch.float32, torch.float64}


# ----------------------------------------------------------------------------- validation


def check_index(value: Any, what: str = "index") -> int:
    """An integer coordinate in [0, 2**64); anything else is a ValueError."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{what} must be a non-negative integer, got {value!r}")
    value = int(value)
    if not 0 <= value <= B.MASK64:
        raise ValueError(f"{what} must be in [0, 2**64), got {value}")
    return value


def check_shape(shape: Any) -> tuple[int, ...]:
    """A tuple of positive ints, at least one dimension."""
    try:
        dims = tuple(shape)
    except TypeError:
        raise ValueError(f"shape must be a sequence of positive ints, got {shape!r}") from None
    if not dims or any(
        isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d <= 0 for d in dims
    ):
        raise ValueError(f"shape must be a non-empty sequence of positive ints, got {shape!r}")
    return tuple(int(d) for d in dims)


def check_threshold(threshold: Any) -> float:
    """A finite, non-negative number; 0 means 'exactly unchanged'."""
    if isinstance(threshold, (str, bytes, bool)):
        raise ValueError(f"threshold must be a number >= 0, got {threshold!r}")
    try:
        t = float(threshold)
    except (TypeError, ValueError):
        raise ValueError(f"threshold must be a number >= 0, got {threshold!r}") from None
    if not math.isfinite(t) or t < 0:
        raise ValueError(
            f"threshold must be finite and >= 0 (0 = exactly unchanged), got {threshold!r}"
        )
    return t


def fans(shape: Sequence[int]) -> tuple[int, int]:
    """torch's fan convention: ``fan_in = shape[1] * receptive``, ``fan_out = shape[0] * receptive``.

    A 1-D shape (a bias or a vector) has ``fan_in = fan_out = shape[0]``.
    """
    shape = check_shape(shape)
    if len(shape) == 1:
        return shape[0], shape[0]
    receptive = math.prod(shape[2:])
    return shape[1] * receptive, shape[0] * receptive


def layer_id_for(name: str) -> int:
    """A stable 63-bit layer id derived from a parameter name (first 8 bytes of its sha256).

    Adding or removing other layers never changes it, unlike an enumeration index.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"a layer name must be a non-empty string, got {name!r}")
    digest = hashlib.sha256(name.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _np_dtype(dtype: Any) -> np.dtype:
    if isinstance(dtype, torch.dtype):
        dtype = torch.empty((), dtype=dtype).numpy().dtype if dtype != torch.bfloat16 else None
    try:
        dt = np.dtype(dtype)
    except TypeError:
        dt = None
    if dt is None or dt not in _NP_FLOATS:
        raise ValueError(f"dtype must be float16, float32 or float64, got {dtype!r}")
    return dt


def _torch_dtype(dtype: Any) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in _TORCH_FLOATS:
            raise ValueError(f"dtype must be a floating torch dtype, got {dtype}")
        return dtype
    dt = _np_dtype(dtype)
    return {np.float16: torch.float16, np.float32: torch.float32, np.float64: torch.float64}[
        dt.type
    ]


def resolve_backend(backend: str | None, device: Any = None) -> str:
    """Pick the backend: ``auto`` means numba on CPU (numpy if numba is missing), torch on GPU.

    ``CDI_BACKEND`` in the environment overrides ``auto``.
    """
    backend = backend or "auto"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "auto":
        backend = os.environ.get("CDI_BACKEND", "auto")
        if backend not in BACKENDS:
            raise ValueError(f"CDI_BACKEND must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if device is not None and torch.device(device).type != "cpu":
        if backend not in ("auto", "torch"):
            raise ValueError(
                f"backend {backend!r} runs on the CPU only; use backend='torch' for {device}"
            )
        return "torch"
    if backend == "auto":
        return "numba" if _nk is not None else "numpy"
    if backend == "numba" and _nk is None:
        raise ValueError("backend 'numba' is not installed here; pip install numba, or use 'numpy'")
    return backend


# ----------------------------------------------------------------------------- tensor specs


@dataclass(frozen=True)
class TensorInit:
    """Everything that determines one tensor's initial values.

    Attributes:
        seed: generator seed, in [0, 2**64).
        layer_id: first coordinate of every element, in [0, 2**64).
        shape: full tensor shape (torch layout).
        scheme: registry name (see :mod:`cdi_experiments.generator.schemes`).
        params: the scheme's parameters.
        fan_in, fan_out: override the shape's fans (biases use their weight's).
        zero_mean: subtract each filter's (first-axis slice's) mean, as conv kernels do.
        orthogonal: replace the draw by an orthogonal matrix rescaled to the scheme's std.
        scale: extra multiplier applied last (LSUV's fitted factor).
    """

    seed: int
    layer_id: int
    shape: tuple[int, ...]
    scheme: str = "he"
    params: dict[str, Any] = field(default_factory=dict)
    fan_in: int | None = None
    fan_out: int | None = None
    zero_mean: bool = False
    orthogonal: bool = False
    scale: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "seed", check_index(self.seed, "seed"))
        object.__setattr__(self, "layer_id", check_index(self.layer_id, "layer_id"))
        object.__setattr__(self, "shape", check_shape(self.shape))
        object.__setattr__(self, "params", dict(self.params))
        self.draw  # noqa: B018 - validates scheme, params and fans now, not at first use

    @property
    def fans(self) -> tuple[int, int]:
        fi, fo = fans(self.shape)
        return (self.fan_in or fi, self.fan_out or fo)

    @property
    def draw(self) -> schemes.Draw:
        return schemes.resolve(self.scheme, *self.fans, self.params)

    @property
    def whole_only(self) -> bool:
        """True when values depend on the whole tensor (QR, per-filter mean): no bounded chunks
        below a filter / the matrix."""
        return self.orthogonal or self.draw.kind == "orthogonal"

    def with_(self, **changes: Any) -> TensorInit:
        return replace(self, **changes)


def _normalize_index(index: Any, shape: tuple[int, ...]) -> tuple[np.ndarray, ...]:
    """Per-axis coordinate arrays selected by ``index`` (slices, ints or int sequences)."""
    if index is None:
        index = ()
    if not isinstance(index, tuple):
        index = (index,)
    if len(index) > len(shape):
        raise ValueError(f"index {index!r} has more axes than shape {shape}")
    coords = []
    for axis, n in enumerate(shape):
        sel = index[axis] if axis < len(index) else slice(None)
        if isinstance(sel, slice):
            c = np.arange(n, dtype=np.int64)[sel]
        else:
            arr = np.asarray(sel)
            if arr.dtype == bool:
                raise ValueError(
                    f"boolean masks are not supported as an index (axis {axis}); pass np.flatnonzero(mask)"
                )
            c = np.atleast_1d(arr.astype(np.int64))
            if c.ndim != 1 or (c.size and (c.min() < 0 or c.max() >= n)):
                raise ValueError(f"index on axis {axis} must lie in [0, {n}), got {sel!r}")
        if c.size == 0:
            raise ValueError(f"index {index!r} selects nothing on axis {axis} of shape {shape}")
        coords.append(c.astype(np.uint64))
    return tuple(coords)


def _row_states(seed: int, layer_id: int, coords: tuple[np.ndarray, ...]) -> np.ndarray:
    """Folded keys of every coordinate but the last, flattened (C order)."""
    h = np.asarray(B.fold(seed, layer_id), dtype=np.uint64)
    lead = coords[:-1]
    for axis, c in enumerate(lead):
        shape = [1] * len(lead)
        shape[axis] = c.size
        h = V.hash64_np(h ^ V.hash64_np(c.reshape(shape)))
    return np.broadcast_to(h, tuple(c.size for c in lead)).reshape(-1).copy()


def _standard_normal(
    spec: TensorInit, coords: tuple[np.ndarray, ...], scale: float, dtype: np.dtype, backend: str
) -> np.ndarray:
    """``scale * gaussian`` on the coordinate grid, cast to ``dtype`` (numpy result)."""
    rows = _row_states(spec.seed, spec.layer_id, coords)
    col_h = V.hash64_np(coords[-1])
    out_shape = tuple(c.size for c in coords)
    if backend == "numba" and dtype in (np.dtype(np.float32), np.dtype(np.float64)):
        out = np.empty((rows.size, col_h.size), dtype=dtype)
        _nk.gaussian_grid(rows, col_h, float(scale), out)
        return out.reshape(out_shape)
    out = np.empty((rows.size, col_h.size), dtype=dtype)
    step = max(1, DEFAULT_CHUNK_ELEMS // col_h.size)
    for a in range(0, rows.size, step):
        h = V.hash64_np(rows[a : a + step, None] ^ col_h[None, :])
        out[a : a + step] = (V.gaussian_from_state_np(h) * scale).astype(dtype)
    return out.reshape(out_shape)


def _uniform(
    spec: TensorInit, coords: tuple[np.ndarray, ...], low: float, high: float, dtype: np.dtype
) -> np.ndarray:
    rows = _row_states(spec.seed, spec.layer_id, coords)
    col_h = V.hash64_np(coords[-1])
    out = np.empty((rows.size, col_h.size), dtype=dtype)
    width = high - low
    step = max(1, DEFAULT_CHUNK_ELEMS // col_h.size)
    for a in range(0, rows.size, step):
        h = V.hash64_np(rows[a : a + step, None] ^ col_h[None, :])
        out[a : a + step] = (low + width * V.uniform_from_state_np(h)).astype(dtype)
    return out.reshape(tuple(c.size for c in coords))


def _orthogonal(spec: TensorInit, gain: float) -> np.ndarray:
    """Whole-matrix orthogonal draw in float64 (QR with the sign fix), times ``gain``."""
    rows = spec.shape[0]
    cols = math.prod(spec.shape[1:]) if len(spec.shape) > 1 else 1
    if len(spec.shape) == 1:
        raise ValueError(f"orthogonal init needs a tensor with >= 2 dims, got shape {spec.shape}")
    flat = spec.with_(shape=(rows, cols), scheme="custom", params={"std": 1.0}, orthogonal=False)
    a = generate(flat, dtype=np.float64, backend="numpy" if _nk is None else "numba")
    transpose = rows < cols
    if transpose:
        a = a.T
    q, r = np.linalg.qr(a)
    d = np.sign(np.diag(r))
    d[d == 0] = 1.0
    q = q * d[None, :]
    if transpose:
        q = q.T
    return (gain * q).reshape(spec.shape)


def _float64_values(spec: TensorInit, coords: tuple[np.ndarray, ...], backend: str) -> np.ndarray:
    draw = spec.draw
    if spec.orthogonal or draw.kind == "orthogonal":
        if spec.orthogonal:
            # Rescale the orthogonal matrix so its element std equals the scheme's target std:
            # a semi-orthogonal (r, c) matrix has element variance 1 / max(r, c).
            if draw.kind == "orthogonal":
                gain = draw.gain
            elif draw.kind not in ("normal", "uniform"):
                raise ValueError(f"orthogonal=True needs a random scheme, not '{spec.scheme}'")
            else:
                n = max(spec.shape[0], math.prod(spec.shape[1:]))
                gain = schemes.target_std(draw) * math.sqrt(n)
        else:
            gain = draw.gain
        whole = _orthogonal(spec, gain)
        return whole[np.ix_(*[c.astype(np.int64) for c in coords])]
    if draw.kind == "constant":
        return np.full(tuple(c.size for c in coords), draw.value, dtype=np.float64)
    if draw.kind == "uniform":
        return _uniform(spec, coords, draw.low, draw.high, np.dtype(np.float64))
    return _standard_normal(spec, coords, draw.std, np.dtype(np.float64), backend)


def generate(
    spec: TensorInit,
    index: Any = None,
    *,
    dtype: Any = np.float32,
    backend: str | None = None,
) -> np.ndarray:
    """The initial values of ``spec`` (or the block ``index`` selects), as a numpy array.

    Any block equals the same block of the whole tensor, bit for bit, so shards and chunks can
    be generated independently. Orthogonal draws are computed whole and then sliced; filters
    of ``zero_mean`` tensors are generated whole along their non-leading axes.

    Args:
        spec: what to generate.
        index: optional per-axis selection (slices, ints or int arrays), numpy-style.
        dtype: float16, float32 or float64; values are computed in float64 and rounded once.
        backend: ``auto``, ``numba``, ``numpy`` (bit-identical) or ``torch`` (see :func:`generate_tensor`).

    Raises:
        ValueError: bad shape, dtype, index, scheme or parameters.
    """
    dt = _np_dtype(dtype)
    backend = resolve_backend(backend)
    if backend == "torch":
        return generate_tensor(spec, index, dtype=_torch_dtype(dt), backend="torch").numpy()
    coords = _normalize_index(index, spec.shape)
    draw = spec.draw
    plain_normal = (
        draw.kind == "normal" and not spec.orthogonal and not spec.zero_mean and spec.scale == 1.0
    )
    if plain_normal:  # the hot path: one fused pass, rounding straight to dtype
        return _standard_normal(spec, coords, draw.std, dt, backend)
    if spec.zero_mean:
        # the mean of each filter needs the filter whole: regenerate those filters entirely
        full = (coords[0],) + tuple(np.arange(n, dtype=np.uint64) for n in spec.shape[1:])
        vals = _float64_values(spec, full, backend)
        axes = tuple(range(1, vals.ndim))
        if axes:
            vals = vals - vals.mean(axis=axes, keepdims=True)
        vals = vals[(slice(None),) + np.ix_(*[c.astype(np.int64) for c in coords[1:]])]
    else:
        vals = _float64_values(spec, coords, backend)
    if spec.scale != 1.0:
        vals = vals * spec.scale
    return vals.astype(dt)


def generate_tensor(
    spec: TensorInit,
    index: Any = None,
    *,
    dtype: Any = torch.float32,
    device: Any = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Like :func:`generate`, as a torch tensor on ``device``.

    On the CPU the numba/numpy kernels run and the result is wrapped without a copy; on a GPU
    the torch backend generates on the device (plain normal and uniform draws; other kinds are
    generated on the CPU and moved). Bits are the same on every path.
    """
    tdt = _torch_dtype(dtype)
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type != "cpu" and backend in ("numba", "numpy"):  # CPU kernels, then move
        return generate_tensor(spec, index, dtype=dtype, backend=backend).to(device)
    backend = resolve_backend(backend, device)
    draw = spec.draw
    simple = not spec.orthogonal and not spec.zero_mean and spec.scale == 1.0
    if backend != "torch" or not simple or draw.kind not in ("normal", "uniform"):
        cpu_backend = backend if backend != "torch" else ("numba" if _nk is not None else "numpy")
        if tdt == torch.bfloat16:  # numpy has no bfloat16: float64 -> round-to-odd float32 -> bf16
            vals = generate(spec, index, dtype=np.float64, backend=cpu_backend)
            return torch.from_numpy(round_to_odd_f32(vals)).to(device=device, dtype=tdt)
        np_dt = _np_dtype(tdt)
        return torch.from_numpy(generate(spec, index, dtype=np_dt, backend=cpu_backend)).to(device)
    coords = _normalize_index(index, spec.shape)
    rows = torch.from_numpy(_row_states(spec.seed, spec.layer_id, coords).view(np.int64)).to(device)
    col_h = torch.from_numpy(V.hash64_np(coords[-1]).view(np.int64)).to(device)
    out = torch.empty((rows.numel(), col_h.numel()), dtype=tdt, device=device)
    step = max(1, DEFAULT_CHUNK_ELEMS // col_h.numel())
    for a in range(0, rows.numel(), step):
        h = V.hash64_torch(rows[a : a + step, None] ^ col_h[None, :])
        if draw.kind == "normal":
            vals = V.gaussian_from_state_torch(h) * draw.std
        else:
            vals = draw.low + (draw.high - draw.low) * V.uniform_from_state_torch(h)
        if tdt in (torch.float16, torch.bfloat16):  # round once: via round-to-odd float32
            vals = round_to_odd_f32(vals)
        out[a : a + step] = vals.to(tdt)
    return out.reshape(tuple(c.size for c in coords))


def round_to_odd_f32(x: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    """float64 -> float32 rounded to odd (truncate, then set the last bit if inexact).

    A later round-to-nearest into a format with at least two fewer significand bits (float16,
    bfloat16) then equals rounding the float64 directly: torch's float64 -> bfloat16/float16
    conversions go through float32 and would otherwise round twice (Boldo & Melquiond 2008).
    """
    if isinstance(x, torch.Tensor):
        y = x.to(torch.float32)
        back = y.to(torch.float64)
        over = back.abs() > x.abs()
        bits = y.view(torch.int32) - over.to(torch.int32)  # step toward zero where RN overshot
        inexact = back != x
        bits = torch.where(inexact, bits | 1, bits)
        return bits.view(torch.float32)
    y = x.astype(np.float32)
    back = y.astype(np.float64)
    bits = y.view(np.int32) - (np.abs(back) > np.abs(x)).astype(np.int32)
    bits = np.where(back != x, bits | 1, bits).astype(np.int32)
    return bits.view(np.float32)


# ----------------------------------------------------------------------------- comparisons


def _as_numpy(weights: Any) -> np.ndarray:
    if isinstance(weights, torch.Tensor):
        weights = weights.detach()
        if weights.dtype == torch.bfloat16:
            weights = weights.to(torch.float32)
        return weights.cpu().numpy()
    arr = np.asarray(weights)
    if arr.dtype not in _NP_FLOATS:
        raise ValueError(f"weights must be a floating array, got dtype {arr.dtype}")
    return arr


def iter_deltas(
    weights: Any,
    spec: TensorInit,
    chunk_elems: int = DEFAULT_CHUNK_ELEMS,
    backend: str | None = None,
) -> Iterator[tuple[slice, np.ndarray]]:
    """Yield ``(rows, |w - w0|)`` in float64 over blocks of leading-axis rows.

    ``w0`` is regenerated in the weights' own dtype, so ``delta == 0`` means bit-identical.
    Peak extra memory is bounded by ``chunk_elems`` (about 40 bytes each) except for
    orthogonal draws, whose QR needs the whole matrix.

    Raises:
        ValueError: shape mismatch between the weights and ``spec``.
    """
    w = _as_numpy(weights)
    if tuple(w.shape) != spec.shape:
        raise ValueError(
            f"weights have shape {tuple(w.shape)} but the init spec says {spec.shape}; "
            "pass the matching layer_id/shape"
        )
    if chunk_elems < 1:
        raise ValueError(f"chunk_elems must be >= 1, got {chunk_elems}")
    row_elems = max(1, math.prod(spec.shape[1:]))
    step = max(1, chunk_elems // row_elems)
    for a in range(0, spec.shape[0], step):
        rows = slice(a, min(a + step, spec.shape[0]))
        w0 = generate(spec, (rows,), dtype=w.dtype, backend=backend)
        yield rows, np.abs(w[rows].astype(np.float64) - w0.astype(np.float64))


def changed_mask(delta: np.ndarray, threshold: float) -> np.ndarray:
    """``True`` where a weight moved by more than ``threshold`` (NaN counts as moved)."""
    return ~(delta <= threshold)
