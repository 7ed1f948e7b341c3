"""Pruning by criterion: which weights to remove, how to remove them, and what it costs.

A :class:`Mask` maps parameter names to boolean tensors (``True`` = keep) and checks its own
invariants. Criteria are plain score functions in a registry (:func:`criterion_names`,
:func:`get_criterion`); lower scores are pruned first. Two rules turn scores into masks:

* ``sleeping`` is a *threshold* rule, the original tool's: prune every weight that moved by at
  most ``threshold`` from its initial value, ``|w - w0| <= threshold``. ``w0`` is regenerated
  from the :class:`~cdi_experiments.torch_init.InitPlan`; no copy of it is ever stored.
* every other criterion is a *ranked* rule: prune exactly ``k`` entries per layer, those with
  the lowest scores, ties broken by a stable sort of the flattened (row-major) scores, so the
  lowest flat index goes first. The count is exact even when many scores are equal, as they
  are where ``|w - w0| == 0``.

Because ``movement`` ranks by the same ``|w - w0|``, ``movement`` pruned to the sleeping mask's
per-layer counts selects exactly the sleeping set (NaN moves count as moved in both).

Prunable parameters (:func:`prunable_names`): the weights of ``Linear``, ``Conv*`` and
``MultiheadAttention`` modules that the init plan covers (local names ``weight``,
``in_proj_weight``, ``q/k/v_proj_weight``; two or more dims). Norm weights, biases and
embeddings are left alone unless asked for (``include_biases=True``,
``include_embeddings=True``).

Masks are applied with ``torch.nn.utils.prune.custom_from_mask``: the module keeps
``weight_orig`` (trained) and a ``weight_mask`` buffer, and computes ``weight = weight_orig *
weight_mask`` before every forward, so pruned weights stay exactly zero while fine-tuning.
:func:`make_permanent` folds that back into plain parameters for export.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import numbers
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import pandas as pd
import torch
from torch import nn
from torch.nn.utils import prune

from cdi_experiments import torch_init
from cdi_experiments.generator import bits as B
from cdi_experiments.generator.core import check_threshold, layer_id_for
from cdi_experiments.torch_init import InitPlan

log = logging.getLogger(__name__)

_PRUNABLE_MODULES = (nn.Linear, nn.modules.conv._ConvNd, nn.MultiheadAttention)
_WEIGHT_NAMES = ("weight", "in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")


# ----------------------------------------------------------------------------- parameters


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The module holding parameter ``name`` and its local name (pruned or not)."""
    path, _, local = name.rpartition(".")
    try:
        module = model.get_submodule(path) if path else model
    except AttributeError:
        module = None
    if module is None or (
        local not in module._parameters and f"{local}_orig" not in module._parameters
    ):
        raise ValueError(
            f"the model has no parameter {name!r}; prunable names look like "
            f"{', '.join(prunable_names(model)[:4]) or '(none)'}"
        )
    return module, local


def _is_pruned(module: nn.Module, local: str) -> bool:
    return f"{local}_orig" in module._parameters and hasattr(module, f"{local}_mask")


def _trainable(model: nn.Module, name: str) -> nn.Parameter:
    """The parameter the optimizer updates: ``weight_orig`` once pruned, else ``weight``."""
    module, local = _owner(model, name)
    return module._parameters[f"{local}_orig" if _is_pruned(module, local) else local]


def effective_weight(model: nn.Module, name: str) -> torch.Tensor:
    """The value a forward pass uses: ``weight_orig * weight_mask`` once pruned (computed now,
    not the attribute cached at the last forward), else the parameter itself. Detached."""
    module, local = _owner(model, name)
    if _is_pruned(module, local):
        orig = module._parameters[f"{local}_orig"]
        return (orig * getattr(module, f"{local}_mask")).detach()
    return module._parameters[local].detach()


