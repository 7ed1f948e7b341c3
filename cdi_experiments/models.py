"""The experiments' classifiers: plain ``nn.Module``s that configs build by ``_target_``.

Every model takes ``input_shape`` (one sample, e.g. ``(1, 28, 28)``) and ``num_classes``, flattens
or tokenizes its input itself, and names its layers so configs can address them
(``fc1.weight``, ``conv1.weight``, ``attn.in_proj_weight``)::

    MLP           784-128-64-10, ReLU (configs/model/mlp.yaml); with dropout
                  256-128 (mlp_dropout.yaml)                            fc1..fcN, drop
    CNN           two 3x3 convs with ReLU and 2x2 max-pool, linear head  conv1, conv2, fc1
    RowAttention  image rows as tokens, one multi-head self-attention    embed, pos, attn, norm, head

Any other importable ``nn.Module`` works the same way: ``cdi-train model=custom
model._target_=mypkg.nets.TinyNet``; ``input_shape`` and ``num_classes`` are passed from the
datamodule when its constructor takes them.

>>> MLP(hidden=[32]).fc1
Linear(in_features=784, out_features=32, bias=True)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

IMAGE_SHAPE = (1, 28, 28)


class MLP(nn.Module):
    """Flatten, then ``fc1 .. fcN`` with ReLU (and dropout, if > 0) between them.

    Args:
        input_shape: Shape of one sample; flattened to ``prod(input_shape)`` features.
        num_classes: Output logits.
        hidden: Widths of the hidden layers (``fc1 .. fc{len(hidden)}``); the head is the next fc.
        dropout: Dropout probability after every hidden activation, in ``[0, 1)``.
    """

    def __init__(
        self,
        input_shape: Sequence[int] = IMAGE_SHAPE,
        num_classes: int = 10,
        hidden: Sequence[int] = (128, 64),
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        widths = [math.prod(_shape("input_shape", input_shape)), *_widths("hidden", hidden)]
        widths.append(_positive("num_classes", num_classes))
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout={dropout} is out of range; use a probability in [0, 1)")
        for k, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:], strict=True), start=1):
            self.add_module(f"fc{k}", nn.Linear(n_in, n_out))
        self.depth = len(widths) - 1
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)  # (B, prod(input_shape))
        for k in range(1, self.depth):
            x = self.drop(F.relu(getattr(self, f"fc{k}")(x)))
        return getattr(self, f"fc{self.depth}")(x)  # (B, num_classes)


class CNN(nn.Module):
    """``conv1 -> ReLU -> pool -> conv2 -> ReLU -> pool -> fc1``; 3x3 same-padded convs.

    Args:
        input_shape: ``(C, H, W)``.
        num_classes: Output logits.
        channels: Output channels of ``conv1`` and ``conv2``.
    """

    def __init__(
        self,
        input_shape: Sequence[int] = IMAGE_SHAPE,
        num_classes: int = 10,
        channels: Sequence[int] = (8, 16),
    ) -> None:
        super().__init__()
        c, h, w = _image_shape(input_shape)
        c1, c2 = _widths("channels", channels, length=2)
        self.conv1 = nn.Conv2d(c, c1, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, kernel_size=3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(c2 * (h // 4) * (w // 4), _positive("num_classes", num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.conv1(x)))  # (B, c1, H/2, W/2)
        x = self.pool(F.relu(self.conv2(x)))  # (B, c2, H/4, W/4)
        return self.fc1(x.flatten(1))  # (B, num_classes)


class RowAttention(nn.Module):
    """Self-attention over image rows: each of the ``H`` rows is a token of ``C * W`` features.

    ``embed`` (Linear) plus a learned position embedding ``pos``, one post-norm residual
    multi-head self-attention block ``attn`` + ``norm``, mean-pool over tokens, linear ``head``.
    ``attn`` is a ``nn.MultiheadAttention`` with the packed ``in_proj_weight`` (Q, K, V stacked
    along dim 0), which the deterministic init splits into three blocks.

    Args:
        input_shape: ``(C, H, W)``.
        num_classes: Output logits.
        d_model: Token width.
        num_heads: Attention heads; must divide ``d_model``.
    """

    def __init__(
        self,
        input_shape: Sequence[int] = IMAGE_SHAPE,
        num_classes: int = 10,
        d_model: int = 32,
        num_heads: int = 4,
    ) -> None:
        super().__init__()
        c, h, w = _image_shape(input_shape)
        d_model = _positive("d_model", d_model)
        if _positive("num_heads", num_heads) and d_model % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide d_model={d_model}")
        self.embed = nn.Linear(c * w, d_model)
        self.pos = nn.Embedding(h, d_model)
        self.attn = nn.MultiheadAttention(d_model, num_heads, batch_first=True)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, _positive("num_classes", num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = x.permute(0, 2, 1, 3).reshape(b, h, c * w)  # (B, H, C*W)
        z = self.embed(tokens) + self.pos.weight  # (B, H, d)
        z = self.norm(z + self.attn(z, z, z, need_weights=False)[0])  # (B, H, d)
        return self.head(z.mean(dim=1))  # (B, num_classes)


def _positive(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{key} must be a positive integer, got {value!r}")
    return value


def _widths(key: str, values: Any, length: int | None = None) -> list[int]:
    if isinstance(values, (int, str)) or not isinstance(values, Sequence):
        raise ValueError(f"{key} must be a list of positive integers, got {values!r}")
    if length is not None and len(values) != length:
        raise ValueError(f"{key} must have {length} entries, got {list(values)}")
    return [_positive(f"{key}[{i}]", v) for i, v in enumerate(values)]


def _shape(key: str, values: Any) -> list[int]:
    shape = _widths(key, values)
    if not shape:
        raise ValueError(f"{key} must not be empty; use e.g. [1, 28, 28]")
    return shape


def _image_shape(values: Any) -> tuple[int, int, int]:
    shape = _shape("input_shape", values)
    if len(shape) != 3:
        raise ValueError(
            f"input_shape={list(shape)} must be (channels, height, width), e.g. [1, 28, 28]; "
            "serve images unflattened (data.flatten=false) to this model"
        )
    return shape[0], shape[1], shape[2]


__all__ = ["CNN", "MLP", "RowAttention"]
