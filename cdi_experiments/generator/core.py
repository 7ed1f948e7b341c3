"""Addressable generation of whole tensors, slices of them, and the comparison of trained
weights against their regenerated initial values.

The unit of work is a :class:`TensorInit`: everything needed to regenerate one tensor's
initial values exactly (seed, layer id, shape, scheme and its numbers). Element
``[i0, ..., ik]`` of a normal draw is ``std * gaussian(seed; layer_id, i0, ..., ik)``; torch's
layout is used, so a Linear weight is ``(out_features, in_features)`` and ``fan_in = shape[1]``.
"""

from __future__ import annotations

import functools
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
_KERNEL = (torch.float32, torch.float64)  # dtypes the numba kernels write directly


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
    """torch's fan convention: ``fan_in = shape[1] * receptive`` and
    ``fan_out = shape[0] * receptive``.

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

    @functools.cached_property
    def draw(self) -> schemes.Draw:
        """The resolved draw (computed once: the spec is frozen, its params a private copy)."""
        return schemes.resolve(self.scheme, *self.fans, self.params)

    @property
    def plain(self) -> bool:
        """True when each value is the scheme's own draw: no orthogonalization, filter mean or
        extra scale."""
        return not self.orthogonal and not self.zero_mean and self.scale == 1.0

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


def _nd_args(
    spec: TensorInit, coords: tuple[np.ndarray, ...]
) -> tuple[np.uint64, np.ndarray, np.ndarray, np.ndarray]:
    """The n-d kernels' view of a coordinate grid: ``fold(seed, layer_id)``, the per-axis
    coordinate hashes concatenated, their offsets and the axis lengths."""
    base = np.uint64(B.fold(spec.seed, spec.layer_id))
    flat = np.concatenate(coords)
    axis_h = np.empty_like(flat)
    _nk.hash_all(flat, axis_h)
    sizes = np.array([c.size for c in coords], dtype=np.int64)
    offs = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    return base, axis_h, offs, sizes


def _n_parts(n: int) -> int:
    """Work items for a kernel over ``n`` elements: a few per thread, none tiny."""
    return int(max(1, min(n // 32768, 4 * _nk.nb.get_num_threads())))


def _draw_numba(
    spec: TensorInit,
    coords: tuple[np.ndarray, ...],
    kind: int,
    p0: float,
    p1: float,
    dtype: np.dtype,
    into: np.ndarray | None = None,
) -> np.ndarray:
    """The numba n-d kernel's values on ``coords``, rounded once to ``dtype`` (written into
    ``into`` when it is a C-contiguous array of the kernel's dtype)."""
    base, axis_h, offs, sizes = _nd_args(spec, coords)
    n = int(np.prod(sizes))
    kdt = dtype if dtype in (np.dtype(np.float32), np.dtype(np.float64)) else np.dtype(np.float64)
    if into is not None and into.dtype == kdt and into.flags.c_contiguous:
        out = into.reshape(-1)  # a view: the kernel writes the caller's array directly
    else:
        out = np.empty(n, dtype=kdt)
    if kind == _nk.KIND_NORMAL:
        _nk.gaussian_grid(base, axis_h, offs, sizes, float(p0), out, _n_parts(n))
    else:
        _nk.uniform_grid(base, axis_h, offs, sizes, float(p0), float(p1), out, _n_parts(n))
    return out.astype(dtype, copy=False).reshape(tuple(c.size for c in coords))


def _kernel_draw(spec: TensorInit) -> tuple[int, float, float] | None:
    """The numba kernels' ``(kind, p0, p1)`` for a plain normal (``p0 * gaussian``) or
    uniform (``p0 + p1 * u01``) spec; None for anything they do not draw."""
    draw = spec.draw
    if not spec.plain or draw.kind not in ("normal", "uniform") or _nk is None:
        return None
    if draw.kind == "normal":
        return _nk.KIND_NORMAL, float(draw.std), 0.0
    return _nk.KIND_UNIFORM, float(draw.low), float(draw.high - draw.low)