def prunable_names(
    model: nn.Module,
    plan: InitPlan | None = None,
    *,
    include_biases: bool = False,
    include_embeddings: bool = False,
) -> list[str]:
    """Names of the parameters a criterion may prune, in module order.

    Args:
        model: any module; already-pruned parameters are listed under their plain name
            (``fc1.weight``, not ``fc1.weight_orig``).
        plan: when given, only parameters it covers (criteria need their initial values).
        include_biases: also list the biases of those modules.
        include_embeddings: also list ``nn.Embedding`` weights.

    Returns:
        Weights of ``Linear``/``Conv``/``MultiheadAttention`` modules with two or more dims,
        plus the optional extras. Norm parameters are never listed.
    """
    kinds: tuple[type, ...] = _PRUNABLE_MODULES + ((nn.Embedding,) if include_embeddings else ())
    names = []
    for mname, module in model.named_modules():
        if not isinstance(module, kinds):
            continue
        for local, param in module._parameters.items():
            if param is None:
                continue
            base = local[: -len("_orig")] if local.endswith("_orig") else local
            is_weight = base in _WEIGHT_NAMES and param.dim() >= 2
            is_bias = include_biases and base.endswith("bias") and param.dim() == 1
            full = f"{mname}.{base}" if mname else base
            if (is_weight or is_bias) and (plan is None or full in plan.blocks):
                names.append(full)
    return names


# ----------------------------------------------------------------------------- the mask


class Mask(Mapping[str, torch.Tensor]):
    """Per-parameter boolean keep-masks (``True`` = keep), checked on construction.

    Invariants: at least one entry; names are non-empty strings; every tensor is ``torch.bool``
    with at least one dimension. With ``model`` given, every name is a parameter of it and
    every shape matches. Tensors are copied to the CPU; don't modify them in place.

    Args:
        tensors: ``{parameter name: bool tensor}``.
        model: optional module to check names and shapes against.

    Raises:
        ValueError: any broken invariant; the message names the parameter and the fix.

    Example:
        >>> m = Mask({"fc.weight": torch.tensor([[True, False], [True, True]])})
        >>> m.num_pruned, m.num_kept, m.sparsity
        (1, 3, 0.25)
    """

    def __init__(self, tensors: Mapping[str, torch.Tensor], model: nn.Module | None = None) -> None:
        if not isinstance(tensors, Mapping):
            raise ValueError(f"a Mask needs a mapping name -> bool tensor, got {type(tensors)}")
        if not tensors:
            raise ValueError("a Mask needs at least one parameter; got an empty mapping")
        data: dict[str, torch.Tensor] = {}
        for name, t in tensors.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"mask names must be non-empty strings, got {name!r}")
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"mask for {name!r} must be a torch.Tensor, got {type(t)}")
            if t.dtype != torch.bool:
                raise ValueError(
                    f"mask for {name!r} has dtype {t.dtype}; masks are boolean (True = keep): "
                    "pass `t != 0` or `t.bool()`"
                )
            if t.dim() == 0:
                raise ValueError(f"mask for {name!r} is a scalar; it must have the param's shape")
            data[name] = t.detach().to("cpu", copy=True)
        self._masks = data
        if model is not None:
            self.check(model)

    # -- construction

    @classmethod
    def ones_like(
        cls,
        model: nn.Module,
        names: Iterable[str] | None = None,
        *,
        plan: InitPlan | None = None,
        include_biases: bool = False,
    ) -> Mask:
        """Keep everything: one all-True mask per name (default: :func:`prunable_names`)."""
        names = (
            list(names)
            if names is not None
            else prunable_names(model, plan, include_biases=include_biases)
        )
        if not names:
            raise ValueError(
                "the model has no prunable parameters (Linear/Conv/MultiheadAttention weights)"
            )
        tensors = {n: torch.ones(_trainable(model, n).shape, dtype=torch.bool) for n in names}
        return cls(tensors, model)

    @classmethod
    def from_model(cls, model: nn.Module) -> Mask:
        """The masks currently applied to ``model`` by ``torch.nn.utils.prune``."""
        tensors = {}
        for mname, module in model.named_modules():
            for local in list(module._parameters):
                if local.endswith("_orig") and _is_pruned(module, local[: -len("_orig")]):
                    base = local[: -len("_orig")]
                    full = f"{mname}.{base}" if mname else base
                    tensors[full] = getattr(module, f"{base}_mask") != 0
        if not tensors:
            raise ValueError("the model has no pruned parameter; apply a mask first")
        return cls(tensors, model)

    # -- checks

    def check(self, model: nn.Module) -> None:
        """Raise ValueError unless every name is a parameter of ``model`` with this shape."""
        for name, t in self._masks.items():
            shape = tuple(_trainable(model, name).shape)
            if tuple(t.shape) != shape:
                raise ValueError(
                    f"mask for {name!r} has shape {tuple(t.shape)} but the parameter has "
                    f"{shape}; build masks from this model (Mask.ones_like(model))"
                )

    def _check_same_layout(self, other: Mask) -> None:
        if not isinstance(other, Mask):
            raise ValueError(f"expected a Mask, got {type(other).__name__}")
        if set(self) != set(other):
            raise ValueError(
                f"masks cover different parameters: only here {sorted(set(self) - set(other))},"
                f" only there {sorted(set(other) - set(self))}"
            )
        for name in self:
            if self[name].shape != other[name].shape:
                raise ValueError(
                    f"masks disagree on the shape of {name!r}: "
                    f"{tuple(self[name].shape)} vs {tuple(other[name].shape)}"
                )

    # -- mapping protocol

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._masks[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._masks)

    def __len__(self) -> int:
        return len(self._masks)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Mask) or list(self) != list(other):
            return False
        return all(torch.equal(self[n], other[n]) for n in self)

    __hash__ = None  # type: ignore[assignment]  # mutable-looking container, like dict

    def __repr__(self) -> str:
        return (
            f"Mask({len(self)} tensors, {self.numel:,} entries, "
            f"sparsity {100 * self.sparsity:.2f}%)"
        )

    # -- arithmetic

    @property
    def numel(self) -> int:
        return sum(t.numel() for t in self._masks.values())

    @property
    def num_kept(self) -> int:
        return sum(int(t.sum()) for t in self._masks.values())

    @property
    def num_pruned(self) -> int:
        return self.numel - self.num_kept

    @property
    def sparsity(self) -> float:
        """Fraction of all entries pruned, over every tensor of the mask."""
        return self.num_pruned / self.numel

    def layer_pruned(self) -> dict[str, int]:
        """Pruned count per parameter."""
        return {n: t.numel() - int(t.sum()) for n, t in self._masks.items()}

    def layer_sparsity(self) -> dict[str, float]:
        """Pruned fraction per parameter."""
        return {n: (t.numel() - int(t.sum())) / t.numel() for n, t in self._masks.items()}

    def __and__(self, other: Mask) -> Mask:
        """Intersection: kept only where both keep, so it only ever loses entries."""
        self._check_same_layout(other)
        return Mask({n: self[n] & other[n] for n in self})

    def is_subset_of(self, other: Mask) -> bool:
        """True when this mask keeps nothing that ``other`` prunes."""
        self._check_same_layout(other)
        return all(not bool((self[n] & ~other[n]).any()) for n in self)


