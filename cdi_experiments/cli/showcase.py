"""``cdi-showcase``: the whole idea end to end on real MNIST, on a CPU (parse, call, exit code).

The work is :func:`cdi_experiments.run.showcase.run`. Exit status: 0 on success, 2 for bad
flags, 1 when the run fails (e.g. MNIST missing: run ``cdi-data fetch``).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from cdi_experiments.cli.args import OneLineArgumentParser, print_error
from cdi_experiments.datasets import DatasetError
from cdi_experiments.generator.core import check_threshold
from cdi_experiments.run.showcase import MNIST_TRAIN_SIZE, PROG, ShowcaseConfig, run

EXIT_OK, EXIT_FAILED = 0, 1


def _int_at_least(lo: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {value}")
        return value

    return parse


def _limit(text: str) -> int:
    value = _int_at_least(1)(text)
    if value > MNIST_TRAIN_SIZE:
        raise argparse.ArgumentTypeError(
            f"must be <= {MNIST_TRAIN_SIZE} (the training set's size), got {value}"
        )
    return value


def _threshold(text: str) -> float:
    try:
        return check_threshold(float(text))
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def build_parser() -> OneLineArgumentParser:
    d = ShowcaseConfig()
    p = OneLineArgumentParser(
        prog=PROG,
        description=(
            "Train an MLP on real MNIST from a deterministic init, measure which weights never "
            "moved, prune them, and compare with magnitude/movement/random pruning."
        ),
    )
    p.add_argument(
        "--seed",
        type=_int_at_least(0),
        default=d.seed,
        help="init and batch-order seed (default: %(default)s)",
    )
    p.add_argument(
        "--epochs",
        type=_int_at_least(1),
        default=d.epochs,
        help="training epochs (default: %(default)s)",
    )
    p.add_argument(
        "--threshold",
        type=_threshold,
        default=d.threshold,
        help="a weight sleeps when |w - w0| <= threshold (default: %(default)g, the original "
        "tool's: ~1000x float32 rounding at these weight sizes, 1%% of one Adam step)",
    )
    p.add_argument("--limit", type=_limit, default=None, help="train on the first N images only")
    p.add_argument("--out", type=Path, default=d.out, help="output folder (default: %(default)s)")
    p.add_argument("--quiet", action="store_true", help="print only the verdict lines")
    p.add_argument(
        "--no-center",
        dest="center",
        action="store_false",
        help="main run scales by 1/std without subtracting the mean (zero pixels stay 0)",
    )
    p.add_argument(
        "--no-control",
        dest="control",
        action="store_false",
        help="skip the control run with the other input scaling",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``cdi-showcase``; returns the exit status (0 ok, 1 failed, 2 bad flags)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:  # bad flags (one line printed, 2) and --help (0)
        return int(exit_.code or 0)
    logging.basicConfig(level=logging.WARNING, format=f"{PROG}: %(message)s", stream=sys.stderr)
    try:
        run(ShowcaseConfig(**vars(args)), echo=lambda line: print(line, flush=True))
    except (DatasetError, ValueError, OSError) as err:
        print_error(PROG, err)
        return EXIT_FAILED
    return EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())
