"""The plan of a deterministic init: for each parameter, the generator blocks that regenerate
it, as plain data that round-trips through checkpoints, and the fingerprint of its values."""

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
    def from_dict(cls, d: Mapping[str, Any]) -> InitPlan:
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


__all__ = ["Block", "InitPlan", "tensors_sha256"]