# ----------------------------------------------------------------------------- criteria

ScoreFn = Callable[[torch.Tensor, InitPlan, str, int], torch.Tensor]
"""``score(weight, plan, name, seed) -> scores`` of ``weight``'s shape; lowest pruned first."""


def _initial(weight: torch.Tensor, plan: InitPlan, name: str) -> torch.Tensor:
    # regenerated in the weight's dtype, so a zero difference means bit-identical
    return plan.initial(name, dtype=weight.dtype)


def sleeping(weight: torch.Tensor, plan: InitPlan, name: str, seed: int) -> torch.Tensor:
    """``|w - w0|``, for the threshold rule: prune where ``|w - w0| <= threshold``
    (see :func:`sleeping_mask`). Ranked by count it would equal ``movement``."""
    return movement(weight, plan, name, seed)


def magnitude(weight: torch.Tensor, plan: InitPlan, name: str, seed: int) -> torch.Tensor:
    """``|w|``: the classic magnitude pruning (Han et al. 2015)."""
    return weight.detach().double().abs()


def movement(weight: torch.Tensor, plan: InitPlan, name: str, seed: int) -> torch.Tensor:
    """``|w - w0|``: how far training moved the weight from its regenerated initial value."""
    w0 = _initial(weight, plan, name)
    return (weight.detach().double() - w0.double()).abs()


def magnitude_increase(weight: torch.Tensor, plan: InitPlan, name: str, seed: int) -> torch.Tensor:
    """``|w| - |w0|``: Zhou et al. 2019, "Deconstructing lottery tickets",
    https://arxiv.org/abs/1905.01067 (weights that shrank go first)."""
    w0 = _initial(weight, plan, name)
    return weight.detach().double().abs() - w0.double().abs()


