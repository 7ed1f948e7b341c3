"""Fingerprints of a model's weights, and a debug callback that writes each rank's."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback

from cdi_experiments.lightning.callback import DeterministicInitCallback, tracked_module
from cdi_experiments.modules import tensors_sha256
from cdi_experiments.modules.naming import canonical_named_parameters
from cdi_experiments.paths import atomic_write_text


def weights_fingerprint(module: torch.nn.Module, names: Sequence[str]) -> str:
    """sha256 over the names, shapes and float32 bytes of ``module``'s parameters ``names``
    (canonical names: the same under torch.compile and DDP wrappers).

    Hashed like :meth:`cdi_experiments.modules.InitPlan.fingerprint` (one function,
    :func:`~cdi_experiments.modules.tensors_sha256`), so right after init the two are equal.
    """
    params = dict(canonical_named_parameters(module))
    return tensors_sha256((name, params[name]) for name in names)


class RankInitFingerprint(Callback):
    """Debug: each rank writes the fingerprint of its own freshly initialized weights.

    Runs in ``setup``, after :class:`DeterministicInitCallback` has initialized the model and
    before the strategy wraps it (DDP broadcasts rank 0's weights when it wraps), so equal files
    show that every rank generated the same weights by itself. Writes
    ``<run_dir>/rank<k>_init.sha256``. Enable with
    ``+callbacks.fingerprint._target_=cdi_experiments.lightning.fingerprint.RankInitFingerprint``.
    """

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        init = next(
            (c for c in trainer.callbacks if isinstance(c, DeterministicInitCallback)), None
        )
        if stage != "fit" or init is None or init.plan is None:
            return
        digest = weights_fingerprint(tracked_module(pl_module), init.plan.names())
        out = Path(trainer.default_root_dir) / f"rank{trainer.global_rank}_init.sha256"
        atomic_write_text(out, digest + "\n")


__all__ = ["RankInitFingerprint", "weights_fingerprint"]
