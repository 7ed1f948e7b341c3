"""Prune-and-evaluate: every criterion at matched and target sparsities, and the result table."""

from __future__ import annotations

import copy
import json
import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import pandas as pd
from torch import nn

from cdi_experiments.generator.core import check_threshold
from cdi_experiments.modules.plan import Plan
from cdi_experiments.pruning.apply import masked_copy, rewind_and_mask
from cdi_experiments.pruning.criteria import (
    THRESHOLD_CRITERIA,
    _is_fraction,
    get_criterion,
    masks_at_sparsity,
    matched_masks,
    sleeping_mask,
)
from cdi_experiments.pruning.mask import Mask
from cdi_experiments.tables import format_frame

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- evaluation

DEFAULT_CRITERIA = ("sleeping", "magnitude", "movement", "magnitude_increase", "random")
DEFAULT_SPARSITIES = (0.5, 0.8, 0.9)


def _row(
    criterion: str,
    target: str,
    mask: Mask,
    model: nn.Module,
    plan: Plan,
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
    plan: Plan,
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
    formats: dict[str, Callable[[Any], str]] = {"sparsity": lambda x: f"{100 * x:.2f}%"}
    for c in ("acc_before", "acc_after", "acc_finetuned", "acc_rewound"):
        formats[c] = lambda x: f"{x:.4f}"
    formats["acc_delta"] = lambda x: f"{x:+.4f}"
    formats["num_pruned"] = lambda x: f"{int(x):,}"
    return format_frame(df[cols], formats)


__all__ = [
    "DEFAULT_CRITERIA",
    "DEFAULT_SPARSITIES",
    "format_table",
    "log",
    "prune_and_evaluate",
]
