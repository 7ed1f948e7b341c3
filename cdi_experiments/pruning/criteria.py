"""Pruning criteria (score functions in a registry) and the rules that turn scores into masks:
the ``sleeping`` threshold rule, and exact per-layer ranked counts for every other criterion."""

from __future__ import annotations

import logging
import numbers
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from cdi_experiments.generator import bits as B
from cdi_experiments.generator.core import check_threshold, layer_id_for
from cdi_experiments.modules.analysis import awakened_masks
from cdi_experiments.modules.plan import Plan
from cdi_experiments.pruning.mask import Mask, _trainable, effective_weight, prunable_names

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- criteria

ScoreFn = Callable[[torch.Tensor, Plan, str, int], torch.Tensor]
"""``score(weight, plan, name, seed) -> scores`` of ``weight``'s shape; lowest pruned first."""


def _initial(weight: torch.Tensor, plan: Plan, name: str) -> torch.Tensor:
    # in the weight's dtype (regenerated, or the record cast), so 0 means bit-identical
    return plan.initial(name, dtype=weight.dtype)


def sleeping(weight: torch.Tensor, plan: Plan, name: str, seed: int) -> torch.Tensor:
    """``|w - w0|``, for the threshold rule: prune where ``|w - w0| <= threshold``
    (see :func:`sleeping_mask`). Ranked by count it would equal ``movement``."""
    return movement(weight, plan, name, seed)


def magnitude(weight: torch.Tensor, plan: Plan, name: str, seed: int) -> torch.Tensor:
    """``|w|``: the classic magnitude pruning (Han et al. 2015)."""
    return weight.detach().double().abs()


def movement(weight: torch.Tensor, plan: Plan, name: str, seed: int) -> torch.Tensor:
    """``|w - w0|``: how far training moved the weight from its initial value."""
    w0 = _initial(weight, plan, name)
    return (weight.detach().double() - w0.double()).abs()


def magnitude_increase(weight: torch.Tensor, plan: Plan, name: str, seed: int) -> torch.Tensor:
    """``|w| - |w0|``: Zhou et al. 2019, "Deconstructing lottery tickets",
    https://arxiv.org/abs/1905.01067 (weights that shrank go first)."""
    w0 = _initial(weight, plan, name)
    return weight.detach().double().abs() - w0.double().abs()


def random_scores(weight: torch.Tensor, plan: Plan, name: str, seed: int) -> torch.Tensor:
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


def _sub_plan(plan: Plan, names: Sequence[str]) -> Plan:
    missing = [n for n in names if n not in plan]
    if missing:
        raise ValueError(
            f"parameters {missing} are not in the init plan, so their initial values are "
            "unknown; initialize (init_module) or record (record_module) them, or leave them out"
        )
    return plan.subset(names)


def sleeping_mask(
    model: nn.Module,
    plan: Plan,
    threshold: float,
    *,
    names: Sequence[str] | None = None,
    include_biases: bool = False,
) -> Mask:
    """The original tool's mask: prune every weight with ``|w - w0| <= threshold``.

    ``w0`` is regenerated from ``plan`` in chunks (:func:`awakened_masks`), in the
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
    awake = awakened_masks(tensors, sub, t)
    return Mask({n: awake[n] for n in names}, model)  # keep what moved


def _ranked_mask(
    model: nn.Module, plan: Plan, criterion: str, counts: Mapping[str, int], seed: int
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
    plan: Plan,
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
    plan: Plan,
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
    plan: Plan,
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


__all__ = [
    "ScoreFn",
    "THRESHOLD_CRITERIA",
    "criterion_names",
    "get_criterion",
    "magnitude",
    "magnitude_increase",
    "masks_at_sparsity",
    "matched_masks",
    "movement",
    "random_scores",
    "ranked_mask",
    "register_criterion",
    "sleeping",
    "sleeping_mask",
]
