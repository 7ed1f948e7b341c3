"""The one evaluation helper: mean cross-entropy and top-1 accuracy of a classifier over
batches, in eval mode, with exact counts.

Every accuracy the project reports goes through :func:`evaluate`: the Lightning classifier's
own ``evaluate``, the prune stage's before/after comparison, and the showcase. Its sums are
those of the training steps (loss summed as ``loss * len(batch)`` in float64, correct
predictions counted as integers), so its ``acc`` equals ``trainer.test``'s ``test/acc``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn


@torch.no_grad()
def evaluate(
    model: nn.Module, batches: Iterable[Sequence[torch.Tensor]], device: torch.device | None = None
) -> dict[str, float | int]:
    """Mean loss and accuracy of ``model`` over ``batches``, in eval mode.

    Args:
        model: Maps ``x`` to logits ``(B, classes)``.
        batches: Yields ``(x, y)`` pairs, e.g. a test dataloader, or ``[(x, y)]`` for one
            in-memory tensor pair.
        device: Where to run; default: the device of the model's first parameter (CPU if it
            has none).

    Returns:
        ``{"loss": mean cross-entropy, "acc": correct / count, "count": count}``.

    Raises:
        ValueError: If ``batches`` yields no samples.
    """
    if device is None:
        first = next(model.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    count = 0
    try:
        for x, y in batches:
            x, y = x.to(device), y.to(device)
            logits = model(x)  # (B, classes)
            loss_sum.add_(F.cross_entropy(logits, y), alpha=len(y))
            correct.add_((logits.argmax(dim=1) == y).sum())
            count += len(y)
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("evaluate() got no samples; pass a non-empty dataloader")
    return {
        "loss": float(loss_sum) / count,
        "acc": float(correct.double() / count),
        "count": count,
    }


__all__ = ["evaluate"]
