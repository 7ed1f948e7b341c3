"""Pruning by criterion: which weights to remove, how to remove them, and what it costs.

A :class:`Mask` maps parameter names to boolean tensors (``True`` = keep) and checks its own
invariants. Criteria are plain score functions in a registry (:func:`criterion_names`,
:func:`get_criterion`); lower scores are pruned first. Two rules turn scores into masks:

* ``sleeping`` is a *threshold* rule, the original tool's: prune every weight that moved by at
  most ``threshold`` from its initial value, ``|w - w0| <= threshold``. ``w0`` is regenerated
  from an :class:`~cdi_experiments.modules.InitPlan` (no copy stored), or read from a
  :class:`~cdi_experiments.modules.RecordedPlan` (the copy of a foreign init).
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

Parameter names are canonical (:mod:`cdi_experiments.modules.naming`): a compiled or
DDP-wrapped model is pruned under the same names as the bare one.

Masks are applied with ``torch.nn.utils.prune.custom_from_mask``: the module keeps
``weight_orig`` (trained) and a ``weight_mask`` buffer, and computes ``weight = weight_orig *
weight_mask`` before every forward, so pruned weights stay exactly zero while fine-tuning.
:func:`make_permanent` folds that back into plain parameters for export.
"""

from cdi_experiments.pruning.apply import (
    apply_mask,
    make_permanent,
    masked_copy,
    rewind_and_mask,
)
from cdi_experiments.pruning.compare import (
    DEFAULT_CRITERIA,
    DEFAULT_SPARSITIES,
    format_table,
    prune_and_evaluate,
)
from cdi_experiments.pruning.criteria import (
    THRESHOLD_CRITERIA,
    ScoreFn,
    criterion_names,
    get_criterion,
    magnitude,
    magnitude_increase,
    masks_at_sparsity,
    matched_masks,
    movement,
    random_scores,
    ranked_mask,
    register_criterion,
    sleeping,
    sleeping_mask,
)
from cdi_experiments.pruning.mask import (
    Mask,
    effective_weight,
    prunable_names,
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