def _standard_normal(
    spec: TensorInit, coords: tuple[np.ndarray, ...], scale: float, dtype: np.dtype, backend: str
) -> np.ndarray:
    """``scale * gaussian`` on the coordinate grid, cast to ``dtype`` (numpy result)."""
    if backend == "numba":
        return _draw_numba(spec, coords, _nk.KIND_NORMAL, scale, 0.0, dtype)
    rows = _row_states(spec.seed, spec.layer_id, coords)
    col_h = V.hash64_np(coords[-1])
    out_shape = tuple(c.size for c in coords)
    out = np.empty((rows.size, col_h.size), dtype=dtype)
    step = max(1, DEFAULT_CHUNK_ELEMS // col_h.size)
    for a in range(0, rows.size, step):
        h = V.hash64_np(rows[a : a + step, None] ^ col_h[None, :])
        out[a : a + step] = (V.gaussian_from_state_np(h) * scale).astype(dtype)
    return out.reshape(out_shape)


def _uniform(
    spec: TensorInit,
    coords: tuple[np.ndarray, ...],
    low: float,
    high: float,
    dtype: np.dtype,
    backend: str = "numpy",
) -> np.ndarray:
    width = high - low
    if backend == "numba":
        return _draw_numba(spec, coords, _nk.KIND_UNIFORM, low, width, dtype)
    rows = _row_states(spec.seed, spec.layer_id, coords)
    col_h = V.hash64_np(coords[-1])
    out = np.empty((rows.size, col_h.size), dtype=dtype)
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
        return _uniform(spec, coords, draw.low, draw.high, np.dtype(np.float64), backend)
    return _standard_normal(spec, coords, draw.std, np.dtype(np.float64), backend)


def generate(
    spec: TensorInit,
    index: Any = None,
    *,
    dtype: Any = np.float32,
    backend: str | None = None,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """The initial values of ``spec`` (or the block ``index`` selects), as a numpy array.

    Any block equals the same block of the whole tensor, bit for bit, so shards and chunks can
    be generated independently. Orthogonal draws are computed whole and then sliced; filters
    of ``zero_mean`` tensors are generated whole along their non-leading axes.

    Args:
        spec: what to generate.
        index: optional per-axis selection (slices, ints or int arrays), numpy-style.
        dtype: float16, float32 or float64; values are computed in float64 and rounded once.
        backend: ``auto``, ``numba``, ``numpy`` (bit-identical) or ``torch`` (see
            :func:`generate_tensor`).
        out: optional array of the block's shape and ``dtype`` to write into and return (the
            numba kernels fill a C-contiguous float32/float64 one in place, without a
            temporary; float16 goes through a float64 temporary).

    Raises:
        ValueError: bad shape, dtype, index, scheme, parameters or ``out``.
    """
    dt = _np_dtype(dtype)
    backend = resolve_backend(backend)
    if out is not None:
        block = tuple(c.size for c in _normalize_index(index, spec.shape))
        if not isinstance(out, np.ndarray) or out.shape != block or out.dtype != dt:
            got = (getattr(out, "shape", None), getattr(out, "dtype", type(out).__name__))
            raise ValueError(
                f"out must be a numpy array of shape {block} and dtype {dt}, got {got}; "
                "pass out=None to allocate"
            )
        if backend == "numba" and _kernel_draw(spec) is not None:
            coords = _normalize_index(index, spec.shape)
            vals = _draw_numba(spec, coords, *_kernel_draw(spec), dt, into=out)
            if not np.may_share_memory(vals, out):  # not filled in place (strided out)
                out[...] = vals
            return out
        out[...] = generate(spec, index, dtype=dt, backend=backend)
        return out
    if backend == "torch":
        return generate_tensor(spec, index, dtype=_torch_dtype(dt), backend="torch").numpy()
    coords = _normalize_index(index, spec.shape)
    draw = spec.draw
    if spec.plain and draw.kind == "normal":  # the hot path: one pass, rounding straight to dt
        return _standard_normal(spec, coords, draw.std, dt, backend)
    if spec.plain and draw.kind == "uniform":  # low + width * u01 in float64, rounded once
        return _uniform(spec, coords, draw.low, draw.high, dt, backend)
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
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Like :func:`generate`, as a torch tensor on ``device``.

    With ``out`` (a tensor of the block's shape; ``dtype`` and ``device`` are then taken from
    it), the values are written into it and it is returned: a CPU float16/32/64 ``out`` is
    filled in place (float32/float64 by the kernels directly, without a temporary; float16
    through a float64 temporary), without a torch copy.

    On the CPU the numba/numpy kernels run and the result is wrapped without a copy; on a GPU
    the torch backend generates on the device (plain normal and uniform draws; other kinds are
    generated on the CPU and moved). Bits are the same on every path.
    """
    if out is not None:
        block = tuple(c.size for c in _normalize_index(index, spec.shape))
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != block:
            raise ValueError(
                f"out must be a tensor of shape {block}, got "
                f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}"
            )
        on_cpu = out.device.type == "cpu"
        if not on_cpu and backend in ("numba", "numpy"):  # CPU kernels, then copied over
            with torch.no_grad():
                out.copy_(generate_tensor(spec, index, dtype=out.dtype, backend=backend))
            return out
        cpu_kernel = resolve_backend(backend, out.device) != "torch"
        if cpu_kernel and out.dtype in (torch.float16, torch.float32, torch.float64):
            generate(
                spec, index, dtype=_np_dtype(out.dtype), backend=backend, out=out.detach().numpy()
            )
        else:
            with torch.no_grad():
                out.copy_(
                    generate_tensor(
                        spec, index, dtype=out.dtype, device=out.device, backend=backend
                    )
                )
        return out
    tdt = _torch_dtype(dtype)
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type != "cpu" and backend in ("numba", "numpy"):  # CPU kernels, then move
        return generate_tensor(spec, index, dtype=dtype, backend=backend).to(device)
    backend = resolve_backend(backend, device)
    draw = spec.draw
    if backend == "numba" and _kernel_draw(spec) is not None and tdt in _KERNEL:
        # into torch's own allocation: numpy asks for transparent huge pages on big arrays,
        # and where the kernel must compact memory for them first (THP defrag=madvise) the
        # first touch stalls (measured: 4096^2 float32 at 125 ms against 52 ms this way)
        block = tuple(c.size for c in _normalize_index(index, spec.shape))
        return generate_tensor(spec, index, backend=backend, out=torch.empty(block, dtype=tdt))
    if backend != "torch" or not spec.plain or draw.kind not in ("normal", "uniform"):
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
        w0 = w0_like(spec, (rows,), weights, backend)
        yield rows, np.abs(w[rows].astype(np.float64) - w0.astype(np.float64))


def changed_mask(delta: np.ndarray, threshold: float) -> np.ndarray:
    """``True`` where a weight moved by more than ``threshold`` (NaN counts as moved)."""
    return ~(delta <= threshold)


# ----------------------------------------------------------------------------- delta summaries


@dataclass
class DeltaSummary:
    """Exact summary of ``|w - w0|`` (float64) over a tensor or a block of one.

    The same quantities as :class:`cdi_experiments.modules.analysis.DeltaStats` accumulates:
    counts and bins merge exactly across chunks, shards and ranks (plain sums), ``max`` by max.

    Attributes:
        total: elements summarized.
        zeros: finite deltas equal to 0 (bit-identical weights).
        nan: NaN deltas.
        total_sum: sum of the non-NaN deltas (may be inf).
        max: largest non-NaN delta (0.0 when there is none).
        changed: per threshold, elements with ``not (delta <= t)`` (NaN counts as changed).
        hist: ``np.histogram`` counts of the deltas that are non-NaN and > 0 over ``edges``
            (bins half-open ``[e_k, e_k+1)``, the last one closed).
    """

    total: int
    zeros: int
    nan: int
    total_sum: float
    max: float
    changed: np.ndarray
    hist: np.ndarray

    @classmethod
    def empty(cls, n_thresholds: int, n_bins: int) -> DeltaSummary:
        """A summary of nothing, to :meth:`merge` into."""
        return cls(0, 0, 0, 0.0, 0.0, np.zeros(n_thresholds, np.int64), np.zeros(n_bins, np.int64))

    def merge(self, other: DeltaSummary) -> None:
        """Add ``other`` in place (same thresholds and edges)."""
        if other.changed.shape != self.changed.shape or other.hist.shape != self.hist.shape:
            raise ValueError(
                f"cannot merge a summary of {other.changed.size} thresholds/{other.hist.size} bins "
                f"into one of {self.changed.size}/{self.hist.size}; use the same thresholds and edges"
            )
        self.total += other.total
        self.zeros += other.zeros
        self.nan += other.nan
        self.total_sum += other.total_sum
        self.max = max(self.max, other.max)
        self.changed += other.changed
        self.hist += other.hist

    def add_deltas(self, delta: np.ndarray, thresholds: Sequence[float], edges: np.ndarray) -> None:
        """Summarize a float64 array of deltas into this one (the numpy reference)."""
        flat = delta.reshape(-1)
        nan = np.isnan(flat)
        finite = flat[~nan]  # non-NaN: +inf stays, as in DeltaStats.add
        self.total += flat.size
        self.nan += int(nan.sum())
        self.zeros += int((finite == 0).sum())
        self.total_sum += float(finite.sum())
        if finite.size:
            self.max = max(self.max, float(finite.max()))
        for k, t in enumerate(thresholds):
            self.changed[k] += int(changed_mask(flat, t).sum())
        self.hist += np.histogram(finite[finite > 0], bins=edges)[0]


def _check_edges(edges: Any) -> np.ndarray:
    e = np.asarray(edges, dtype=np.float64)
    if e.ndim != 1 or e.size < 2 or np.isnan(e).any() or not (np.diff(e) > 0).all():
        raise ValueError(
            f"edges must be a 1-D increasing sequence of >= 2 numbers (inf allowed), got {edges!r}"
        )
    return e


def _block_chunks(
    sizes: tuple[int, ...], chunk_elems: int
) -> Iterator[tuple[tuple[slice, ...], int]]:
    """Local sub-blocks of a block of ``sizes`` with at most ``chunk_elems`` elements each
    (rows of the trailing axes whole where they fit), as slices plus their element count."""
    k = len(sizes) - 1
    while k >= 0 and math.prod(sizes[k:]) <= chunk_elems:
        k -= 1
    if k < 0:  # the whole block fits
        yield tuple(slice(None) for _ in sizes), math.prod(sizes)
        return
    inner = math.prod(sizes[k + 1 :])
    step = max(1, chunk_elems // inner)
    for lead in np.ndindex(*sizes[:k]):
        for a in range(0, sizes[k], step):
            b = min(a + step, sizes[k])
            sl = tuple(slice(i, i + 1) for i in lead) + (slice(a, b),)
            yield sl + tuple(slice(None) for _ in sizes[k + 1 :]), (b - a) * inner


def w0_like(spec: TensorInit, index: Any, weights: Any, backend: str | None = None) -> np.ndarray:
    """The initial values of the block ``index`` selects, in the dtype of ``weights`` (a numpy
    array or a torch tensor), as a numpy array: what ``weights`` is compared against, so that
    a zero delta means bit-identical. bfloat16 weights get bfloat16 values, widened exactly to
    float32 (numpy has no bfloat16), as the weights themselves are read."""
    if isinstance(weights, torch.Tensor) and weights.dtype == torch.bfloat16:
        return generate_tensor(spec, index, dtype=torch.bfloat16, backend=backend).float().numpy()
    return generate(spec, index, dtype=_as_numpy(weights).dtype, backend=backend)


def _w0_block(spec: TensorInit, coords: tuple[np.ndarray, ...], w: Any, backend: str | None):
    """:func:`w0_like` on the coordinate grid ``coords``."""
    return w0_like(spec, tuple(c.astype(np.int64) for c in coords), w, backend)


def _fused_ok(spec: TensorInit, w_np: np.ndarray, weights: Any, backend: str) -> bool:
    """Whether the fused numba kernel covers this case: a per-element normal or uniform draw
    compared against float32/float64 weights."""
    if backend != "numba" or isinstance(weights, torch.Tensor) and weights.dtype == torch.bfloat16:
        return False
    return _kernel_draw(spec) is not None and w_np.dtype in (
        np.dtype(np.float32),
        np.dtype(np.float64),
    )


def _bin_search(edges: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """The fused kernel's bin search over ``edges``: ``(edges padded with +inf, bin of
    exponent, steps)``. For each biased float64 exponent, the bin holding the smallest
    positive double with it (``searchsorted(edges, v, 'right') - 1``; -1 below the first
    edge); ``steps``, the most edges above that start within one exponent's range, and as
    many +inf after the edges, so that the kernel's fixed steps stay in bounds."""
    with np.errstate(over="ignore"):
        smallest = np.ldexp(1.0, np.arange(2048) - 1023)
    smallest[0] = np.nextafter(0.0, 1.0)  # subnormals
    smallest[2047] = np.inf
    start = (np.searchsorted(edges, smallest, side="right") - 1).astype(np.int64)
    steps = int(max(1, np.diff(start).max()))
    padded = np.concatenate([edges, np.full(steps, np.inf)])
    return padded, start, steps


def _fused_summary(
    w_np: np.ndarray,
    spec: TensorInit,
    coords: tuple[np.ndarray, ...],
    sizes: tuple[int, ...],
    ts: tuple[float, ...],
    edges: np.ndarray,
    chunk_elems: int,
    out: DeltaSummary,
) -> None:
    """:func:`delta_summary` through the fused generate-compare-histogram kernel, chunk by
    chunk (a non-contiguous chunk of the weights is copied; the rest is read in place)."""
    kind, p0, p1 = _kernel_draw(spec)
    thresholds = np.asarray(ts, dtype=np.float64)
    padded, start, steps = _bin_search(edges)
    like = np.empty(0, dtype=w_np.dtype)
    for sl, n in _block_chunks(sizes, chunk_elems):
        sub = tuple(c[s] for c, s in zip(coords, sl, strict=True))
        base, axis_h, offs, sub_sizes = _nd_args(spec, sub)
        w = np.ascontiguousarray(w_np[sl]).reshape(-1)
        counts, sums, changed, hist = _nk.delta_grid(
            kind,
            base,
            axis_h,
            offs,
            sub_sizes,
            p0,
            p1,
            w,
            like,
            thresholds,
            padded,
            edges.size,
            start,
            steps,
            _n_parts(n),
        )
        out.total += n
        out.nan += int(counts[:, 0].sum())
        out.zeros += int(counts[:, 1].sum())
        out.total_sum += float(sums[:, 0].sum())
        out.max = max(out.max, float(sums[:, 1].max()))
        out.changed += changed[:, : len(ts)].sum(axis=0)
        out.hist += hist.sum(axis=0)


def delta_summary(
    weights: Any,
    spec: TensorInit,
    index: Any = None,
    *,
    thresholds: Sequence[float],
    edges: Any,
    chunk_elems: int = DEFAULT_CHUNK_ELEMS,
    backend: str | None = None,
) -> DeltaSummary:
    """Summarize ``|w - w0|`` for the block of ``spec`` that ``index`` selects.

    ``w0`` is regenerated in the weights' own dtype (bfloat16 included), so a zero delta means
    bit-identical; the deltas are taken in float64. Counts and bins equal
    :meth:`DeltaSummary.add_deltas` over the whole block exactly, whatever the chunking,
    backend or sharding; ``total_sum`` agrees to float rounding (its summation order varies).
    Peak extra memory is bounded by ``chunk_elems`` except for orthogonal draws (the QR needs
    the whole matrix) and ``zero_mean`` filters (generated whole).

    Args:
        weights: the block's current values (numpy array or torch tensor, any float dtype),
            shaped as the block ``index`` selects.
        spec: the tensor's init spec (global shape).
        index: per-axis selection in global coordinates, as in :func:`generate`; ``None`` is
            the whole tensor.
        thresholds: counts of ``not (delta <= t)`` are kept per threshold.
        edges: histogram edges, increasing (the last may be ``inf``).
        chunk_elems: elements regenerated at once.
        backend: generator backend (see :func:`resolve_backend`).

    Raises:
        ValueError: a shape mismatch, bad thresholds, edges, index or chunk size.
    """
    ts = tuple(check_threshold(t) for t in thresholds)
    e = _check_edges(edges)
    if isinstance(chunk_elems, bool) or not isinstance(chunk_elems, (int, np.integer)):
        raise ValueError(f"chunk_elems must be an int >= 1, got {chunk_elems!r}")
    if chunk_elems < 1:
        raise ValueError(f"chunk_elems must be >= 1, got {chunk_elems}")
    coords = _normalize_index(index, spec.shape)
    sizes = tuple(c.size for c in coords)
    w_np = _as_numpy(weights)
    if tuple(w_np.shape) != sizes:
        raise ValueError(
            f"weights have shape {tuple(w_np.shape)} but index {index!r} selects a block of shape "
            f"{sizes} of {spec.shape}; pass the block's weights (keep size-1 axes)"
        )
    out = DeltaSummary.empty(len(ts), e.size - 1)
    if _fused_ok(spec, w_np, weights, resolve_backend(backend)):
        _fused_summary(w_np, spec, coords, sizes, ts, e, chunk_elems, out)
        return out
    if spec.whole_only:  # the QR needs the whole matrix anyway: generate the block once
        w0 = _w0_block(spec, coords, weights, backend)
        for sl, _ in _block_chunks(sizes, chunk_elems):
            out.add_deltas(np.abs(w_np[sl].astype(np.float64) - w0[sl]), ts, e)
        return out
    for sl, _ in _block_chunks(sizes, chunk_elems):
        sub = tuple(c[s] for c, s in zip(coords, sl, strict=True))
        w0 = _w0_block(spec, sub, weights, backend)
        out.add_deltas(np.abs(w_np[sl].astype(np.float64) - w0.astype(np.float64)), ts, e)
    return out
