"""Deterministic initialization of whole ``nn.Module``s, and their analysis against the
regenerated initial values.

:func:`init_module` walks a module, writes every supported parameter from the generator and
returns an :class:`InitPlan`: for each parameter, the :class:`TensorInit` blocks that
regenerate it. Layers are addressed by a stable id derived from the parameter's name
(``layer_ids="name"``, the default), so adding a layer never reshuffles the others; integer
ids in module order (``layer_ids="index"``) match the original tool's numbering.

Supported: Linear, Conv1d/2d/3d (and transposed), Embedding, MultiheadAttention (the packed
``in_proj_weight`` is split into Q, K and V blocks, each addressed and scaled as its own
``(E, E)`` matrix), and norm layers (weight ones, bias zeros). Other parameters are left as
they are and not tracked.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from cdi_experiments import schemes
from cdi_experiments.generator import bits as B
from cdi_experiments.generator.core import (
    DEFAULT_CHUNK_ELEMS,
    TensorInit,
    changed_mask,
    check_threshold,
    fans,
    generate,
    generate_tensor,
    iter_deltas,
    layer_id_for,
)

log = logging.getLogger(__name__)

LAYER_ID_MODES = ("name", "index")
_BIAS_INDEX_OFFSET = 1 << 32  # integer ids of biases in "index" mode, clear of weights'
_NORM_INDEX_OFFSET = 1 << 33  # and of norm layers', so a norm never shifts the biases' ids
_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)
_CONVS = (nn.modules.conv._ConvNd,)


@dataclass(frozen=True)
class Block:
    """Rows ``[start, stop)`` of a parameter (along dim 0), generated from ``spec``."""

    start: int
    stop: int
    spec: TensorInit


def tensors_sha256(named: Iterable[tuple[str, torch.Tensor]]) -> str:
    """sha256 over each tensor's name, shape and float32 bytes, in the given order: the
    fingerprint of a set of initial weights (regenerated or read off a live module)."""
    h = hashlib.sha256()
    for name, t in named:
        t = t.detach().to("cpu", torch.float32).contiguous()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


@dataclass
class InitPlan:
    """How every initialized parameter regenerates. Plain data: it round-trips through
    :meth:`to_dict` / :meth:`from_dict` into checkpoints (no classes of ours in them)."""

    seed: int
    scheme: str
    blocks: dict[str, list[Block]] = field(default_factory=dict)
    generator_version: int = B.GENERATOR_VERSION

    def names(self) -> list[str]:
        return list(self.blocks)

    def shape(self, name: str) -> tuple[int, ...]:
        blocks = self.blocks[name]
        return (blocks[-1].stop, *blocks[0].spec.shape[1:])

    def initial(
        self, name: str, dtype: torch.dtype = torch.float32, device: Any = None
    ) -> torch.Tensor:
        """Regenerate one parameter's initial value (no stored copy)."""
        parts = [generate_tensor(b.spec, dtype=dtype, device=device) for b in self.blocks[name]]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)

    def initial_state(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        return {name: self.initial(name, dtype) for name in self.blocks}

    def fingerprint(self, dtype: torch.dtype = torch.float32) -> str:
        """sha256 over names, shapes and the bytes of every regenerated initial tensor."""
        return tensors_sha256((name, self.initial(name, dtype)) for name in self.blocks)

    def to_dict(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "scheme": self.scheme,
            "generator_version": self.generator_version,
            "blocks": {
                name: [
                    {
                        "start": b.start,
                        "stop": b.stop,
                        "spec": {**asdict(b.spec), "shape": list(b.spec.shape)},
                    }
                    for b in blocks
                ]
                for name, blocks in self.blocks.items()
            },
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> InitPlan:
        blocks = {
            name: [
                Block(
                    b["start"],
                    b["stop"],
                    TensorInit(**{**b["spec"], "shape": tuple(b["spec"]["shape"])}),
                )
                for b in bl
            ]
            for name, bl in d["blocks"].items()
        }
        return cls(int(d["seed"]), str(d["scheme"]), blocks, int(d["generator_version"]))


def _scheme_and_params(
    choice: Any, default_params: Mapping[str, Any]
) -> tuple[str, dict[str, Any]]:
    if isinstance(choice, str):
        return choice, dict(default_params)
    if isinstance(choice, Mapping):
        c = dict(choice)
        if "scheme" not in c:
            raise ValueError(f"an init override needs a 'scheme' key, got {sorted(c)}")
        return str(c.pop("scheme")), c
    raise ValueError(f"an init override must be a scheme name or a mapping, got {choice!r}")


def _override_for(param_name: str, overrides: Mapping[str, Any]) -> Any | None:
    """The override whose key is the parameter's name or one of its module prefixes (longest)."""
    best, best_len = None, -1
    for key, value in overrides.items():
        if (param_name == key or param_name.startswith(key + ".")) and len(key) > best_len:
            best, best_len = value, len(key)
    return best


class _Ids:
    def __init__(self, mode: str) -> None:
        if mode not in LAYER_ID_MODES:
            raise ValueError(f"layer_ids must be one of {LAYER_ID_MODES}, got {mode!r}")
        self.mode, self.weights, self.biases, self.norms = mode, 0, 0, 0

    def weight(self, name: str) -> int:
        if self.mode == "name":
            return layer_id_for(name)
        self.weights += 1
        return self.weights - 1

    def bias(self, name: str) -> int:
        if self.mode == "name":
            return layer_id_for(name)
        self.biases += 1
        return _BIAS_INDEX_OFFSET + self.biases - 1

    def norm(self, name: str) -> int:
        if self.mode == "name":
            return layer_id_for(name)
        self.norms += 1
        return _NORM_INDEX_OFFSET + self.norms - 1


def _weight_specs(
    module: nn.Module,
    pname: str,
    param: torch.Tensor,
    seed: int,
    scheme: str,
    params: dict,
    ids: _Ids,
    zero_mean_conv: bool,
) -> list[Block]:
    shape = tuple(param.shape)
    if isinstance(module, nn.MultiheadAttention) and pname.endswith("in_proj_weight"):
        e = module.embed_dim
        return [
            Block(
                k * e,
                (k + 1) * e,
                TensorInit(seed, ids.weight(f"{pname}.{part}"), (e, shape[1]), scheme, params),
            )
            for k, part in enumerate("qkv")
        ]
    zero_mean = zero_mean_conv and isinstance(module, _CONVS)
    return [
        Block(
            0,
            shape[0],
            TensorInit(seed, ids.weight(pname), shape, scheme, params, zero_mean=zero_mean),
        )
    ]


def _apply(param: torch.Tensor, blocks: list[Block]) -> None:
    with torch.no_grad():
        for b in blocks:
            param[b.start : b.stop].copy_(
                generate_tensor(b.spec, dtype=param.dtype, device=param.device)
            )


def init_module(
    module: nn.Module,
    seed: int = 0,
    scheme: str = "he",
    *,
    params: Mapping[str, Any] | None = None,
    overrides: Mapping[str, Any] | None = None,
    layer_ids: str = "name",
    biases: bool = True,
    norms: bool = True,
    zero_mean_conv: bool = False,
    lsuv_batch: torch.Tensor | None = None,
    lsuv_tol: float = 0.05,
    lsuv_max_iter: int = 10,
) -> InitPlan:
    """Initialize ``module`` in place, deterministically, and return its :class:`InitPlan`.

    Args:
        module: any ``nn.Module``.
        seed: generator seed (0 is a seed).
        scheme: registry name for weights (see :func:`cdi_experiments.schemes.names`) or ``"lsuv"``
            (orthogonal, then each layer rescaled on ``lsuv_batch`` to unit output variance).
        params: the scheme's parameters (``{"std": 0.02}`` for ``custom``, ...).
        overrides: per-module or per-parameter scheme, e.g. ``{"fc1": "zeros"}`` or
            ``{"attn": {"scheme": "custom", "std": 0.044}}`` (longest matching prefix wins).
        layer_ids: ``"name"`` (stable ids from parameter names) or ``"index"``: weights 0, 1,
            2, ... in module order, biases ``2**32 + k``, norm parameters ``2**33 + k``.
        biases: initialize biases (zeros, or the scheme's own addressable draw when it has one,
            as ``torch_default`` does) and track them.
        norms: set norm layers' weights to ones and biases to zeros, and track them.
        zero_mean_conv: shift each conv filter to zero mean (``init_conv_kernel``).
        lsuv_batch: the input batch LSUV fits its scales on (required for ``lsuv``).

    Raises:
        ValueError: unknown scheme, bad parameters, a parameter that matched nothing, or LSUV
            without a batch.
    """
    params = dict(params or {})
    overrides = dict(overrides or {})
    lsuv = scheme == "lsuv"
    if lsuv and lsuv_batch is None:
        raise ValueError("init scheme 'lsuv' is data-dependent: pass lsuv_batch=<an input batch>")
    base_scheme = "orthogonal" if lsuv else scheme
    if not lsuv:
        schemes.get(scheme)
    ids = _Ids(layer_ids)
    plan = InitPlan(int(seed), scheme)
    used_overrides: set[str] = set()
    # every spec is built (and so validated) before the first write: a bad override or scheme
    # parameter raises with the module untouched
    todo: list[tuple[torch.Tensor, list[Block]]] = []
    for mname, m in module.named_modules():
        for local, param in m.named_parameters(recurse=False):
            pname = f"{mname}.{local}" if mname else local
            is_bias = "bias" in local
            ov = _override_for(pname, overrides)
            if ov is not None:
                s_name, s_params = _scheme_and_params(ov, {})
            else:
                s_name, s_params = base_scheme, params
            if isinstance(m, _NORMS):
                if not norms:
                    continue
                blocks = [
                    Block(
                        0,
                        param.shape[0],
                        TensorInit(
                            seed,
                            ids.norm(pname),
                            tuple(param.shape),
                            *(
                                (s_name, s_params)
                                if ov is not None
                                else ("zeros" if is_bias else "ones", {})
                            ),
                        ),
                    )
                ]
            elif (
                isinstance(m, (nn.Linear, nn.Embedding, nn.MultiheadAttention, *_CONVS))
                and not is_bias
            ):
                if local not in (
                    "weight",
                    "in_proj_weight",
                    "q_proj_weight",
                    "k_proj_weight",
                    "v_proj_weight",
                ):
                    continue
                blocks = _weight_specs(m, pname, param, seed, s_name, s_params, ids, zero_mean_conv)
            elif isinstance(m, (nn.Linear, nn.MultiheadAttention, *_CONVS)) and is_bias:
                if not biases:
                    continue
                blocks = [_bias_block(m, pname, param, seed, s_name, s_params, ids)]
            else:
                continue
            todo.append((param, blocks))
            plan.blocks[pname] = blocks
            # an override counts as used only where it initialized something
            used_overrides.update(k for k in overrides if pname == k or pname.startswith(k + "."))
    unused = set(overrides) - used_overrides
    if unused:
        raise ValueError(
            f"init override(s) {sorted(unused)} matched no parameter; names look like "
            f"{', '.join(list(plan.blocks)[:4])}"
        )
    for param, blocks in todo:
        _apply(param, blocks)
    if lsuv:
        _lsuv(module, plan, lsuv_batch, lsuv_tol, lsuv_max_iter)
    return plan


def _bias_block(
    m: nn.Module, pname: str, param: torch.Tensor, seed: int, scheme: str, params: dict, ids: _Ids
) -> Block:
    shape = tuple(param.shape)
    own = scheme in schemes.names() and schemes.get(scheme).bias == "self"
    if not own or isinstance(m, nn.MultiheadAttention):  # torch zeroes MHA's packed bias too
        return Block(0, shape[0], TensorInit(seed, ids.bias(pname), shape, "zeros"))
    # torch bounds the bias by its weight's fan_in, size(1) * receptive field, transposed convs
    # included (whose weight is (in, out/groups, k...)): the fan the weight's own spec uses.
    fan_in = fans(tuple(m.weight.shape))[0]
    return Block(
        0,
        shape[0],
        TensorInit(seed, ids.bias(pname), shape, scheme, params, fan_in=fan_in, fan_out=fan_in),
    )


def _lsuv(
    module: nn.Module, plan: InitPlan, batch: torch.Tensor, tol: float, max_iter: int
) -> None:
    """LSUV (Mishkin & Matas 2016): rescale each layer's orthogonal weight until its output
    variance on ``batch`` is 1. The scale lives in the plan, so regeneration stays exact."""
    weighted = [
        (n, m)
        for n, m in module.named_modules()
        if isinstance(m, (nn.Linear, *_CONVS)) and f"{n}.weight" in plan.blocks
    ]
    was_training = module.training
    module.eval()
    try:
        for name, layer in weighted:
            pname = f"{name}.weight" if name else "weight"
            captured: dict[str, torch.Tensor] = {}
            hook = layer.register_forward_hook(
                lambda _m, _i, out, c=captured: c.__setitem__("out", out)
            )
            scale = 1.0
            try:
                for _ in range(max_iter):
                    with torch.no_grad():
                        module(batch)
                    if "out" not in captured:  # never called as a module (MHA's out_proj)
                        break
                    var = float(captured["out"].double().var())
                    if not math.isfinite(var) or var <= 0 or abs(var - 1.0) < tol:
                        break
                    scale = scale / math.sqrt(var)
                    blocks = [
                        Block(b.start, b.stop, b.spec.with_(scale=scale))
                        for b in plan.blocks[pname]
                    ]
                    _apply(layer.weight, blocks)
                    plan.blocks[pname] = blocks
            finally:
                hook.remove()
    finally:
        module.train(was_training)


# ----------------------------------------------------------------------------- analysis

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


class _ModuleTensors(Mapping):
    """A module's tensors by parameter name; a pruned parameter (torch.nn.utils.prune keeps
    ``<name>_orig`` and ``<name>_mask``) resolves to its effective, masked value."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __getitem__(self, name: str) -> torch.Tensor:
        mod_name, _, local = name.rpartition(".")
        try:
            sub = self.module.get_submodule(mod_name) if mod_name else self.module
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

    def __contains__(self, name: object) -> bool:
        try:
            self[name]  # type: ignore[index]
        except KeyError:
            return False
        return True

    def __iter__(self):
        return (n for n, _ in self.module.named_parameters())

    def __len__(self) -> int:
        return sum(1 for _ in self.module.named_parameters())


class _StateTensors(Mapping):
    """A state dict by parameter name, resolving pruned ``<name>_orig * <name>_mask`` pairs."""

    def __init__(self, state: Mapping[str, torch.Tensor]) -> None:
        self.state = state

    def __getitem__(self, name: str) -> torch.Tensor:
        if name in self.state:
            return self.state[name]
        orig, mask = self.state.get(f"{name}_orig"), self.state.get(f"{name}_mask")
        if orig is None or mask is None:
            raise KeyError(name)
        return orig * mask

    def __contains__(self, name: object) -> bool:
        return name in self.state or (f"{name}_orig" in self.state and f"{name}_mask" in self.state)

    def __iter__(self):
        return iter(self.state)

    def __len__(self) -> int:
        return len(self.state)


def param_deltas(
    source: nn.Module | Mapping[str, torch.Tensor],
    plan: InitPlan,
    name: str,
    chunk_elems: int = DEFAULT_CHUNK_ELEMS,
) -> Iterable[tuple[slice, np.ndarray]]:
    """``(rows, |w - w0|)`` chunks for one parameter, over its blocks."""
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
    for b in plan.blocks[name]:
        for rows, delta in iter_deltas(w[b.start : b.stop], b.spec, chunk_elems):
            yield slice(b.start + rows.start, b.start + rows.stop), delta


def analyze_module(
    source: nn.Module | Mapping[str, torch.Tensor],
    plan: InitPlan,
    thresholds: Iterable[float] = (0.0, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2),
    *,
    chunk_elems: int = DEFAULT_CHUNK_ELEMS,
    quantiles: Iterable[float] = (0.1, 0.25, 0.5, 0.75, 0.9, 0.99),
) -> pd.DataFrame:
    """Per-parameter table of how far each tensor moved from its regenerated initial value.

    Initial values are regenerated in chunks of at most ``chunk_elems`` elements, so peak extra
    memory is about ``40 * chunk_elems`` bytes (40 MiB by default) whatever the model size
    (orthogonal/LSUV matrices are regenerated whole: QR needs the full matrix).

    Returns:
        One row per parameter: ``name, layer_id, scheme, shape, numel, mean_delta, max_delta,
        q50...`` and, per threshold ``t``, ``changed@t`` and ``awake_pct@t``; plus a final
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
        blocks = plan.blocks[name]
        rows.append(
            _stats_row(
                name,
                ",".join(str(b.spec.layer_id) for b in blocks),
                blocks[0].spec.scheme,
                plan.shape(name),
                st,
                ts,
                qs,
            )
        )
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
    plan: InitPlan,
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


def rewind(
    module: nn.Module, plan: InitPlan, masks: Mapping[str, torch.Tensor] | None = None
) -> None:
    """Reset parameters to their regenerated initial values (only where ``masks`` is True)."""
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
    "Block",
    "DeltaStats",
    "InitPlan",
    "analyze_module",
    "awakened_masks",
    "generate",
    "init_module",
    "param_deltas",
    "rewind",
]
