"""Applying masks with ``torch.nn.utils.prune``, exporting them, and the lottery-ticket rewind."""

from __future__ import annotations

import copy
import logging

import torch
from torch import nn
from torch.nn.utils import prune

from cdi_experiments.modules.analysis import rewind
from cdi_experiments.modules.plan import Plan
from cdi_experiments.pruning.criteria import _sub_plan
from cdi_experiments.pruning.mask import Mask, _owner, _trainable

log = logging.getLogger(__name__)

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


def rewind_and_mask(model: nn.Module, plan: Plan, mask: Mask) -> nn.Module:
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
    rewind(model, plan, keep)
    with torch.no_grad():
        for name, k in keep.items():
            p = _trainable(model, name)
            p.masked_fill_(~k.to(p.device), 0.0)
    return apply_mask(model, Mask(keep, model))


__all__ = [
    "apply_mask",
    "make_permanent",
    "masked_copy",
    "rewind_and_mask",
]
