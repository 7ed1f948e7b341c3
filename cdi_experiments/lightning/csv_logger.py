"""``ResumableCSVLogger``: ``<run_dir>/metrics.csv`` that survives a resume.

Lightning's CSV writer deletes an existing ``metrics.csv`` when it starts, which would lose the
rows of the epochs a resumed checkpoint holds. The one private hook this needs
(``ExperimentWriter._check_log_dir_exists``) is overridden here and nowhere else; Lightning has
no public way to append to an existing metrics file (other projects hit the same wall, e.g.
https://github.com/torchmd/torchmd-net/pull/345).

Lightning saves its epoch-end checkpoint (``ModelCheckpoint`` at the train epoch end) before it
hands that epoch's train metrics to the loggers, and a resume from that checkpoint treats the
epoch as finished without logging them: a process killed in between would lose the epoch's
train row for good. :class:`EpochEndRow` puts that pending row in the checkpoint and the
resumed logger writes it back (:func:`pending_row`), so the file equals an uninterrupted run's.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from lightning_fabric.utilities.apply_func import convert_tensors_to_scalars
from lightning_fabric.utilities.rank_zero import rank_zero_only
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter

CHECKPOINT_KEY = "cdi_epoch_end_row"
"""Where :class:`EpochEndRow` keeps the pending row in a checkpoint."""
METRICS_KEY = "cdi_callback_metrics"
"""Where :class:`EpochEndRow` keeps ``trainer.callback_metrics`` (the fit's last values)."""


class _KeepingWriter(ExperimentWriter):
    """On resume, keeps the rows of epochs ``<= keep_epochs_upto`` (those the checkpoint holds)
    and drops later ones (a test row, or an epoch the interruption cut short), which the run
    logs again."""

    def __init__(
        self, log_dir: str, keep_epochs_upto: int | None, epoch_end_row: Mapping[str, Any] | None
    ) -> None:
        self._keep_upto = keep_epochs_upto
        self._pending = epoch_end_row
        super().__init__(log_dir=log_dir)

    def _check_log_dir_exists(self) -> None:  # private Lightning hook, see the module doc
        path = Path(self.metrics_file_path)
        if not path.is_file():
            return
        if self._keep_upto is None:  # a fresh run: Lightning's warning, and a fresh file
            super()._check_log_dir_exists()
            return
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            header = list(reader.fieldnames or [])
            rows = [r for r in reader if r.get("epoch") and int(r["epoch"]) <= self._keep_upto]
        pending = self._pending
        if pending is not None and int(pending["epoch"]) == self._keep_upto:
            logged = set(pending) - {"epoch", "step"}
            # already written when a row of the same epoch holds any of its keys (earlier
            # epochs' rows hold the same keys and say nothing about this one)
            same_epoch = [r for r in rows if int(r["epoch"]) == self._keep_upto]
            if not any(
                logged & {k for k, v in r.items() if v not in ("", None)} for r in same_epoch
            ):
                rows.append(dict(pending))  # the row the interruption kept from the file
                header = [*header, *(k for k in pending if k not in header)]
        self.metrics_keys = sorted(header)
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.metrics_keys)
            writer.writeheader()
            writer.writerows(rows)


class ResumableCSVLogger(CSVLogger):
    """``<save_dir>/metrics.csv`` (no version subfolders) that survives a resume.

    Args:
        save_dir: The run directory.
        keep_epochs_upto: On resume, the checkpoint's epoch: its rows and earlier ones are
            kept. ``None`` starts a fresh file.
        epoch_end_row: On resume, the checkpoint's pending epoch-end row
            (:func:`pending_row`): written back if the file lacks it.
    """

    def __init__(
        self,
        save_dir: str,
        keep_epochs_upto: int | None = None,
        epoch_end_row: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(save_dir=save_dir, name="", version="")
        self._keep_upto = keep_epochs_upto
        self._pending = epoch_end_row

    @property
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            if rank_zero_only.rank != 0:  # Lightning's rank_zero_experiment: a no-op elsewhere
                return super().experiment
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _KeepingWriter(self.log_dir, self._keep_upto, self._pending)
        return self._experiment


class EpochEndRow(Callback):
    """Puts the epoch's not-yet-logged metrics row into a checkpoint saved at a train epoch end.

    The row is what Lightning's logger connector would log next (``epoch``, ``step`` and every
    epoch-level metric logged in the train loop: the model's train loss and accuracy, the
    tracking callback's awakened shares), as plain Python numbers, so the checkpoint still loads
    with ``weights_only=True``. A checkpoint saved at any other moment gets no row.
    """

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        latest = convert_tensors_to_scalars(dict(trainer.callback_metrics))
        checkpoint[METRICS_KEY] = {
            k: float(v) for k, v in latest.items() if isinstance(v, (int, float))
        }  # a fit resumed past its last epoch logs nothing: these are its final metrics
        progress = trainer.fit_loop.epoch_progress.current
        if not trainer.training or progress.processed <= progress.completed:
            return  # not between the epoch end hooks and the logging of their metrics
        # The one private read: Lightning has no public view of the metrics it is about to log
        # (``trainer.logged_metrics`` merges in everything logged before).
        metrics = convert_tensors_to_scalars(trainer._logger_connector.metrics["log"])
        if not metrics:
            return
        step = trainer.fit_loop.epoch_loop._batches_that_stepped - 1  # as Lightning logs it
        row = {k: float(v) if isinstance(v, float) else v for k, v in metrics.items()}
        checkpoint[CHECKPOINT_KEY] = {"epoch": trainer.current_epoch, **row, "step": step}


def saved_metrics(checkpoint: Mapping[str, Any] | None) -> dict[str, float]:
    """The ``trainer.callback_metrics`` :class:`EpochEndRow` saved in ``checkpoint``."""
    saved = (checkpoint or {}).get(METRICS_KEY)
    return dict(saved) if isinstance(saved, Mapping) else {}


def pending_row(checkpoint: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The row :class:`EpochEndRow` left in ``checkpoint``, if any."""
    row = (checkpoint or {}).get(CHECKPOINT_KEY)
    return dict(row) if isinstance(row, Mapping) else None


__all__ = [
    "CHECKPOINT_KEY",
    "METRICS_KEY",
    "EpochEndRow",
    "ResumableCSVLogger",
    "pending_row",
    "saved_metrics",
]