def random_scores(weight: torch.Tensor, plan: InitPlan, name: str, seed: int) -> torch.Tensor:
    """Uniform scores from a ``torch.Generator`` seeded with ``fold(seed, layer_id_for(name))``:
    deterministic per (seed, parameter name), independent across layers."""
    g = torch.Generator().manual_seed(B.fold(seed, layer_id_for(name)))
    return torch.rand(weight.shape, generator=g, dtype=torch.float64)


_CRITERIA: dict[str, ScoreFn] = {
    "sleeping": sleeping,
    "magnitude": magnitude,
    "movement": movement,
    "magnitude_increase": magnitude_increase,
    "random": random_scores,
}
THRESHOLD_CRITERIA = ("sleeping",)
"""Criteria defined by a threshold, not a count: they cannot be ranked to a target sparsity."""


def criterion_names() -> tuple[str, ...]:
    return tuple(_CRITERIA)


def get_criterion(name: str) -> ScoreFn:
    """The score function registered as ``name``.

    Raises:
        ValueError: unknown name; the message lists the registered ones.
    """
    if name not in _CRITERIA:
        raise ValueError(
            f"unknown pruning criterion {name!r}; expected one of {', '.join(_CRITERIA)}"
        )
    return _CRITERIA[name]


def register_criterion(name: str, fn: ScoreFn, *, overwrite: bool = False) -> None:
    """Add a ranked criterion: ``fn(weight, plan, name, seed) -> scores`` (lowest pruned)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"a criterion name must be a non-empty string, got {name!r}")
    if name in _CRITERIA and not overwrite:
        raise ValueError(f"criterion {name!r} already exists; pass overwrite=True to replace it")
    _CRITERIA[name] = fn


def _ranked_criterion(name: str) -> ScoreFn:
    fn = get_criterion(name)
    if name in THRESHOLD_CRITERIA:
        raise ValueError(
            f"criterion {name!r} prunes by threshold, not by count: use "
            "sleeping_mask(model, plan, threshold), or 'movement' (the same |w - w0|, ranked)"
        )
    return fn


def _is_fraction(f: Any) -> bool:
    return isinstance(f, numbers.Real) and not isinstance(f, bool) and 0.0 <= float(f) <= 1.0


def _check_seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise ValueError(f"seed must be an integer in [0, 2**64), got {seed!r}")
    return seed


# ----------------------------------------------------------------------------- masks


def _prune_lowest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Keep-mask pruning exactly the ``k`` lowest scores (stable: lowest flat index first on
    ties; NaN scores sort last, so they are kept)."""
    flat = scores.reshape(-1)
    order = torch.argsort(flat, stable=True)  # (numel,)
    keep = torch.ones(flat.numel(), dtype=torch.bool)
    keep[order[:k]] = False
    return keep.reshape(scores.shape)


def _sub_plan(plan: InitPlan, names: Sequence[str]) -> InitPlan:
    missing = [n for n in names if n not in plan.blocks]
    if missing:
        raise ValueError(
            f"parameters {missing} are not in the init plan, so their initial values cannot "
            "be regenerated; initialize them with init_module or leave them out"
        )
    return InitPlan(
        plan.seed, plan.scheme, {n: plan.blocks[n] for n in names}, plan.generator_version
    )


def sleeping_mask(
    model: nn.Module,
    plan: InitPlan,
    threshold: float,
    *,
    names: Sequence[str] | None = None,
    include_biases: bool = False,
) -> Mask:
    """The original tool's mask: prune every weight with ``|w - w0| <= threshold``.

    ``w0`` is regenerated from ``plan`` in chunks (:func:`torch_init.awakened_masks`), in the
    weight's dtype, so at ``threshold=0`` exactly the bit-identical weights are pruned. NaN
    weights count as moved and are kept.

    Args:
        model: the trained model (effective weights are read if it is already pruned).
        plan: its init plan.
        threshold: finite, >= 0.
        names: parameters to mask (default: :func:`prunable_names`).
        include_biases: with the default names, include biases.

    Raises:
        ValueError: bad threshold, or a name missing from the model or the plan.
    """
    t = check_threshold(threshold)
    names = (
        list(names)
        if names is not None
        else prunable_names(model, plan, include_biases=include_biases)
    )
    if not names:
        raise ValueError("no prunable parameter is covered by the init plan")
    sub = _sub_plan(plan, names)
    tensors = {n: effective_weight(model, n) for n in names}
    awake = torch_init.awakened_masks(tensors, sub, t)
    return Mask({n: awake[n] for n in names}, model)  # keep what moved


