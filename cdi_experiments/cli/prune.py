"""``cdi-prune CKPT``: prune a ``cdi-train`` checkpoint and compare criteria (parse, call, exit).

The initial weights are regenerated from the identity stored in the checkpoint (no copy of them
is stored anywhere); the defaults come from the config stored in the checkpoint. Each
invocation writes its own ``<run>/prune/<arguments>-<hash8>/``
(:func:`~cdi_experiments.run.prune_stage.prune_checkpoint`).
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from pathlib import Path
from typing import Any

from omegaconf.errors import OmegaConfBaseException

from cdi_experiments.cli.args import EXIT_USAGE, OneLineArgumentParser, print_error
from cdi_experiments.datasets import DatasetError
from cdi_experiments.pruning import criterion_names
from cdi_experiments.run.checkpoint import check_checkpoint_path


class _LevelFormatter(logging.Formatter):
    """Progress lines as they are; warnings and errors start with their level."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return f"{record.levelname}: {text}" if record.levelno >= logging.WARNING else text


def _parse_list(text: str, what: str) -> list[str]:
    items = [t.strip() for t in text.split(",")]
    if not all(items):
        raise ValueError(f"--{what} {text!r} has an empty item; write e.g. --{what} a,b")
    return items


def _check_args(args: argparse.Namespace) -> dict[str, Any]:
    """Validate the command line before anything is loaded; return the prune overrides."""
    overrides: dict[str, Any] = {}
    if args.threshold is not None:
        if not (math.isfinite(args.threshold) and args.threshold >= 0):
            raise ValueError(f"--threshold {args.threshold} must be a finite number >= 0")
        overrides["threshold"] = args.threshold
    if args.criteria is not None:
        crits = _parse_list(args.criteria, "criteria")
        unknown = [c for c in crits if c not in criterion_names()]
        if unknown:
            raise ValueError(
                f"--criteria: unknown criterion {', '.join(map(repr, unknown))}; "
                f"choose from {', '.join(criterion_names())}"
            )
        overrides["criteria"] = crits
    if args.sparsities is not None:
        fractions = []
        for text in _parse_list(args.sparsities, "sparsities"):
            try:
                f = float(text)
            except ValueError:
                f = math.nan
            if not 0 < f < 1:
                raise ValueError(
                    f"--sparsities: {text!r} is not a fraction in (0, 1); write e.g. 0.5,0.9"
                )
            fractions.append(f)
        overrides["sparsities"] = fractions
    for key in ("finetune_epochs", "retrain_epochs"):
        value = getattr(args, key)
        if value is not None:
            if value < 0:
                raise ValueError(f"--{key.replace('_', '-')} must be >= 0, got {value}")
            overrides[key] = value
    if args.rewind:
        overrides["rewind"] = True
    check_checkpoint_path(args.checkpoint)
    if args.out is not None and args.out.exists() and not args.out.is_dir():
        raise ValueError(f"--out {args.out} is a file; pass a directory")
    return overrides


def main(argv: list[str] | None = None) -> int:
    """``cdi-prune CKPT [--criteria ...] [--sparsities ...] [--out DIR]``; returns the exit code.

    Writes ``prune_results.csv``, ``pruned_sleeping.pt`` and ``DONE`` to a directory of this
    invocation's own, ``<run>/prune/<arguments>-<hash8>/`` (or ``--out``), and prints the
    table; the same invocation again prints where its results are and exits 0. Bad input, a
    bad checkpoint or a locked output directory give one ``cdi-prune: error: ...`` line on
    stderr and exit code 2, and write nothing.
    """
    parser = OneLineArgumentParser(
        prog="cdi-prune",
        description="Prune a cdi-train checkpoint and compare criteria. Defaults come from the "
        "config stored in the checkpoint; the initial weights are regenerated from its "
        "identity. Each invocation writes its own <run>/prune/<arguments>-<hash8>/; "
        "rerunning it skips the work when it is done.",
    )
    parser.add_argument("checkpoint", type=Path, help="a cdi-train checkpoint (.ckpt)")
    parser.add_argument(
        "--threshold", type=float, default=None, help="sleeping threshold (default: the run's)"
    )
    parser.add_argument(
        "--criteria", default=None, help="comma-separated criteria (default: the run's)"
    )
    parser.add_argument(
        "--sparsities", default=None, help="comma-separated target sparsities in (0, 1)"
    )
    parser.add_argument(
        "--finetune-epochs", type=int, default=None, help="fine-tune each pruned copy (masks kept)"
    )
    parser.add_argument(
        "--rewind", action="store_true", help="also rewind survivors to w0 and retrain"
    )
    parser.add_argument(
        "--retrain-epochs", type=int, default=None, help="epochs of lottery-ticket retraining"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output directory (default: <run>/prune/<arguments>-<hash8>/); never one that "
        "holds other results",
    )
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # usage errors (one line, exit 2) and --help (exit 0)
        return int(exc.code or 0)
    try:
        overrides = _check_args(args)
        handler = logging.StreamHandler()
        handler.setFormatter(_LevelFormatter("%(message)s"))
        logging.basicConfig(level=logging.INFO, handlers=[handler])
        # Lightning is imported only now, after the command line checked out.
        from cdi_experiments.run.prune_stage import prune_checkpoint

        outcome = prune_checkpoint(args.checkpoint, overrides, args.out)
    except (ValueError, OmegaConfBaseException, DatasetError, OSError) as exc:
        print_error("cdi-prune", exc)
        return EXIT_USAGE
    if outcome.skipped:
        print(
            f"already done: {outcome.results} (this checkpoint with these arguments); "
            f"delete {outcome.out} to compute it again"
        )
    else:
        print(f"prune table: {outcome.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

__all__ = ["main"]
