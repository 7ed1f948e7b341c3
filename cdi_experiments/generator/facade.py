"""``DeterministicNoiseGenerator``: the original tool's API on top of the addressable core."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from cdi_experiments.generator import bits as B
from cdi_experiments.generator import schemes
from cdi_experiments.generator import vectorized as V
from cdi_experiments.generator.core import (
    DEFAULT_CHUNK_ELEMS,
    TensorInit,
    changed_mask,
    check_index,
    check_shape,
    check_threshold,
    generate,
    generate_tensor,
    iter_deltas,
    resolve_backend,
)

DEFAULT_THRESHOLD = 1e-5
"""'Changed' means ``|w - w0| > threshold``; this is the original workflow's default."""


def _indices_or_arrays(indices: tuple[Any, ...]) -> tuple[bool, tuple[Any, ...]]:
    """Validate coordinates: all scalars (scalar path) or any arrays (vectorized path)."""
    if not indices:
        raise ValueError("at least one index is required, e.g. gaussian(layer_id, i, j)")
    if all(isinstance(i, (int, np.integer)) and not isinstance(i, bool) for i in indices):
        return True, tuple(check_index(i) for i in indices)
    arrays = []
    for i in indices:
        a = np.asarray(i)
        if a.dtype.kind not in "iu":
            raise ValueError(f"indices must be integers, got dtype {a.dtype}")
        if a.dtype.kind == "i" and a.size and a.min() < 0:
            raise ValueError("indices must be non-negative")
        arrays.append(a.astype(np.uint64))
    return False, tuple(arrays)


