"""How far each parameter moved from its initial value: chunked statistics, per-parameter
tables, awakened masks, and the rewind to exact initial values.

Every function takes either kind of plan: an :class:`~cdi_experiments.modules.InitPlan`
(initial values regenerated in chunks) or a :class:`~cdi_experiments.modules.RecordedPlan`
(compared against its stored copies). Parameters are named canonically
(:mod:`~cdi_experiments.modules.naming`): a compiled or DDP-wrapped module is read through its
wrappers.

Sharded parameters (``DTensor``: FSDP2, tensor parallel, 2-D meshes) are analyzed where they
lie: each rank compares its local shard with the regenerated local ``w0`` (no gather), and
:func:`analyze_module` / :func:`delta_stats` all-reduce counts, sums, maxima and histogram
bins over the default process group, counting a replicated shard once. Those calls are then
collective: every rank must make them, with the same plan. Their counts and bins equal a
single-process analysis of the gathered weights exactly; sums (hence ``mean_delta``) add in
another order and may differ in the last bits.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from cdi_experiments.generator.core import (
    DEFAULT_CHUNK_ELEMS,
    DeltaSummary,
    changed_mask,
    check_threshold,
    delta_summary,
    generate_tensor,
    iter_deltas,
    w0_like,
)
from cdi_experiments.modules.naming import canonical_named_parameters, resolve_module
from cdi_experiments.modules.plan import InitPlan, Plan, RecordedPlan
from cdi_experiments.modules.sharding import (
    all_reduce_,
    as_dtensor_like,
    collective_device,
    counting_copies,
    global_coords,
    is_dtensor,
    local_chunks,
    local_part,
    torch_index,
)

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

    def add_summary(self, summary: DeltaSummary) -> None:
        """Add a :class:`~cdi_experiments.generator.core.DeltaSummary` computed with these
        thresholds (in this order) and :data:`DELTA_EDGES`: the same counts :meth:`add`
        would have added from the deltas themselves."""
        self.total += summary.total
        self.zeros += summary.zeros
        self.nan += summary.nan
        self.total_sum += summary.total_sum
        self.max = max(self.max, summary.max)
        for t, n in zip(self.thresholds, summary.changed, strict=True):
            self.changed[t] = self.changed.get(t, 0) + int(n)
        self.hist += summary.hist

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


def _weight(tensors: Mapping[str, torch.Tensor], plan: Plan, name: str) -> torch.Tensor:
    """``name``'s current value (detached; a DTensor stays one), checked against the plan."""
    if name not in tensors:
        raise ValueError(
            f"parameter {name!r} of the init plan is missing from the model/state dict"
        )
    w = tensors[name].detach()
    if tuple(w.shape) != plan.shape(name):
        raise ValueError(
            f"{name}: shape {tuple(w.shape)} does not match its init plan {plan.shape(name)}"
        )
    return w


def _np_weights(w: torch.Tensor) -> np.ndarray:
    # as generator.core.iter_deltas reads weights: bfloat16 widened to float32
    w = w.detach()
    return (w.float() if w.dtype == torch.bfloat16 else w).cpu().numpy()


def _per_element(spec: Any) -> bool:
    """A spec whose chunks :func:`delta_summary` compares on its own (no whole-tensor step)."""
    return not spec.whole_only and not spec.zero_mean


def param_deltas(
    source: nn.Module | Mapping[str, torch.Tensor],
    plan: Plan,
    name: str,
    chunk_elems: int = DEFAULT_CHUNK_ELEMS,
) -> Iterable[tuple[slice | np.ndarray, np.ndarray]]:
    """``(rows, |w - w0|)`` chunks for one parameter, in float64: over its generator blocks
    (an InitPlan) or its stored copy (a RecordedPlan). ``w0`` is taken in ``w``'s own dtype,
    so a zero delta means bit-identical.

    For a DTensor parameter the chunks cover this rank's local shard only, and ``rows``
    index that local tensor (a slice, or an int array where a strided layout interleaves
    blocks); no communication."""
    w = _weight(_source_tensors(source), plan, name)
    if is_dtensor(w):
        yield from _shard_deltas(w, plan, name, chunk_elems)
        return
    w = w.cpu()
    if isinstance(plan, RecordedPlan):
        yield from _recorded_deltas(w, plan.tensors[name], chunk_elems)
        return
    for b in plan.blocks[name]:
        for rows, delta in iter_deltas(w[b.start : b.stop], b.spec, chunk_elems):
            yield slice(b.start + rows.start, b.start + rows.stop), delta


