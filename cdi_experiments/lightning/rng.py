"""``RngState``: torch's generator state in the checkpoint, for exact resumes."""

from __future__ import annotations

from typing import Any

import torch
from pytorch_lightning.callbacks import Callback


class RngState(Callback):
    """Checkpoints torch's CPU (and CUDA) generator state, which Lightning leaves out.

    Without it, a run resumed from an epoch-end checkpoint draws other dropout masks than the
    uninterrupted run (which the checkpoint was cut from) and the two diverge. Every rank is
    seeded alike, so rank 0's state, which the checkpoint holds, is every rank's.
    """

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        torch.set_rng_state(state_dict["torch"])
        if "cuda" in state_dict and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state_dict["cuda"])


__all__ = ["RngState"]
