"""Deterministic initialization of whole ``nn.Module``s.

:func:`init_module` walks a module, writes every supported parameter from the generator and
returns an :class:`InitPlan`: for each parameter, the :class:`TensorInit` blocks that
regenerate it. Layers are addressed by a stable id derived from the parameter's canonical
name (``layer_ids="name"``, the default; wrappers such as ``torch.compile`` or DDP are looked
through, see :mod:`~cdi_experiments.modules.naming`), so adding a layer never reshuffles the
others and a compiled model gets the bare model's weights; integer
ids in module order (``layer_ids="index"``) match the original tool's numbering.

Supported: Linear, Conv1d/2d/3d (and transposed), Embedding, MultiheadAttention (the packed
``in_proj_weight`` is split into Q, K and V blocks, each addressed and scaled as its own
``(E, E)`` matrix), and norm layers (weight ones, bias zeros). Other parameters are left as
they are and not tracked.

Sharded parameters (DTensors from FSDP2 or tensor parallelism) are filled shard by shard, each
rank generating only its own part (:mod:`~cdi_experiments.modules.sharding`), and a model on
the meta device is materialized straight into its initial values.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from cdi_experiments.generator import schemes
from cdi_experiments.generator.core import (
    DEFAULT_CHUNK_ELEMS,
    TensorInit,
    fans,
    generate_tensor,
    layer_id_for,
)
from cdi_experiments.modules.naming import canonical_named_modules
from cdi_experiments.modules.plan import Block, InitPlan, RecordedPlan
from cdi_experiments.modules.sharding import is_dtensor, local_chunks, local_part, torch_index

log = logging.getLogger(__name__)

LAYER_ID_MODES = ("name", "index")
_BIAS_INDEX_OFFSET = 1 << 32  # integer ids of biases in "index" mode, clear of weights'
_NORM_INDEX_OFFSET = 1 << 33  # and of norm layers', so a norm never shifts the biases' ids
_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)
_CONVS = (nn.modules.conv._ConvNd,)


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


def _apply(
    param: torch.Tensor, blocks: list[Block], chunk_elems: int = DEFAULT_CHUNK_ELEMS
) -> None:
    """Write ``blocks`` into this rank's part of ``param`` (all of it unless a DTensor), from
    the part's global coordinates, ``chunk_elems`` elements at a time."""
    local = local_part(param).detach()  # a view: writing it writes the (sharded) parameter
    numpy_ok = local.device.type == "cpu" and local.dtype in _NUMPY_COPY
    if _whole_in_place(param, local, blocks):
        return
    with torch.no_grad():
        for at, spec, index in local_chunks(param, blocks, chunk_elems):
            if numpy_ok and isinstance(at, slice):
                # the kernel writes the parameter's rows (a strided view by numpy's copy: torch's
                # parallel copy right after numba's parallel kernel waits for numba's
                # still-spinning threads; measured on 2 cores, 345 ms against 16 ms)
                generate_tensor(spec, index, out=local[at])
            else:  # rows of a strided layout: one chunk alive at a time
                local[torch_index(at)] = generate_tensor(
                    spec, index, dtype=local.dtype, device=local.device
                )


def _whole_in_place(param: torch.Tensor, local: torch.Tensor, blocks: list[Block]) -> bool:
    """Fill a whole plain CPU parameter in one call when that needs no extra memory: a
    normal or uniform draw written by the kernel straight into it, or a constant. Returns
    False (nothing written) for anything else, which goes chunk by chunk."""
    if len(blocks) != 1 or is_dtensor(param) or local.device.type != "cpu":
        return False
    spec = blocks[0].spec
    if spec.shape != tuple(local.shape) or not local.is_contiguous():
        return False
    if not spec.plain:
        return False
    draw = spec.draw
    if local.dtype not in (torch.float32, torch.float64):  # half types: generate's rounding
        return False
    if draw.kind in ("normal", "uniform"):
        generate_tensor(spec, out=local)
    elif draw.kind == "constant":
        local.fill_(draw.value)  # one rounding of the float64 value, as generate's np.full
    else:
        return False
    return True


