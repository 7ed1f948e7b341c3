"""Canonical parameter names: the names a model's parameters have once wrapper modules are
looked through, so ``torch.compile(model)``, ``DistributedDataParallel(model)`` and ``model``
give the same names, hence the same layer ids, initial weights, metric keys and masks.

A wrapper is a module that holds the real one under a fixed attribute:

==============================================  ================================
``torch.compile`` (``OptimizedModule``)         ``_orig_mod``
``DistributedDataParallel`` / ``DataParallel``  ``module``
FSDP1 (``FullyShardedDataParallel``)            ``_fsdp_wrapped_module``
activation checkpointing (``ActivationWrapper``) ``_checkpoint_wrapped_module``
==============================================  ================================

Only that attribute of a module of that type is skipped, wherever it sits in the tree (a
LightningModule holding ``self.net = torch.compile(net)`` gives ``net.fc1.weight``); a user's
own submodule called ``module`` keeps its name. A model without wrappers keeps exactly the
names ``named_modules()``/``named_parameters(recurse=False)`` give it.

Wrapper classes are looked up in ``sys.modules`` and never imported here: a model can only
hold an FSDP or a compiled module if the program already imported its module.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator

import torch
from torch import nn

# (module that defines the class, class name, attribute holding the wrapped module)
_WRAPPERS = (
    ("torch._dynamo.eval_frame", "OptimizedModule", "_orig_mod"),
    ("torch.nn.parallel.distributed", "DistributedDataParallel", "module"),
    ("torch.nn.parallel.data_parallel", "DataParallel", "module"),
    (
        "torch.distributed.fsdp.fully_sharded_data_parallel",
        "FullyShardedDataParallel",
        "_fsdp_wrapped_module",
    ),
    (
        "torch.distributed.algorithms._checkpoint.checkpoint_wrapper",
        "ActivationWrapper",
        "_checkpoint_wrapped_module",
    ),
)


def wrapped_attr(module: nn.Module) -> str | None:
    """The attribute under which ``module`` holds the module it wraps, or None if it is not
    a wrapper (see the table in this module's docstring)."""
    for mod_name, cls_name, attr in _WRAPPERS:
        cls = getattr(sys.modules.get(mod_name), cls_name, None)
        if cls is not None and isinstance(module, cls) and attr in module._modules:
            return attr
    return None


def unwrap(module: nn.Module) -> nn.Module:
    """The innermost module under a chain of wrappers (``module`` itself if not wrapped)."""
    while (attr := wrapped_attr(module)) is not None:
        module = module._modules[attr]
    return module


def canonical_named_modules(root: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(canonical name, module)`` in ``root.named_modules()`` order, wrappers left out.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2))
        >>> [n for n, _ in canonical_named_modules(nn.DataParallel(net))]
        ['', '0']
    """
    for actual, module in root.named_modules():
        if wrapped_attr(module) is not None:
            continue
        yield canonical_name(root, actual), module


def canonical_named_parameters(root: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """``(canonical name, parameter)``: each non-wrapper module's own parameters, in module
    order (a parameter shared by two modules is listed under both, as ``init_module`` walks
    them)."""
    for mname, module in canonical_named_modules(root):
        for local, param in module.named_parameters(recurse=False):
            yield (f"{mname}.{local}" if mname else local), param


def canonical_name(root: nn.Module, actual: str) -> str:
    """The canonical form of a module or parameter name of ``root`` (wrapper segments
    dropped). Segments past the module tree (a parameter's local name) are kept as they are.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2))
        >>> canonical_name(nn.DataParallel(net), "module.0.weight")
        '0.weight'
    """
    if not actual:
        return actual
    out = []
    cur: nn.Module | None = root
    for seg in actual.split("."):
        if cur is not None and wrapped_attr(cur) == seg:
            cur = cur._modules[seg]
            continue
        out.append(seg)
        cur = cur._modules.get(seg) if cur is not None else None
    return ".".join(out)


def resolve_module(root: nn.Module, canonical: str) -> tuple[nn.Module, str]:
    """The live module a canonical module path names, and its actual path in ``root``.

    Raises:
        AttributeError: no such module (as ``nn.Module.get_submodule`` does).
    """
    cur, actual = root, []
    for seg in canonical.split(".") if canonical else ():
        while (attr := wrapped_attr(cur)) is not None:
            cur = cur._modules[attr]
            actual.append(attr)
        child = cur._modules.get(seg)
        if child is None:
            raise AttributeError(f"{type(cur).__name__} has no submodule {seg!r}")
        cur = child
        actual.append(seg)
    while (attr := wrapped_attr(cur)) is not None:
        cur = cur._modules[attr]
        actual.append(attr)
    return cur, ".".join(actual)


def actual_name(root: nn.Module, canonical: str) -> str:
    """The name under which ``root`` really holds the tensor a canonical name designates
    (``"fc1.weight"`` -> ``"_orig_mod.fc1.weight"`` for a compiled model).

    Raises:
        AttributeError: the module path does not exist.
    """
    path, _, local = canonical.rpartition(".")
    _, actual = resolve_module(root, path)
    return f"{actual}.{local}" if actual else local


def parameter_kinds(root: nn.Module, names: Iterable[str]) -> dict[str, str]:
    """Canonical parameter name -> ``"<owner type>.<local name>"``, e.g. ``Conv2d.weight``,
    ``BatchNorm2d.bias``, ``MultiheadAttention.in_proj_weight``: the per-type groups of
    metrics.

    Raises:
        AttributeError: a name whose module path does not exist in ``root``.
    """
    out = {}
    for name in names:
        path, _, local = name.rpartition(".")
        owner, _ = resolve_module(root, path)
        out[name] = f"{type(owner).__name__}.{local}"
    return out


__all__ = [
    "actual_name",
    "canonical_name",
    "canonical_named_modules",
    "canonical_named_parameters",
    "parameter_kinds",
    "resolve_module",
    "unwrap",
    "wrapped_attr",
]