class DeterministicNoiseGenerator:
    """Addressable initial weights: every value is a pure function of (seed, coordinates).

    Bit-level contract (version :data:`bits.GENERATOR_VERSION`): see
    :mod:`cdi_experiments.generator.bits`. Values are identical on every backend and machine.

    Args:
        seed: any integer in [0, 2**64) (0 is a seed like any other).
        backend: ``auto`` (numba on CPU, numpy fallback), ``numba``, ``numpy`` or ``torch``.

    Example:
        >>> gen = DeterministicNoiseGenerator(seed=42)
        >>> round(float(gen.init_matrix(0, (20, 10), mode="he")[0, 0]), 6)
        0.960776
    """

    version = B.GENERATOR_VERSION

    def __init__(self, seed: int = 42, backend: str = "auto") -> None:
        self.seed = check_index(seed, "seed")
        resolve_backend(backend)
        self.backend = backend

    def __repr__(self) -> str:
        return f"DeterministicNoiseGenerator(seed={self.seed}, version={self.version})"

    def identity(self) -> dict[str, Any]:
        """What makes this generator's numbers what they are (stored with runs)."""
        return {"seed": self.seed, "generator_version": self.version}

    # -------------------------------------------------------------- primitives

    def u01(self, *indices: Any) -> float | np.ndarray:
        """Uniform in [0, 1) addressed by ``indices`` (ints: a float; arrays: broadcast)."""
        scalar, idx = _indices_or_arrays(indices)
        if scalar:
            return B.u01(self.seed, *idx)
        h = V.fold_np(np.asarray(self.seed, dtype=np.uint64), *idx)
        return (h >> np.uint64(11)).astype(np.float64) * B.TWO_M53

    def gaussian(self, *indices: Any) -> float | np.ndarray:
        """Standard normal addressed by ``indices`` (ints: a float; arrays: broadcast)."""
        scalar, idx = _indices_or_arrays(indices)
        if scalar:
            return B.gaussian(self.seed, *idx)
        h = V.fold_np(np.asarray(self.seed, dtype=np.uint64), *idx)
        return V.gaussian_from_state_np(np.atleast_1d(h)).reshape(np.shape(h))

    # -------------------------------------------------------------- tensors

    def spec(
        self,
        layer_id: int,
        shape: tuple[int, ...],
        mode: str = "he",
        *,
        orthogonal: bool = False,
        std: float | None = None,
        zero_mean: bool = False,
        **params: Any,
    ) -> TensorInit:
        """The :class:`TensorInit` that ``init_matrix`` with these arguments generates."""
        if std is not None:
            mode, params = "custom", {**params, "std": std}
        return TensorInit(
            self.seed, layer_id, shape, mode, params, zero_mean=zero_mean, orthogonal=orthogonal
        )

    def init_weight(
        self,
        layer_id: int,
        i: int,
        j: int,
        fan_in: int,
        fan_out: int,
        mode: str = "he",
        **params: Any,
    ) -> float:
        """One weight's initial value (float64), from its coordinates alone.

        Uniform schemes use selector 2 of the same coordinates; normal ones Box-Muller.
        """
        draw = schemes.resolve(mode, fan_in, fan_out, params)
        li, i, j = check_index(layer_id, "layer_id"), check_index(i, "i"), check_index(j, "j")
        if draw.kind == "normal":
            return draw.std * B.gaussian(self.seed, li, i, j)
        if draw.kind == "uniform":
            return draw.low + (draw.high - draw.low) * B.u01(self.seed, li, i, j, B.SEL_UNIFORM)
        if draw.kind == "constant":
            return draw.value
        raise ValueError(
            f"init_weight cannot address one element of an orthogonal draw ('{mode}'); use init_matrix"
        )

    def init_matrix(
        self,
        layer_id: int,
        shape: tuple[int, ...],
        mode: str = "he",
        orthogonal: bool = False,
        std: float | None = None,
        dtype: Any = np.float32,
        *,
        index: Any = None,
        **params: Any,
    ) -> np.ndarray:
        """Initial values of a tensor in torch layout ``(out_features, in_features, ...)``.

        Element ``[i, j]`` is ``std * gaussian(layer_id, i, j)`` with ``fan_in = shape[1]``.
        ``index`` (slices per axis) generates just that block, equal to the same block of the
        whole. ``orthogonal=True`` replaces the draw by QR of the deterministic Gaussian,
        rescaled to the mode's std (condition number 1).

        Raises:
            ValueError: bad shape, dtype, mode, std or index.
        """
        spec = self.spec(layer_id, shape, mode, orthogonal=orthogonal, std=std, **params)
        return generate(spec, index, dtype=dtype, backend=self.backend)

    def init_tensor(
        self,
        layer_id: int,
        shape: tuple[int, ...],
        mode: str = "he",
        *,
        dtype: torch.dtype = torch.float32,
        device: Any = None,
        index: Any = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """:meth:`init_matrix` as a torch tensor on ``device`` (CUDA generates on the GPU)."""
        spec = self.spec(layer_id, shape, mode, **kwargs)
        return generate_tensor(spec, index, dtype=dtype, device=device, backend=self.backend)

    def init_conv_kernel(
        self,
        layer_id: int,
        shape: tuple[int, ...],
        mode: str = "he",
        dtype: Any = np.float32,
        **params: Any,
    ) -> np.ndarray:
        """Conv kernel ``(out, in, kh[, kw])`` addressed by all its coordinates, each filter
        shifted to zero mean (computed in float64 before rounding)."""
        shape = check_shape(shape)
        if len(shape) < 3:
            raise ValueError(f"a conv kernel has shape (out, in, k...) with >= 3 dims, got {shape}")
        spec = self.spec(layer_id, shape, mode, zero_mean=True, **params)
        return generate(spec, dtype=dtype, backend=self.backend)

    # -------------------------------------------------------------- analysis

    def check_weight_changed(
        self,
        current_weight: float,
        layer_id: int,
        i: int,
        j: int,
        fan_in: int,
        fan_out: int,
        mode: str = "he",
        threshold: float = DEFAULT_THRESHOLD,
    ) -> tuple[bool, float]:
        """``(changed, delta)`` for one weight; ``delta = current - initial`` (signed).

        The initial value is rounded to float32 first when ``current_weight`` is a float32
        (numpy or torch scalar), so an untouched float32 weight gives delta 0.
        """
        t = check_threshold(threshold)
        w0 = self.init_weight(layer_id, i, j, fan_in, fan_out, mode)
        if isinstance(current_weight, torch.Tensor):
            current_weight = current_weight.detach().cpu().numpy()
        cw = np.asarray(current_weight)
        if cw.shape != ():
            raise ValueError(f"current_weight must be a single number, got shape {cw.shape}")
        if cw.dtype.kind != "f":
            cw = cw.astype(np.float64)
        w0 = float(np.asarray(w0, dtype=np.float64).astype(cw.dtype))
        delta = float(cw) - w0
        return bool(changed_mask(np.abs(np.float64(delta)), t)), delta

    def _deltas(self, weights: Any, layer_id: int, mode: str, chunk_elems: int, **kwargs: Any):
        shape = (
            tuple(np.shape(weights))
            if not isinstance(weights, torch.Tensor)
            else tuple(weights.shape)
        )
        spec = self.spec(layer_id, shape, mode, **kwargs)
        return iter_deltas(weights, spec, chunk_elems, backend=self.backend)

    def analyze_weight_matrix(
        self,
        weights: Any,
        layer_id: int,
        mode: str = "he",
        threshold: float = DEFAULT_THRESHOLD,
        *,
        chunk_elems: int = DEFAULT_CHUNK_ELEMS,
        **kwargs: Any,
    ) -> dict[str, float | int]:
        """Compare trained ``weights`` with their regenerated initial values.

        Returns:
            ``total_weights``, ``changed_weights``, ``sleeping_weights``,
            ``changed_percentage`` (0-100), ``mean_delta`` and ``max_delta`` of ``|w - w0|``.
        """
        t = check_threshold(threshold)
        total = changed = 0
        dsum, dmax = 0.0, 0.0
        for _, delta in self._deltas(weights, layer_id, mode, chunk_elems, **kwargs):
            total += delta.size
            changed += int(changed_mask(delta, t).sum())
            dsum += float(delta.sum())
            dmax = max(dmax, float(delta.max()))
        return {
            "total_weights": total,
            "changed_weights": changed,
            "sleeping_weights": total - changed,
            "changed_percentage": 100.0 * changed / total,
            "mean_delta": dsum / total,
            "max_delta": dmax,
        }

    def get_awakened_mask(
        self,
        weights: Any,
        layer_id: int,
        threshold: float = DEFAULT_THRESHOLD,
        mode: str = "he",
        *,
        chunk_elems: int = DEFAULT_CHUNK_ELEMS,
        **kwargs: Any,
    ) -> np.ndarray:
        """Boolean mask, ``True`` where ``|w - w0| > threshold`` (the weight 'woke up')."""
        t = check_threshold(threshold)
        mask = np.empty(
            np.shape(weights) if not isinstance(weights, torch.Tensor) else tuple(weights.shape),
            dtype=bool,
        )
        for rows, delta in self._deltas(weights, layer_id, mode, chunk_elems, **kwargs):
            mask[rows] = changed_mask(delta, t)
        return mask


def published_check_matrix(
    seed: int = 42, rows: int = 10, cols: int = 20, mode: str = "he"
) -> np.ndarray:
    """The original CLI's matrix: ``rows`` is fan_in there, element ``(i, j)`` is
    ``std(mode, fan_in=rows, fan_out=cols) * gaussian(0, i, j)``."""
    draw = schemes.resolve(mode, rows, cols)
    gen = DeterministicNoiseGenerator(seed)
    return gen.init_matrix(0, (rows, cols), std=schemes.target_std(draw), dtype=np.float64)


__all__ = ["DEFAULT_THRESHOLD", "DeterministicNoiseGenerator", "published_check_matrix"]
