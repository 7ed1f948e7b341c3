"""Every file a run writes, named in one place, and the one way they are written (atomically)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pandas costs start-up time; only the CSV writer needs a DataFrame
    import pandas as pd

METRICS_CSV = "metrics.csv"
PRUNE_CSV = "prune_results.csv"
LAYERS_CSV = "layer_changes.csv"
DELTA_HIST_CSV = "delta_histograms.csv"
RUN_INFO_JSON = "run_info.json"
CHECKPOINT_DIR = "checkpoints"
LAST_CKPT = "last.ckpt"
FIGURE_DIR = "figures"
WANDB_DIR = "wandb"
DONE_MARKER = "DONE"
PRUNED_MODEL = "pruned_sleeping.pt"


class RunPaths:
    """Paths inside one run directory (Hydra's ``hydra.run.dir`` or a sweep job's dir)."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    @property
    def metrics(self) -> Path:
        return self.root / METRICS_CSV

    @property
    def prune(self) -> Path:
        return self.root / PRUNE_CSV

    @property
    def layers(self) -> Path:
        return self.root / LAYERS_CSV

    @property
    def delta_hist(self) -> Path:
        return self.root / DELTA_HIST_CSV

    @property
    def run_info(self) -> Path:
        return self.root / RUN_INFO_JSON

    @property
    def checkpoints(self) -> Path:
        return self.root / CHECKPOINT_DIR

    @property
    def last_ckpt(self) -> Path:
        return self.checkpoints / LAST_CKPT

    @property
    def figures(self) -> Path:
        return self.root / FIGURE_DIR

    @property
    def wandb(self) -> Path:
        return self.root / WANDB_DIR

    @property
    def pruned_model(self) -> Path:
        """State dict of the model with its sleeping weights pruned (masks made permanent)."""
        return self.root / PRUNED_MODEL

    @property
    def done(self) -> Path:
        return self.root / DONE_MARKER


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Run ``write(tmp)`` on a temporary file beside ``path``, then rename it over ``path``.

    Readers see the old file or the complete new one, never a partial write; on failure the
    temporary file is removed and ``path`` is untouched. The file gets the usual mode
    (``0666 & ~umask``), not mkstemp's 0600: results are meant to be shared.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """:func:`atomic_write` of a text."""
    atomic_write(path, lambda p: p.write_text(text))


def atomic_torch_save(path: str | os.PathLike, obj: object) -> None:
    """:func:`atomic_write` of ``torch.save(obj)``."""
    import torch

    atomic_write(path, lambda p: torch.save(obj, p))


def atomic_write_csv(path: str | os.PathLike, df: pd.DataFrame) -> None:
    """:func:`atomic_write_text` for a DataFrame (no index column)."""
    atomic_write_text(path, df.to_csv(index=False))