def _shard_deltas(
    w: torch.Tensor, plan: Plan, name: str, chunk_elems: int
) -> Iterable[tuple[slice | np.ndarray, np.ndarray]]:
    """``(local rows, |w - w0|)`` over this rank's shard of ``w``, from its global
    coordinates, moved to the host chunk by chunk. A RecordedPlan's record is whole: its
    local part is cut out of it."""
    local = local_part(w)
    if local.numel() == 0:
        return
    if isinstance(plan, InitPlan):
        for at, spec, index in local_chunks(w, plan.blocks[name], chunk_elems):
            part = local[torch_index(at)]
            w0 = w0_like(spec, index, part)
            yield at, np.abs(_np_weights(part).astype(np.float64) - w0.astype(np.float64))
        return
    rows, *rest = global_coords(w)
    w0_all = plan.tensors[name].to(local.dtype).double().numpy()  # as _recorded_deltas
    step = max(1, chunk_elems // max(1, math.prod(c.size for c in rest)))
    for a in range(0, rows.size, step):
        at = slice(a, min(a + step, rows.size))
        w0 = w0_all[np.ix_(rows[at], *rest)]
        yield at, np.abs(local[at].double().cpu().numpy() - w0)


def _local_stats(
    w: torch.Tensor,
    plan: Plan,
    name: str,
    ts: tuple[float, ...],
    chunk_elems: int,
    overall: DeltaStats,
    counts: bool = True,
) -> DeltaStats:
    """This rank's summary of ``|w - w0|`` for one parameter (its local shard if a DTensor;
    empty where ``counts`` is False: a copy counted on another rank), also added to
    ``overall``."""
    st = DeltaStats(ts)
    if not counts:
        return st
    if isinstance(plan, RecordedPlan):
        chunks = (
            _shard_deltas(w, plan, name, chunk_elems)
            if is_dtensor(w)
            else _recorded_deltas(w.cpu(), plan.tensors[name], chunk_elems)
        )
        for _, delta in chunks:
            st.add(delta)
            overall.add(delta)
        return st
    local = local_part(w)
    for at, spec, index in local_chunks(w, plan.blocks[name], chunk_elems):
        part = local[torch_index(at)]
        if _per_element(spec):  # the fused generate-compare-count path
            summary = delta_summary(
                part, spec, index, thresholds=ts, edges=DELTA_EDGES, chunk_elems=chunk_elems
            )
            st.add_summary(summary)
            overall.add_summary(summary)
        else:  # whole-only (orthogonal) or zero-mean: compared as iter_deltas does
            w0 = w0_like(spec, index, part)
            delta = np.abs(_np_weights(part).astype(np.float64) - w0.astype(np.float64))
            # added in iter_deltas' row chunks (a whole-only block comes in one piece), so
            # the sums add in the same order as before
            step = max(1, chunk_elems // max(1, math.prod(delta.shape[1:])))
            for a in range(0, delta.shape[0], step):
                st.add(delta[a : a + step])
                overall.add(delta[a : a + step])
    return st


def _all_reduce_stats(stats: list[DeltaStats], device: torch.device) -> None:
    """Sum counts, bins and sums and take the max over ranks, in place: three collectives
    for any number of parameters."""
    ts = stats[0].thresholds
    ints = torch.tensor(
        [
            [s.total, s.zeros, s.nan, *(s.changed.get(t, 0) for t in ts), *s.hist.tolist()]
            for s in stats
        ],
        dtype=torch.int64,
        device=device,
    )
    sums = torch.tensor([s.total_sum for s in stats], dtype=torch.float64, device=device)
    maxs = torch.tensor([s.max for s in stats], dtype=torch.float64, device=device)
    all_reduce_([ints, sums, maxs], ["sum", "sum", "max"])
    ints, sums, maxs = ints.cpu().numpy(), sums.cpu().tolist(), maxs.cpu().tolist()
    k = len(ts)
    for s, row, total_sum, mx in zip(stats, ints, sums, maxs, strict=True):
        s.total, s.zeros, s.nan = int(row[0]), int(row[1]), int(row[2])
        s.changed = {t: int(n) for t, n in zip(ts, row[3 : 3 + k], strict=True)}
        s.hist = row[3 + k :].astype(np.int64)
        s.total_sum, s.max = total_sum, mx


DEFAULT_THRESHOLDS = (0.0, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2)
"""``|w - w0|`` thresholds tracked by default; 0 means exactly unchanged."""
DEFAULT_QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9, 0.99)
"""Quantiles of ``|w - w0|`` reported by default (read from the exact histograms)."""


def thresholds_of(thresholds: Iterable[float]) -> tuple[float, ...]:
    """Validated thresholds, each once, in the given order (a repeat would count twice)."""
    return tuple(dict.fromkeys(check_threshold(t) for t in thresholds))


def delta_stats(
    source: nn.Module | Mapping[str, torch.Tensor],
    plan: Plan,
    thresholds: Iterable[float] = DEFAULT_THRESHOLDS,
    *,
    chunk_elems: int = DEFAULT_CHUNK_ELEMS,
) -> dict[str, DeltaStats]:
    """Per-parameter :class:`DeltaStats` of ``|w - w0|``, plus ``"__total__"`` over all.

    Collective when any parameter is a DTensor: every rank must call it with the same plan;
    each compares only its local shard, and the summaries are all-reduced over the default
    process group (a shard replicated over a mesh dimension is counted once), so every rank
    gets the numbers of the whole tensors: counts and bins exact, sums up to rounding.
    """
    ts = thresholds_of(thresholds)
    tensors = _source_tensors(source)
    weights = {name: _weight(tensors, plan, name) for name in plan.names()}
    sharded = [name for name, w in weights.items() if is_dtensor(w)]
    counts = dict(zip(sharded, counting_copies([weights[n] for n in sharded]), strict=True))
    out: dict[str, DeltaStats] = {}
    overall = DeltaStats(ts)
    for name, w in weights.items():
        out[name] = _local_stats(w, plan, name, ts, chunk_elems, overall, counts.get(name, True))
    if sharded:
        _all_reduce_stats([out[n] for n in sharded], collective_device(weights[sharded[0]]))
        overall = DeltaStats(ts)  # rebuilt from the reduced summaries (local ones were partial)
        for name in plan.names():
            overall.merge(out[name])
    out["__total__"] = overall
    return out


def analyze_module(
    source: nn.Module | Mapping[str, torch.Tensor],
    plan: Plan,
    thresholds: Iterable[float] = DEFAULT_THRESHOLDS,
    *,
    chunk_elems: int = DEFAULT_CHUNK_ELEMS,
    quantiles: Iterable[float] = DEFAULT_QUANTILES,
) -> pd.DataFrame:
    """Per-parameter table of how far each tensor moved from its initial value.

    With an InitPlan, initial values are regenerated in chunks of at most ``chunk_elems``
    elements, so peak extra memory is about ``40 * chunk_elems`` bytes (40 MiB by default)
    whatever the model size (orthogonal/LSUV matrices are regenerated whole: QR needs the
    full matrix). DTensor parameters are compared shard by shard and the call is collective
    (see :func:`delta_stats`).

    Returns:
        One row per parameter: ``name, layer_id, scheme, shape, numel, mean_delta, max_delta,
        q50...`` (a RecordedPlan's rows have an empty ``layer_id`` and scheme ``recorded``)
        and, per threshold ``t``, ``changed@t`` and ``awake_pct@t``; plus a final
        ``__total__`` row.
    """
    ts = thresholds_of(thresholds)
    qs = tuple(quantiles)
    stats = delta_stats(source, plan, ts, chunk_elems=chunk_elems)
    rows = []
    for name in plan.names():
        if isinstance(plan, RecordedPlan):  # no generator address: the values were stored
            layer_id, scheme = "", plan.scheme
        else:
            blocks = plan.blocks[name]
            layer_id = ",".join(str(b.spec.layer_id) for b in blocks)
            scheme = blocks[0].spec.scheme
        rows.append(_stats_row(name, layer_id, scheme, plan.shape(name), stats[name], ts, qs))
    rows.append(_stats_row("__total__", "", plan.scheme, (), stats["__total__"], ts, qs))
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
    """Boolean masks per parameter, ``True`` where ``|w - w0| > threshold``.

    A DTensor parameter gets a DTensor mask laid out like it (same mesh and placements):
    this rank computes and holds only its local shard's mask, with no communication, and
    ``mask.full_tensor()`` gathers the mask a single process computes from the gathered
    weights. Plain parameters get plain CPU masks, as before.
    """
    t = check_threshold(threshold)
    tensors = _source_tensors(source)
    out = {}
    for name in plan.names():
        w = _weight(tensors, plan, name)
        if is_dtensor(w):
            mask = torch.zeros(local_part(w).shape, dtype=torch.bool)
            for rows, delta in _shard_deltas(w, plan, name, chunk_elems):
                mask[torch_index(rows)] = torch.from_numpy(changed_mask(delta, t))
            out[name] = as_dtensor_like(mask, w)
            continue
        mask = torch.empty(plan.shape(name), dtype=torch.bool)
        for rows, delta in param_deltas(source, plan, name, chunk_elems):
            mask[rows] = torch.from_numpy(changed_mask(delta, t))
        out[name] = mask
    return out


def rewind(module: nn.Module, plan: Plan, masks: Mapping[str, torch.Tensor] | None = None) -> None:
    """Reset parameters to their initial values (only where ``masks`` is True), regenerated
    or, for a RecordedPlan, copied from the record.

    A DTensor parameter is rewound shard by shard (each rank regenerates its local ``w0``,
    no communication); its mask may be a DTensor laid out like it (as :func:`awakened_masks`
    returns) or a whole plain mask, of which each rank takes its part.
    """
    tensors = _ModuleTensors(module)
    with torch.no_grad():
        for name in plan.names():
            # a pruned parameter's trainable tensor is <name>_orig; its mask is re-applied by
            # torch's pruning hook on the next forward
            p = tensors[f"{name}_orig"] if f"{name}_orig" in tensors else tensors[name]
            m = None if masks is None or name not in masks else masks[name]
            if is_dtensor(p):
                _rewind_shard(p, plan, name, m)
                continue
            w0 = plan.initial(name, p.dtype, p.device)
            if m is None:
                p.copy_(w0)
            else:
                p.copy_(torch.where(m.to(p.device), w0, p))


def _rewind_shard(p: torch.Tensor, plan: Plan, name: str, mask: torch.Tensor | None) -> None:
    """Rewind this rank's shard of a DTensor parameter, in chunks of its rows."""
    local = local_part(p)
    if local.numel() == 0:
        return
    coords = global_coords(p)
    if mask is not None:
        if is_dtensor(mask):
            mask = local_part(mask)
        else:  # a whole mask: this rank's part of it
            mask = torch.from_numpy(mask.cpu().numpy()[np.ix_(*coords)])
        mask = mask.to(local.device)
    if isinstance(plan, InitPlan):
        chunks: Iterable[tuple[Any, torch.Tensor]] = (
            (at, generate_tensor(spec, index, dtype=local.dtype, device=local.device))
            for at, spec, index in local_chunks(p, plan.blocks[name], DEFAULT_CHUNK_ELEMS)
        )
    else:  # the record is whole: cut out this rank's part
        grid = tuple(torch.from_numpy(c) for c in np.ix_(*coords))
        chunks = [(slice(None), plan.tensors[name].to(local.dtype)[grid].to(local.device))]
    for at, w0 in chunks:
        at = torch_index(at)
        local[at] = w0 if mask is None else torch.where(mask[at], w0, local[at])
        del w0  # before the next chunk is generated


__all__ = [
    "DELTA_EDGES",
    "DeltaStats",
    "analyze_module",
    "awakened_masks",
    "delta_stats",
    "param_deltas",
    "rewind",
]