def _ranked_mask(
    model: nn.Module, plan: InitPlan, criterion: str, counts: Mapping[str, int], seed: int
) -> Mask:
    fn = _ranked_criterion(criterion)
    seed = _check_seed(seed)
    out = {}
    for name, k in counts.items():
        w = effective_weight(model, name)
        if not 0 <= k <= w.numel():
            raise ValueError(f"{name}: cannot prune {k} of {w.numel()} entries")
        scores = fn(w, plan, name, seed)
        if tuple(scores.shape) != tuple(w.shape):
            raise ValueError(
                f"criterion {criterion!r} returned shape {tuple(scores.shape)} for {name!r}, "
                f"expected {tuple(w.shape)}"
            )
        out[name] = _prune_lowest(scores, k)
    return Mask(out, model)


def ranked_mask(
    model: nn.Module,
    plan: InitPlan,
    criterion: str,
    fractions: Mapping[str, float],
    *,
    seed: int = 0,
) -> Mask:
    """Prune exactly ``round(fraction * numel)`` entries of each named parameter, lowest
    ``criterion`` scores first (Python's ``round``: halves go to the even count).

    Args:
        model: trained model.
        plan: its init plan (movement and magnitude_increase regenerate ``w0`` from it).
        criterion: a ranked criterion name (not ``sleeping``).
        fractions: ``{parameter name: target sparsity in [0, 1]}``.
        seed: for ``random``.

    Raises:
        ValueError: unknown criterion, a fraction outside [0, 1], an unknown name.
    """
    counts = {}
    for name, f in fractions.items():
        if not _is_fraction(f):
            raise ValueError(f"sparsity for {name!r} must be a number in [0, 1], got {f!r}")
        counts[name] = round(float(f) * _trainable(model, name).numel())
    return _ranked_mask(model, plan, criterion, counts, seed)


def matched_masks(
    model: nn.Module,
    plan: InitPlan,
    reference_mask: Mask,
    criteria: Iterable[str] = ("magnitude", "movement", "magnitude_increase", "random"),
    seed: int = 0,
) -> dict[str, Mask]:
    """For each criterion, a mask pruning exactly as many entries per layer as
    ``reference_mask`` (usually :func:`sleeping_mask`): a like-for-like comparison.

    Returns:
        ``{criterion: Mask}`` over the reference's parameters.
    """
    reference_mask.check(model)
    counts = reference_mask.layer_pruned()
    return {c: _ranked_mask(model, plan, c, counts, seed) for c in criteria}


def masks_at_sparsity(
    model: nn.Module,
    plan: InitPlan,
    criterion: str,
    sparsities: float | Iterable[float],
    seed: int = 0,
    *,
    include_biases: bool = False,
) -> dict[float, Mask]:
    """One mask per target sparsity, pruning the same fraction of *every* prunable parameter.

    The fraction is uniform per layer (``round(f * numel)`` entries each), not a global
    ranking across layers, so small layers are never emptied; the overall sparsity equals
    ``f`` up to that per-layer rounding.

    Returns:
        ``{sparsity: Mask}`` in the order given.
    """
    fs = [sparsities] if isinstance(sparsities, numbers.Real) else list(sparsities)
    names = prunable_names(model, plan, include_biases=include_biases)
    if not names:
        raise ValueError("no prunable parameter is covered by the init plan")
    return {
        float(f): ranked_mask(model, plan, criterion, {n: f for n in names}, seed=seed) for f in fs
    }


# ----------------------------------------------------------------------------- application


