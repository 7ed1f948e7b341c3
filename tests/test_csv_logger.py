"""ResumableCSVLogger on resume: rows the checkpoint holds are kept, later ones dropped, and the
epoch-end row a checkpoint carried (EpochEndRow) is written back exactly once."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from cdi_experiments.lightning.csv_logger import (
    CHECKPOINT_KEY,
    ResumableCSVLogger,
    pending_row,
)

HEADER = ["epoch", "step", "train/acc", "val/acc"]
VAL0 = {"epoch": "0", "step": "4", "train/acc": "", "val/acc": "0.5633333333333334"}
TRAIN0 = {"epoch": "0", "step": "4", "train/acc": "0.32666666666666666", "val/acc": ""}
VAL1 = {"epoch": "1", "step": "9", "train/acc": "", "val/acc": "0.7066666666666667"}
PENDING = {
    "epoch": 0,
    "train/acc": 0.32666666666666666,
    "awake/all@1e-05": 99.84367286490044,
    "step": 4,
}


def write(path: Path, rows: list[dict[str, str]]) -> None:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=HEADER)
        w.writeheader()
        w.writerows(rows)


def read(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def resume(run: Path, keep: int | None, row: dict | None) -> list[dict[str, str]]:
    logger = ResumableCSVLogger(str(run), keep_epochs_upto=keep, epoch_end_row=row)
    assert logger.experiment is not None  # the writer settles the file as it starts
    path = run / "metrics.csv"
    return read(path) if path.exists() else []


def test_pending_row_is_written_back_after_the_kept_rows(tmp_path: Path):
    write(tmp_path / "metrics.csv", [VAL0, VAL1])  # killed after epoch 0's checkpoint
    rows = resume(tmp_path, 0, PENDING)
    assert [r["epoch"] for r in rows] == ["0", "0"]  # epoch 1's row is dropped, as before
    assert rows[0]["val/acc"] == VAL0["val/acc"]
    back = rows[1]
    assert back["train/acc"] == repr(PENDING["train/acc"])  # the float, digit for digit
    assert back["awake/all@1e-05"] == repr(PENDING["awake/all@1e-05"])
    assert (back["step"], back["val/acc"]) == ("4", "")
    assert list(rows[0]) == sorted(HEADER + ["awake/all@1e-05"])  # header grows, sorted


def test_a_row_already_in_the_file_is_not_written_twice(tmp_path: Path):
    write(tmp_path / "metrics.csv", [VAL0, TRAIN0])  # killed after the row was flushed
    assert resume(tmp_path, 0, PENDING) == [VAL0, TRAIN0]


def test_an_earlier_epochs_row_does_not_hide_the_pending_one(tmp_path: Path):
    # killed after epoch 1's checkpoint: epoch 0's train row holds the same keys, but epoch
    # 1's row is still missing and comes back
    write(tmp_path / "metrics.csv", [VAL0, TRAIN0, VAL1])
    pending = {**PENDING, "epoch": 1, "step": 9, "train/acc": 0.5}
    rows = resume(tmp_path, 1, pending)
    assert [(r["epoch"], r["train/acc"]) for r in rows] == [
        ("0", ""),
        ("0", TRAIN0["train/acc"]),
        ("1", ""),
        ("1", "0.5"),
    ]


@pytest.mark.parametrize("keep", [1, None])
def test_a_row_for_another_epoch_or_a_fresh_run_is_ignored(tmp_path: Path, keep):
    write(tmp_path / "metrics.csv", [VAL0, VAL1])
    rows = resume(tmp_path, keep, PENDING)
    assert all("awake/all@1e-05" not in r for r in rows)
    assert rows == ([VAL0, VAL1] if keep == 1 else [])


def test_pending_row_reads_only_what_the_callback_wrote():
    assert pending_row(None) is None
    assert pending_row({"epoch": 3}) is None
    assert pending_row({CHECKPOINT_KEY: "not a row"}) is None
    assert pending_row({CHECKPOINT_KEY: PENDING}) == PENDING
