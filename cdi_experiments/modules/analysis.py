"""How far each parameter moved from its initial value: chunked statistics, per-parameter
tables, awakened masks, and the rewind to exact initial values.

Every function takes either kind of plan: an :class:`~cdi_experiments.modules.InitPlan`
(initial values regenerated in chunks) or a :class:`~cdi_experiments.modules.RecordedPlan`
(compared against its stored copies). Parameters are named canonically
(:mod:`~cdi_experiments.modules.naming`): a compiled or DDP-wrapped module is read through its
wrappers.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from cdi_experiments.generator.core import (
    DEFAULT_CHUNK_ELEMS,
    changed_mask,
    check_threshold,
    iter_deltas,
)
from cdi_experiments.modules.naming import canonical_named_parameters, resolve_module
from cdi_experiments.modules.plan import Plan, RecordedPlan

# Fixed log-spaced edges for |w - w0| histograms (8 bins per decade from 1e-10 to 10): counts
# merge across chunks and epochs, and give the awakened share at any threshold afterwards.
DELTA_EDGES = np.concatenate([[0.0], np.logspace(-10, 1, 89), [np.inf]])


@dataclass
class DeltaStats:
    """Running summary of ``|w - w0|`` over chunks: exact counts at the requested thresholds,
    exact zero count, sum and max, and a fixed-edge histogram for everything else."""

    thresholds: tuple[float, ...]
    total: int = 0
    zeros: int = 0
    nan: int = 0
    total_sum: float = 0.0
    max: float = 0.0
    changed: dict[float, int] = field(default_factory=dict)
    hist: np.ndarray = field(default_factory=lambda: np.zeros(len(DELTA_EDGES) - 1, dtype=np.int64))

    def add(self, delta: np.ndarray) -> None:
        flat = delta.reshape(-1)
        nan = np.isnan(flat)
        self.total += flat.size
        self.nan += int(nan.sum())
        finite = flat[~nan]
        self.zeros += int((finite == 0).sum())
        self.total_sum += float(finite.sum())
        if finite.size:
            self.max = max(self.max, float(finite.max()))
        for t in self.thresholds:
            self.changed[t] = self.changed.get(t, 0) + int(changed_mask(flat, t).sum())
        self.hist += np.histogram(finite[finite > 0], bins=DELTA_EDGES)[0]

    def merge(self, other: DeltaStats) -> None:
        """Add another summary's counts (exact: counts, sums, max and bins simply add)."""
        self.total += other.total
        self.zeros += other.zeros
        self.nan += other.nan
        self.total_sum += other.total_sum
        self.max = max(self.max, other.max)
        for t in self.thresholds:
            self.changed[t] = self.changed.get(t, 0) + other.changed.get(t, 0)
        self.hist += other.hist

    def pct_changed(self, threshold: float) -> float:
        return 100.0 * self.changed[threshold] / self.total

    @property
    def mean(self) -> float:
        return self.total_sum / max(1, self.total - self.nan)

    def quantile(self, q: float) -> float:
        """Approximate quantile of ``|w - w0|`` from the histogram (exact at 0; otherwise
        log-interpolated within a bin, so within a factor 10**(1/8) of the true value)."""
        if not 0 <= q <= 1:
            raise ValueError(f"quantile must be in [0, 1], got {q}")
        rank = q * (self.total - self.nan)
        if rank <= self.zeros:
            return 0.0
        cum = self.zeros
        for k, count in enumerate(self.hist):
            if count and cum + count >= rank:
                lo, hi = DELTA_EDGES[k], DELTA_EDGES[k + 1]
                if not np.isfinite(hi):
                    return self.max
                lo = max(lo, 1e-12)
                frac = (rank - cum) / count
                return float(min(self.max, lo * (hi / lo) ** frac))
            cum += count
        return self.max


