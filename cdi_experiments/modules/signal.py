"""Signal propagation at initialization: how the forward activations and the backward gradients
scale through a deep MLP under each init scheme, before any training.

One forward and one backward pass of the cross-entropy loss on a real data batch; per layer
``k`` (``fc1`` .. ``fc<depth>``) it measures the standard deviation of the pre-activation
``z_k = W_k h_{k-1} + b_k``, of the activation ``h_k = act(z_k)`` (the logits for the last
layer), of the backward signal ``dL/dz_k`` and of the weight gradient ``dL/dW_k``. A scheme that
keeps the forward std roughly constant over depth (He for ReLU, Xavier/LeCun for tanh, see
Glorot & Bengio 2010 and He et al. 2015) keeps the gradients usable too; one that shrinks or
grows it by a constant factor per layer makes them vanish or explode geometrically.

The columns of :func:`signal_frame` (``signal_propagation.csv``) are :data:`SIGNAL_COLUMNS`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from cdi_experiments.modules.initialize import init_module

ACTIVATIONS = ("tanh", "relu")
SIGNAL_COLUMNS = (
    "scheme",
    "activation",
    "seed",
    "depth",
    "width",
    "layer",
    "preact_std",
    "act_std",
    "grad_std",
    "weight_grad_std",
)


class DeepMLP(nn.Module):
    """``fc1 .. fc<depth>`` of equal hidden width with one activation between them.

    Args:
        in_features: Input features (784 for flattened 28 x 28 images).
        num_classes: Output logits.
        depth: Linear layers in total (the last one is the head), at least 2.
        width: Hidden width.
        activation: ``"tanh"`` or ``"relu"``.

    Raises:
        ValueError: ``depth`` < 2, ``width`` < 1 or an unknown activation.
    """

    def __init__(
        self,
        in_features: int = 784,
        num_classes: int = 10,
        depth: int = 20,
        width: int = 256,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        if depth < 2:
            raise ValueError(f"depth={depth} is too small; use depth >= 2 (hidden layers + head)")
        if width < 1:
            raise ValueError(f"width={width} is not allowed; use a positive hidden width")
        if activation not in ACTIVATIONS:
            raise ValueError(
                f"activation={activation!r} is unknown; use one of {', '.join(ACTIVATIONS)}"
            )
        self.depth = depth
        self.activation = activation
        widths = [in_features, *([width] * (depth - 1)), num_classes]
        for k in range(1, depth + 1):
            self.add_module(f"fc{k}", nn.Linear(widths[k - 1], widths[k]))

    def forward(self, x: torch.Tensor, trace: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Logits; ``trace`` (if given) receives each layer's pre-activation, in order."""
        act = torch.tanh if self.activation == "tanh" else F.relu
        h = x.flatten(1)  # (B, in_features)
        for k in range(1, self.depth + 1):
            z = getattr(self, f"fc{k}")(h)  # (B, width) or (B, num_classes)
            if trace is not None:
                z.retain_grad()
                trace.append(z)
            h = act(z) if k < self.depth else z
        return h


def _std(t: torch.Tensor) -> float:
    """Population std over every entry, in float64 (0 for a constant tensor)."""
    return float(t.detach().double().std(unbiased=False))


def measure_signal(model: DeepMLP, x: torch.Tensor, y: torch.Tensor) -> pd.DataFrame:
    """One forward/backward pass of the mean cross-entropy; per-layer stds (see module doc).

    Args:
        model: an initialized :class:`DeepMLP`.
        x: input batch ``(B, ...)``.
        y: integer labels ``(B,)``.

    Returns:
        One row per layer: ``layer`` (1-based), ``preact_std``, ``act_std``, ``grad_std``
        (of ``dL/dz``), ``weight_grad_std``. Non-finite values (an exploding scheme) are kept
        as ``inf``/``nan``: they are the measurement.
    """
    model.zero_grad(set_to_none=True)
    trace: list[torch.Tensor] = []
    logits = model(x, trace)  # (B, num_classes)
    F.cross_entropy(logits, y).backward()
    act = torch.tanh if model.activation == "tanh" else F.relu
    rows = []
    for k, z in enumerate(trace, start=1):
        h = act(z) if k < model.depth else z
        w_grad = getattr(model, f"fc{k}").weight.grad
        rows.append(
            {
                "layer": k,
                "preact_std": _std(z),
                "act_std": _std(h),
                "grad_std": _std(z.grad) if z.grad is not None else math.nan,
                "weight_grad_std": _std(w_grad) if w_grad is not None else math.nan,
            }
        )
    model.zero_grad(set_to_none=True)
    return pd.DataFrame(rows)


def signal_frame(
    x: torch.Tensor,
    y: torch.Tensor,
    schemes: Sequence[str],
    *,
    activations: Sequence[str] = ACTIVATIONS,
    seeds: Sequence[int] = (0,),
    depth: int = 20,
    width: int = 256,
    num_classes: int = 10,
) -> pd.DataFrame:
    """:func:`measure_signal` for every scheme x activation x seed, in one tidy frame.

    Each network is initialized with :func:`~cdi_experiments.modules.init_module` (the same
    deterministic schemes ``cdi-train`` uses; ``lsuv`` fits its scales on ``x``), biases zero
    unless the scheme draws its own.

    Args:
        x: input batch, e.g. 256 flattened, normalized training images.
        y: its labels.
        schemes: init scheme names (``cdi_experiments.generator.schemes.names()`` or ``lsuv``).
        activations: subset of :data:`ACTIVATIONS`.
        seeds: init seeds.
        depth: Linear layers per network.
        width: hidden width.
        num_classes: output logits (labels are ``0 .. num_classes - 1``).

    Returns:
        Columns :data:`SIGNAL_COLUMNS`, one row per scheme x activation x seed x layer.

    Raises:
        ValueError: an unknown scheme or activation, a bad depth/width, or nothing to
            measure (no scheme, activation or seed).
    """
    for what, given in (("schemes", schemes), ("activations", activations), ("seeds", seeds)):
        if len(given) == 0:
            raise ValueError(f"signal_frame needs at least one of {what}; got none")
    frames = []
    for activation in activations:
        for scheme in schemes:
            for seed in seeds:
                model = DeepMLP(
                    x[0].numel(), num_classes, depth=depth, width=width, activation=activation
                )
                init_module(model, int(seed), scheme, lsuv_batch=x if scheme == "lsuv" else None)
                df = measure_signal(model, x, y)
                df.insert(0, "width", width)
                df.insert(0, "depth", depth)
                df.insert(0, "seed", int(seed))
                df.insert(0, "activation", activation)
                df.insert(0, "scheme", scheme)
                frames.append(df)
    return pd.DataFrame(pd.concat(frames, ignore_index=True), columns=list(SIGNAL_COLUMNS))


__all__ = ["ACTIVATIONS", "SIGNAL_COLUMNS", "DeepMLP", "measure_signal", "signal_frame"]