def apply_mask(model: nn.Module, mask: Mask) -> nn.Module:
    """Prune ``model`` in place with ``torch.nn.utils.prune.custom_from_mask``.

    Each masked parameter becomes ``<name>_orig`` plus a ``<name>_mask`` buffer, and the
    forward pass uses their product, so pruned weights stay exactly 0 through optimizer steps.
    Applying a second mask multiplies with the first (an intersection).

    Returns:
        ``model``.
    """
    mask.check(model)
    for name, keep in mask.items():
        module, local = _owner(model, name)
        prune.custom_from_mask(module, local, keep.to(_trainable(model, name).device))
    return model


def make_permanent(model: nn.Module) -> nn.Module:
    """Fold every pruning reparametrization into a plain parameter (``prune.remove``): the
    pruned entries are stored as zeros and no longer protected from updates."""
    for module in model.modules():
        for hook in list(module._forward_pre_hooks.values()):
            if isinstance(hook, prune.BasePruningMethod):
                prune.remove(module, hook._tensor_name)
    return model


def masked_copy(model: nn.Module, mask: Mask) -> nn.Module:
    """A pruned ``copy.deepcopy`` of ``model``; the original stays untouched."""
    return apply_mask(copy.deepcopy(model), mask)


def rewind_and_mask(model: nn.Module, plan: InitPlan, mask: Mask) -> nn.Module:
    """The lottery-ticket step (Frankle & Carbin 2019, https://arxiv.org/abs/1803.03635):
    survivors go back to their regenerated initial values, pruned weights to exactly 0.

    In place. Every other parameter of ``plan`` (biases, norms) is rewound whole; parameters
    outside the plan are left alone. A model that is already pruned keeps its old pruning too
    (the masks intersect), so the step can be iterated.

    Raises:
        ValueError: a mask name missing from the model or the plan.
    """
    mask.check(model)
    _sub_plan(plan, list(mask))
    keep = dict(mask)
    try:
        previous = Mask.from_model(model)
    except ValueError:
        previous = None
    if previous is not None:
        for name, old in previous.items():
            keep[name] = keep[name] & old if name in keep else old
        make_permanent(model)
    torch_init.rewind(model, plan, keep)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, k in keep.items():
            params[name].masked_fill_(~k.to(params[name].device), 0.0)
    return apply_mask(model, Mask(keep, model))


# ----------------------------------------------------------------------------- evaluation

DEFAULT_CRITERIA = ("sleeping", "magnitude", "movement", "magnitude_increase", "random")
DEFAULT_SPARSITIES = (0.5, 0.8, 0.9)


def _row(
    criterion: str,
    target: str,
    mask: Mask,
    model: nn.Module,
    plan: InitPlan,
    evaluate_fn: Callable[[nn.Module], float],
    acc_before: float,
    finetune_fn: Callable[[nn.Module], Any] | None,
    retrain_fn: Callable[[nn.Module], Any] | None,
) -> dict[str, Any]:
    pruned = masked_copy(model, mask)
    acc_after = float(evaluate_fn(pruned))
    row: dict[str, Any] = {
        "criterion": criterion,
        "target": target,
        "sparsity": mask.sparsity,
        "num_pruned": mask.num_pruned,
        "acc_before": acc_before,
        "acc_after": acc_after,
        "acc_delta": acc_after - acc_before,
    }
    if finetune_fn is not None:
        finetune_fn(pruned)
        row["acc_finetuned"] = float(evaluate_fn(pruned))
    if retrain_fn is not None:
        ticket = rewind_and_mask(copy.deepcopy(model), plan, mask)
        retrain_fn(ticket)
        row["acc_rewound"] = float(evaluate_fn(ticket))
    row["layer_sparsity"] = json.dumps(mask.layer_sparsity())
    log.info(
        "prune/%s/%s: sparsity %.4f, acc %.4f -> %.4f",
        criterion,
        target,
        mask.sparsity,
        acc_before,
        acc_after,
    )
    return row


