"""Which parameters can be pruned, and the :class:`Mask` type that checks its own invariants."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping

import torch
from torch import nn

from cdi_experiments.modules.naming import canonical_named_modules, resolve_module
from cdi_experiments.modules.plan import Plan
from cdi_experiments.modules.sharding import is_dtensor

log = logging.getLogger(__name__)

_PRUNABLE_MODULES = (nn.Linear, nn.modules.conv._ConvNd, nn.MultiheadAttention)
_WEIGHT_NAMES = ("weight", "in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")


# ----------------------------------------------------------------------------- parameters


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The module holding parameter ``name`` and its local name (pruned or not)."""
    path, _, local = name.rpartition(".")
    try:
        module, _ = resolve_module(model, path)  # canonical path: wrappers looked through
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
    plan: Plan | None = None,
    *,
    include_biases: bool = False,
    include_embeddings: bool = False,
) -> list[str]:
    """Names of the parameters a criterion may prune, in module order.

    Args:
        model: any module; already-pruned parameters are listed under their plain name
            (``fc1.weight``, not ``fc1.weight_orig``), and names are canonical (a compiled
            model's ``_orig_mod.fc1.weight`` is ``fc1.weight``).
        plan: when given, only parameters it covers (criteria need their initial values).
        include_biases: also list the biases of those modules.
        include_embeddings: also list ``nn.Embedding`` weights.

    Returns:
        Weights of ``Linear``/``Conv``/``MultiheadAttention`` modules with two or more dims,
        plus the optional extras. Norm parameters are never listed.
    """
    kinds: tuple[type, ...] = _PRUNABLE_MODULES + ((nn.Embedding,) if include_embeddings else ())
    names = []
    for mname, module in canonical_named_modules(model):
        if not isinstance(module, kinds):
            continue
        for local, param in module._parameters.items():
            if param is None:
                continue
            base = local[: -len("_orig")] if local.endswith("_orig") else local
            is_weight = base in _WEIGHT_NAMES and param.dim() >= 2
            is_bias = include_biases and base.endswith("bias") and param.dim() == 1
            full = f"{mname}.{base}" if mname else base
            if (is_weight or is_bias) and (plan is None or full in plan):
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
            if is_dtensor(t):  # its counts would need a collective on every access
                raise ValueError(
                    f"mask for {name!r} is a sharded DTensor; pass mask.full_tensor() (on "
                    "every rank), or build masks from a full state dict"
                )
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
        plan: Plan | None = None,
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
        for mname, module in canonical_named_modules(model):
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


__all__ = [
    "Mask",
    "effective_weight",
    "prunable_names",
]