_NUMPY_COPY = (torch.float16, torch.float32, torch.float64)
_WEIGHT_LOCALS = ("weight", "in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")


def _tracked(
    module: nn.Module, *, biases: bool, norms: bool
) -> Iterator[tuple[nn.Module, str, str, torch.Tensor, str]]:
    """``(owner, local name, canonical name, parameter, kind)`` for every parameter an init
    covers, in module order; kind is ``"norm"``, ``"weight"`` or ``"bias"``. Names are
    canonical (:mod:`~cdi_experiments.modules.naming`), so wrappers change nothing."""
    for mname, m in canonical_named_modules(module):
        for local, param in m.named_parameters(recurse=False):
            pname = f"{mname}.{local}" if mname else local
            is_bias = "bias" in local
            if isinstance(m, _NORMS):
                if norms:
                    yield m, local, pname, param, "norm"
            elif isinstance(m, (nn.Linear, nn.Embedding, nn.MultiheadAttention, *_CONVS)):
                if not is_bias and local in _WEIGHT_LOCALS:
                    yield m, local, pname, param, "weight"
                elif is_bias and biases and not isinstance(m, nn.Embedding):
                    yield m, local, pname, param, "bias"


def record_module(module: nn.Module, *, biases: bool = True, norms: bool = True) -> RecordedPlan:
    """Record ``module``'s current values of the parameters :func:`init_module` would cover
    (same canonical names, same selection), leaving them as they are: the plan of an init
    made elsewhere, e.g. the model's own ``reset_parameters``.

    The returned :class:`RecordedPlan` holds a CPU copy of each tensor in its own dtype, so it
    costs as much memory as those parameters (and as much again in a checkpoint). DTensor
    parameters are gathered whole (``full_tensor()``): the call is then collective, and every
    rank holds the whole record.
    """
    tracked = _tracked(module, biases=biases, norms=norms)
    return RecordedPlan(
        {pname: p.full_tensor() if is_dtensor(p) else p for _, _, pname, p, _ in tracked}
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
    device: torch.device | str | None = None,
) -> InitPlan:
    """Initialize ``module`` in place, deterministically, and return its :class:`InitPlan`.

    Sharded parameters (``DTensor``: FSDP2 ``fully_shard``, tensor parallel, or both on a 2-D
    mesh) are filled rank by rank: each rank generates only its local shard, from the shard's
    global coordinates, without communication, so the gathered ``full_tensor()`` equals this
    function's result on the unsharded model, bit for bit, at any world size and layout.
    Peak extra memory per rank is one generation chunk of ``DEFAULT_CHUNK_ELEMS`` (2**20)
    elements, never the local shard or the whole tensor: measured (tracemalloc, float32)
    about 4.2 MiB for normal and uniform draws and 12 MiB for constants. Orthogonal weights
    are the exception: each rank regenerates the whole global matrix in float64 and runs its
    QR (about 4 x 8 bytes x numel of the global matrix, e.g. 33 MiB for 1024 x 1024), then
    keeps its shard.

    A model built on the meta device (``with torch.device("meta")``, before or after
    ``fully_shard``) is materialized on ``device`` with ``module.to_empty`` and every
    parameter is written straight with its deterministic values (no random init is drawn
    first); BatchNorm running statistics are reset to their constants.

    Args:
        module: any ``nn.Module``.
        seed: generator seed (0 is a seed).
        scheme: registry name for weights (see
            :func:`cdi_experiments.generator.schemes.names`) or ``"lsuv"`` (orthogonal, then
            each layer rescaled on ``lsuv_batch`` to unit output variance).
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
        device: where to materialize a module whose tensors are on the meta device; unused
            otherwise.

    Raises:
        ValueError: unknown scheme, bad parameters, a parameter that matched nothing, LSUV
            without a batch or on a DTensor parameter, or a meta-device module without
            ``device``, partly materialized, or holding tensors this init cannot fill.
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
    todo: list[tuple[nn.Module, str, list[Block]]] = []
    for m, local, pname, param, kind in _tracked(module, biases=biases, norms=norms):
        is_bias = "bias" in local
        ov = _override_for(pname, overrides)
        if ov is not None:
            s_name, s_params = _scheme_and_params(ov, {})
        else:
            s_name, s_params = base_scheme, params
        if kind == "norm":
            spec = (s_name, s_params) if ov is not None else ("zeros" if is_bias else "ones", {})
            shape = tuple(param.shape)
            blocks = [Block(0, shape[0], TensorInit(seed, ids.norm(pname), shape, *spec))]
        elif kind == "weight":
            blocks = _weight_specs(m, pname, param, seed, s_name, s_params, ids, zero_mean_conv)
        else:
            blocks = [_bias_block(m, pname, param, seed, s_name, s_params, ids)]
        if lsuv and is_dtensor(param):
            raise ValueError(
                f"init scheme 'lsuv' needs whole weights and forward passes, but {pname!r} is "
                "a sharded DTensor; initialize before sharding or use a per-element scheme"
            )
        todo.append((m, local, blocks))
        plan.blocks[pname] = blocks
        # an override counts as used only where it initialized something
        used_overrides.update(k for k in overrides if pname == k or pname.startswith(k + "."))
    unused = set(overrides) - used_overrides
    if unused:
        raise ValueError(
            f"init override(s) {sorted(unused)} matched no parameter; names look like "
            f"{', '.join(list(plan.blocks)[:4])}"
        )
    _materialize(module, device, set(plan.blocks), biases=biases, norms=norms)
    for m, local, blocks in todo:
        _apply(getattr(m, local), blocks)  # looked up now: to_empty may have replaced it
    if lsuv:
        _lsuv(module, plan, lsuv_batch, lsuv_tol, lsuv_max_iter)
    return plan


def _materialize(
    module: nn.Module, device: Any, tracked: set[str], *, biases: bool, norms: bool
) -> None:
    """Allocate a meta-device ``module`` on ``device`` (``to_empty``: uninitialized memory
    that init_module then overwrites) after checking that init_module will give every tensor
    a value. A module with no meta tensor is left alone."""
    tensors = [
        (f"{mname}.{local}" if mname else local, t, kind, m)
        for mname, m in canonical_named_modules(module)
        for kind, items in (("parameter", m._parameters), ("buffer", m._buffers))
        for local, t in items.items()
        if t is not None
    ]
    meta = [name for name, t, _, _ in tensors if t.is_meta]
    if not meta:
        return
    if device is None:
        raise ValueError(
            f"{meta[0]!r} is on the meta device: pass init_module(..., device='cpu' or 'cuda') "
            "to materialize the module there"
        )
    real = [name for name, t, _, _ in tensors if not t.is_meta]
    if real:
        raise ValueError(
            f"the module is partly on the meta device ({meta[0]!r}) and partly not "
            f"({real[0]!r}); to_empty would erase the latter: build it all on meta or all real"
        )
    for name, _, kind, m in tensors:
        stat = isinstance(m, nn.modules.batchnorm._BatchNorm) and kind == "buffer"
        if not stat and name not in tracked:
            raise ValueError(
                f"{kind} {name!r} is on the meta device and init_module does not initialize it "
                f"(biases={biases}, norms={norms}); call module.to_empty(device=...), set it "
                "yourself, then init_module"
            )
    module.to_empty(device=device)
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            m.reset_running_stats()


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
        for n, m in canonical_named_modules(module)
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


__all__ = ["LAYER_ID_MODES", "init_module", "record_module"]