def prune_and_evaluate(
    model: nn.Module,
    plan: InitPlan,
    evaluate_fn: Callable[[nn.Module], float],
    *,
    threshold: float,
    criteria: Sequence[str] = DEFAULT_CRITERIA,
    sparsities: Sequence[float] = DEFAULT_SPARSITIES,
    finetune_fn: Callable[[nn.Module], Any] | None = None,
    retrain_fn: Callable[[nn.Module], Any] | None = None,
    seed: int = 0,
    include_biases: bool = False,
) -> pd.DataFrame:
    """Prune copies of ``model`` by each criterion and measure the accuracy each costs.

    Two kinds of rows, ``target`` telling which:

    * ``"matched@<threshold>"``: ``sleeping`` prunes ``|w - w0| <= threshold``; every other
      criterion prunes exactly as many entries per layer (:func:`matched_masks`).
    * ``"<sparsity>"`` (e.g. ``"0.9"``): every ranked criterion at that uniform per-layer
      sparsity (:func:`masks_at_sparsity`); ``sleeping`` has no such row.

    ``model`` itself is never modified: each row prunes a deep copy.

    Args:
        model: trained model.
        plan: its init plan.
        evaluate_fn: ``model -> accuracy`` (sets eval mode itself if it needs to).
        threshold: the sleeping threshold (finite, >= 0).
        criteria: registry names, in row order.
        sparsities: target sparsities in [0, 1].
        finetune_fn: optional; trains the pruned copy in place (masks stay applied), then
            ``acc_finetuned`` is measured.
        retrain_fn: optional; trains the lottery ticket (:func:`rewind_and_mask` of a copy)
            in place, then ``acc_rewound`` is measured.
        seed: for ``random``.
        include_biases: prune biases too.

    Returns:
        Columns ``criterion, target, sparsity`` (measured over the masked parameters),
        ``num_pruned, acc_before, acc_after, acc_delta`` (after - before), ``acc_finetuned``
        and ``acc_rewound`` when their functions are given, and ``layer_sparsity`` (JSON
        ``{name: fraction}``).

    Raises:
        ValueError: unknown criterion, bad threshold or sparsity.
    """
    t = check_threshold(threshold)
    for c in criteria:
        get_criterion(c)
    for f in sparsities:
        if not _is_fraction(f):
            raise ValueError(f"sparsities must be numbers in [0, 1], got {f!r}")
    acc_before = float(evaluate_fn(model))
    if not math.isfinite(acc_before):
        raise ValueError(f"evaluate_fn returned {acc_before!r} for the unpruned model")
    ranked = [c for c in criteria if c not in THRESHOLD_CRITERIA]
    reference = sleeping_mask(model, plan, t, include_biases=include_biases)
    matched_target = f"matched@{t:g}"
    jobs: list[tuple[str, str, Mask]] = []
    matched = matched_masks(model, plan, reference, ranked, seed)
    for c in criteria:
        jobs.append((c, matched_target, reference if c in THRESHOLD_CRITERIA else matched[c]))
    for f in sparsities:
        for c in ranked:
            mask = masks_at_sparsity(model, plan, c, f, seed, include_biases=include_biases)
            jobs.append((c, f"{float(f):g}", mask[float(f)]))
    rows = [
        _row(c, target, m, model, plan, evaluate_fn, acc_before, finetune_fn, retrain_fn)
        for c, target, m in jobs
    ]
    return pd.DataFrame(rows)


def format_table(df: pd.DataFrame) -> str:
    """A console table of :func:`prune_and_evaluate`'s result (per-layer JSON left out)."""
    cols = [c for c in df.columns if c != "layer_sparsity"]
    formatters: dict[str, Callable[[Any], str]] = {"sparsity": lambda x: f"{100 * x:.2f}%"}
    for c in ("acc_before", "acc_after", "acc_finetuned", "acc_rewound"):
        formatters[c] = lambda x: f"{x:.4f}"
    formatters["acc_delta"] = lambda x: f"{x:+.4f}"
    formatters["num_pruned"] = lambda x: f"{int(x):,}"
    return df[cols].to_string(
        index=False, formatters={k: v for k, v in formatters.items() if k in cols}
    )


__all__ = [
    "DEFAULT_CRITERIA",
    "DEFAULT_SPARSITIES",
    "THRESHOLD_CRITERIA",
    "Mask",
    "ScoreFn",
    "apply_mask",
    "criterion_names",
    "effective_weight",
    "format_table",
    "get_criterion",
    "magnitude",
    "magnitude_increase",
    "make_permanent",
    "masked_copy",
    "masks_at_sparsity",
    "matched_masks",
    "movement",
    "prunable_names",
    "prune_and_evaluate",
    "random_scores",
    "ranked_mask",
    "register_criterion",
    "rewind_and_mask",
    "sleeping",
    "sleeping_mask",
]
