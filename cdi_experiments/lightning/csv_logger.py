"""``ResumableCSVLogger``: ``<run_dir>/metrics.csv`` that survives a resume.

Lightning's CSV writer deletes an existing ``metrics.csv`` when it starts, which would lose the
rows of the epochs a resumed checkpoint holds. The one private hook this needs
(``ExperimentWriter._check_log_dir_exists``) is overridden here and nowhere else; Lightning has
no public way to append to an existing metrics file (other projects hit the same wall, e.g.
https://github.com/torchmd/torchmd-net/pull/345).
"""

from __future__ import annotations

import csv
from pathlib import Path

from lightning_fabric.utilities.rank_zero import rank_zero_only
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter


class _KeepingWriter(ExperimentWriter):
    """On resume, keeps the rows of epochs ``<= keep_epochs_upto`` (those the checkpoint holds)
    and drops later ones (a test row, or an epoch the interruption cut short), which the run
    logs again."""

    def __init__(self, log_dir: str, keep_epochs_upto: int | None) -> None:
        self._keep_upto = keep_epochs_upto
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
    """

    def __init__(self, save_dir: str, keep_epochs_upto: int | None = None) -> None:
        super().__init__(save_dir=save_dir, name="", version="")
        self._keep_upto = keep_epochs_upto

    @property
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            if rank_zero_only.rank != 0:  # Lightning's rank_zero_experiment: a no-op elsewhere
                return super().experiment
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _KeepingWriter(self.log_dir, self._keep_upto)
        return self._experiment


__all__ = ["ResumableCSVLogger"]