def _source_tensors(source: nn.Module | Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    if isinstance(source, nn.Module):
        return _ModuleTensors(source)
    if isinstance(source, Mapping):
        return _StateTensors(source)
    raise ValueError(f"analyze needs an nn.Module or a state dict, got {type(source).__name__}")


class _Lookup(Mapping):
    """A read-only mapping whose membership is "``self[name]`` resolves" (pruned pairs and
    wrapper aliases included), not "the key is stored"."""

    def __contains__(self, name: object) -> bool:
        try:
            self[name]  # type: ignore[index]
        except KeyError:
            return False
        return True


class _ModuleTensors(_Lookup):
    """A module's tensors by canonical parameter name (wrappers looked through); a pruned
    parameter (torch.nn.utils.prune keeps ``<name>_orig`` and ``<name>_mask``) resolves to its
    effective, masked value."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __getitem__(self, name: str) -> torch.Tensor:
        mod_name, _, local = name.rpartition(".")
        try:
            sub, _ = resolve_module(self.module, mod_name)
            orig, mask = getattr(sub, f"{local}_orig", None), getattr(sub, f"{local}_mask", None)
            if isinstance(orig, torch.Tensor) and isinstance(mask, torch.Tensor):
                # not the ``<name>`` attribute: torch's pruning hook refreshes it only on the next
                # forward, so it is stale after an optimizer step or a rewind
                return orig * mask
            value = getattr(sub, local)
        except AttributeError:
            raise KeyError(name) from None
        if not isinstance(value, torch.Tensor):
            raise KeyError(name)
        return value

    def __iter__(self):
        return (n for n, _ in canonical_named_parameters(self.module))

    def __len__(self) -> int:
        return sum(1 for _ in canonical_named_parameters(self.module))


# wrapper segments that no user module can be named (``module`` of DDP is ambiguous in a bare
# state dict; strip it with torch.nn.modules.utils.consume_prefix_in_state_dict_if_present)
_RESERVED_SEGMENTS = frozenset({"_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"})


def _strip_reserved(key: str) -> str:
    return ".".join(s for s in key.split(".") if s not in _RESERVED_SEGMENTS)


class _StateTensors(_Lookup):
    """A state dict by parameter name, resolving pruned ``<name>_orig * <name>_mask`` pairs;
    keys saved from a compiled/FSDP/checkpoint-wrapped module are found by canonical name."""

    def __init__(self, state: Mapping[str, torch.Tensor]) -> None:
        self.state = state
        self.alias = {_strip_reserved(k): k for k in state if _strip_reserved(k) != k}

    def _get(self, key: str) -> torch.Tensor | None:
        if key in self.state:
            return self.state[key]
        return self.state.get(self.alias[key]) if key in self.alias else None

    def __getitem__(self, name: str) -> torch.Tensor:
        value = self._get(name)
        if value is not None:
            return value
        orig, mask = self._get(f"{name}_orig"), self._get(f"{name}_mask")
        if orig is None or mask is None:
            raise KeyError(name)
        return orig * mask

    def __iter__(self):
        return iter(self.state)

    def __len__(self) -> int:
        return len(self.state)


def param_deltas(
    source: nn.Module | Mapping[str, torch.Tensor],
    plan: Plan,
    name: str,
    chunk_elems: int = DEFAULT_CHUNK_ELEMS,
) -> Iterable[tuple[slice, np.ndarray]]:
    """``(rows, |w - w0|)`` chunks for one parameter, in float64: over its generator blocks
    (an InitPlan) or its stored copy (a RecordedPlan). ``w0`` is taken in ``w``'s own dtype,
    so a zero delta means bit-identical."""
    tensors = _source_tensors(source)
    if name not in tensors:
        raise ValueError(
            f"parameter {name!r} of the init plan is missing from the model/state dict"
        )
    w = tensors[name].detach().cpu()
    if tuple(w.shape) != plan.shape(name):
        raise ValueError(
            f"{name}: shape {tuple(w.shape)} does not match its init plan {plan.shape(name)}"
        )
    if isinstance(plan, RecordedPlan):
        yield from _recorded_deltas(w, plan.tensors[name], chunk_elems)
        return
    for b in plan.blocks[name]:
        for rows, delta in iter_deltas(w[b.start : b.stop], b.spec, chunk_elems):
            yield slice(b.start + rows.start, b.start + rows.stop), delta


def _recorded_deltas(
    w: torch.Tensor, w0: torch.Tensor, chunk_elems: int
) -> Iterable[tuple[slice, np.ndarray]]:
    """As :func:`~cdi_experiments.generator.core.iter_deltas`, against a stored ``w0`` (cast
    to ``w``'s dtype first: exact when it was recorded in that dtype)."""
    w0 = w0.to(w.dtype)
    if w.dim() == 0:  # a scalar parameter: one "row"
        w, w0 = w.reshape(1), w0.reshape(1)
    row_elems = max(1, w[0].numel())
    step = max(1, chunk_elems // row_elems)
    for a in range(0, w.shape[0], step):
        rows = slice(a, min(a + step, w.shape[0]))
        yield rows, (w[rows].double() - w0[rows].double()).abs().numpy()


def analyze_module(
    source: nn.Module | Mapping[str, torch.Tensor],
    plan: Plan,
    thresholds: Iterable[float] = (0.0, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2),
    *,
    chunk_elems: int = DEFAULT_CHUNK_ELEMS,
    quantiles: Iterable[float] = (0.1, 0.25, 0.5, 0.75, 0.9, 0.99),
) -> pd.DataFrame:
    """Per-parameter table of how far each tensor moved from its initial value.

    With an InitPlan, initial values are regenerated in chunks of at most ``chunk_elems`` elements, so peak extra
    memory is about ``40 * chunk_elems`` bytes (40 MiB by default) whatever the model size
    (orthogonal/LSUV matrices are regenerated whole: QR needs the full matrix).

    Returns:
        One row per parameter: ``name, layer_id, scheme, shape, numel, mean_delta, max_delta,
        q50...`` (a RecordedPlan's rows have an empty ``layer_id`` and scheme ``recorded``) and, per threshold ``t``, ``changed@t`` and ``awake_pct@t``; plus a final
        ``__total__`` row.
    """
    ts = tuple(check_threshold(t) for t in thresholds)
    qs = tuple(quantiles)
    rows = []
    overall = DeltaStats(ts)
    for name in plan.names():
        st = DeltaStats(ts)
        for _, delta in param_deltas(source, plan, name, chunk_elems):
            st.add(delta)
            overall.add(delta)
        if isinstance(plan, RecordedPlan):  # no generator address: the values were stored
            layer_id, scheme = "", plan.scheme
        else:
            blocks = plan.blocks[name]
            layer_id = ",".join(str(b.spec.layer_id) for b in blocks)
            scheme = blocks[0].spec.scheme
        rows.append(_stats_row(name, layer_id, scheme, plan.shape(name), st, ts, qs))
    rows.append(_stats_row("__total__", "", plan.scheme, (), overall, ts, qs))
    return pd.DataFrame(rows)


def _stats_row(name, layer_id, scheme, shape, st: DeltaStats, ts, qs) -> dict[str, Any]:
    row: dict[str, Any] = {
        "name": name,
        "layer_id": layer_id,
        "scheme": scheme,
        "shape": "x".join(map(str, shape)),
        "numel": st.total,
        "mean_delta": st.mean,
        "max_delta": st.max,
    }
    for q in qs:
        row[f"q{round(q * 100):02d}_delta"] = st.quantile(q)
    for t in ts:
        row[f"changed@{t:g}"] = st.changed[t]
        row[f"awake_pct@{t:g}"] = st.pct_changed(t)
    return row


def awakened_masks(
    source: nn.Module | Mapping[str, torch.Tensor],
    plan: Plan,
    threshold: float,
    chunk_elems: int = DEFAULT_CHUNK_ELEMS,
) -> dict[str, torch.Tensor]:
    """Boolean masks per parameter, ``True`` where ``|w - w0| > threshold``."""
    t = check_threshold(threshold)
    out = {}
    for name in plan.names():
        mask = torch.empty(plan.shape(name), dtype=torch.bool)
        for rows, delta in param_deltas(source, plan, name, chunk_elems):
            mask[rows] = torch.from_numpy(changed_mask(delta, t))
        out[name] = mask
    return out


def rewind(module: nn.Module, plan: Plan, masks: Mapping[str, torch.Tensor] | None = None) -> None:
    """Reset parameters to their initial values (only where ``masks`` is True), regenerated
    or, for a RecordedPlan, copied from the record."""
    tensors = _ModuleTensors(module)
    with torch.no_grad():
        for name in plan.names():
            # a pruned parameter's trainable tensor is <name>_orig; its mask is re-applied by
            # torch's pruning hook on the next forward
            p = tensors[f"{name}_orig"] if f"{name}_orig" in tensors else tensors[name]
            w0 = plan.initial(name, p.dtype, p.device)
            if masks is None or name not in masks:
                p.copy_(w0)
            else:
                m = masks[name].to(p.device)
                p.copy_(torch.where(m, w0, p))


__all__ = [
    "DELTA_EDGES",
    "DeltaStats",
    "analyze_module",
    "awakened_masks",
    "param_deltas",
    "rewind",
]
