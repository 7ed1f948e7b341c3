"""The plan of an init: how to get every tracked parameter's initial value back.

Two kinds share one interface (``names``, ``shape``, ``initial``, ``fingerprint``, ``subset``,
``to_dict``; :func:`plan_from_dict` reads either back):

* :class:`InitPlan`: for each parameter, the generator blocks that regenerate it, as plain
  data; nothing is stored but a few numbers per tensor.
* :class:`RecordedPlan`: a copy of initial values made elsewhere (the user's own init), which
  cannot be regenerated and so is stored.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from cdi_experiments.generator import bits as B
from cdi_experiments.generator.core import TensorInit, generate_tensor


@dataclass(frozen=True)
class Block:
    """Rows ``[start, stop)`` of a parameter (along dim 0), generated from ``spec``."""

    start: int
    stop: int
    spec: TensorInit


def tensors_sha256(named: Iterable[tuple[str, torch.Tensor]]) -> str:
    """sha256 over each tensor's name, shape and float32 bytes, in the given order: the
    fingerprint of a set of initial weights (regenerated or read off a live module)."""
    h = hashlib.sha256()
    for name, t in named:
        t = t.detach().to("cpu", torch.float32).contiguous()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


@dataclass
class InitPlan:
    """How every initialized parameter regenerates. Plain data: it round-trips through
    :meth:`to_dict` / :meth:`from_dict` into checkpoints (no classes of ours in them)."""

    seed: int
    scheme: str
    blocks: dict[str, list[Block]] = field(default_factory=dict)
    generator_version: int = B.GENERATOR_VERSION

    def names(self) -> list[str]:
        return list(self.blocks)

    def __contains__(self, name: object) -> bool:
        return name in self.blocks

    def shape(self, name: str) -> tuple[int, ...]:
        blocks = self.blocks[name]
        return (blocks[-1].stop, *blocks[0].spec.shape[1:])

    def initial(
        self, name: str, dtype: torch.dtype = torch.float32, device: Any = None
    ) -> torch.Tensor:
        """Regenerate one parameter's initial value (no stored copy)."""
        parts = [generate_tensor(b.spec, dtype=dtype, device=device) for b in self.blocks[name]]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)

    def initial_state(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        return {name: self.initial(name, dtype) for name in self.blocks}

    def fingerprint(self, dtype: torch.dtype = torch.float32) -> str:
        """sha256 over names, shapes and the bytes of every regenerated initial tensor."""
        return tensors_sha256((name, self.initial(name, dtype)) for name in self.blocks)

    def subset(self, names: Iterable[str]) -> InitPlan:
        """The plan of ``names`` only, in that order (each must be in this plan)."""
        return InitPlan(
            self.seed, self.scheme, {n: self.blocks[n] for n in names}, self.generator_version
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "scheme": self.scheme,
            "generator_version": self.generator_version,
            "blocks": {
                name: [
                    {
                        "start": b.start,
                        "stop": b.stop,
                        "spec": {**asdict(b.spec), "shape": list(b.spec.shape)},
                    }
                    for b in blocks
                ]
                for name, blocks in self.blocks.items()
            },
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> InitPlan | RecordedPlan:
        """The plan ``to_dict`` wrote; a :class:`RecordedPlan`'s dict gives a RecordedPlan
        (so code that reads any checkpoint's plan through this call keeps working)."""
        if d.get("kind") == RecordedPlan.KIND:
            return RecordedPlan.from_dict(d)
        blocks = {
            name: [
                Block(
                    b["start"],
                    b["stop"],
                    TensorInit(**{**b["spec"], "shape": tuple(b["spec"]["shape"])}),
                )
                for b in bl
            ]
            for name, bl in d["blocks"].items()
        }
        return cls(int(d["seed"]), str(d["scheme"]), blocks, int(d["generator_version"]))


class RecordedPlan:
    """Initial values recorded from a live module (an init this package did not make).

    A foreign init cannot be regenerated, so this stores a CPU copy of every tracked
    tensor's initial value, in the tensor's own dtype: extra memory equals the size of the
    tracked parameters, and :meth:`to_dict` (the checkpoint form) carries the same tensors, so
    a checkpoint grows by as much. ``initial(name, dtype)`` is exact in the recorded dtype
    (``|w - w0| == 0`` means bit-identical) and a plain cast in any other.

    Args:
        tensors: ``{name: initial value}``; copied (detached, to the CPU).

    Example:
        >>> plan = RecordedPlan({"fc.weight": torch.ones(2, 3)})
        >>> plan.names(), plan.shape("fc.weight")
        (['fc.weight'], (2, 3))
    """

    KIND = "recorded"
    scheme = "recorded"

    def __init__(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self.tensors = {n: t.detach().to("cpu", copy=True) for n, t in tensors.items()}

    def names(self) -> list[str]:
        return list(self.tensors)

    def __contains__(self, name: object) -> bool:
        return name in self.tensors

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.tensors[name].shape)

    def initial(
        self, name: str, dtype: torch.dtype = torch.float32, device: Any = None
    ) -> torch.Tensor:
        """A copy of one parameter's recorded initial value."""
        return self.tensors[name].to(device=device, dtype=dtype, copy=True)

    def initial_state(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        return {name: self.initial(name, dtype) for name in self.tensors}

    def fingerprint(self, dtype: torch.dtype = torch.float32) -> str:
        """sha256 over names, shapes and bytes of the recorded tensors, hashed as
        :meth:`InitPlan.fingerprint` hashes its own."""
        return tensors_sha256((name, self.tensors[name].to(dtype)) for name in self.tensors)

    def subset(self, names: Iterable[str]) -> RecordedPlan:
        return RecordedPlan({n: self.tensors[n] for n in names})

    @property
    def nbytes(self) -> int:
        """Bytes the recorded copies take (in memory, and again in a checkpoint)."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def to_dict(self) -> dict[str, Any]:
        """Plain containers and tensors only: loads with ``torch.load(weights_only=True)``."""
        return {"kind": self.KIND, "tensors": dict(self.tensors)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RecordedPlan:
        return cls(d["tensors"])


def plan_from_dict(d: Mapping[str, Any]) -> InitPlan | RecordedPlan:
    """An :class:`InitPlan` or :class:`RecordedPlan`, from what its ``to_dict`` wrote."""
    return InitPlan.from_dict(d)


Plan = InitPlan | RecordedPlan
"""Either kind of plan: what analysis, rewinding and pruning accept."""

__all__ = ["Block", "InitPlan", "Plan", "RecordedPlan", "plan_from_dict", "tensors_sha256"]
