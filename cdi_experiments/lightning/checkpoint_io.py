"""``AtomicCheckpointIO``: checkpoint files written atomically on any filesystem.

Lightning's :class:`~lightning_fabric.plugins.io.torch_io.TorchCheckpointIO` writes through an
fsspec transaction, which stages the file in ``$TMPDIR`` and then moves it into place. When
``$TMPDIR`` and the run directory are on different filesystems (a node-local ``/tmp`` and a
shared run directory, the usual cluster layout), that move is a copy over the old
``last.ckpt``: a kill or a full disk during the copy leaves a truncated checkpoint and nothing
to resume from. Here the file is written beside its target, fsynced, renamed over it (atomic
within one filesystem), and the directory is fsynced: readers and resumes see the previous
checkpoint or the complete new one, never a partial file. A write that fails removes its
temporary file; a killed one leaves a hidden ``.last.ckpt.*`` that nothing reads.

Loading is Lightning's, ``weights_only`` as the caller asks. Paths with a URL scheme
(``s3://`` ...) are left to Lightning.

Under ``trainer=fsdp2`` (Lightning's ``ModelParallelStrategy``) the full state dict that rank 0
gathers (``save_distributed_checkpoint=false``, the default) is saved through this class too. A
distributed checkpoint folder (``true``) is written by the strategy itself, every rank its own
shards, without any CheckpointIO: that one is rewritten in place, not atomically.
"""

from __future__ import annotations

from typing import Any

from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

from cdi_experiments.paths import atomic_torch_save


class AtomicCheckpointIO(TorchCheckpointIO):
    """:class:`TorchCheckpointIO` whose local saves are atomic on any filesystem (see the
    module doc). Pass it to the Trainer: ``Trainer(plugins=[AtomicCheckpointIO()])``."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None or "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        atomic_torch_save(path, checkpoint)


__all__ = ["AtomicCheckpointIO"]
