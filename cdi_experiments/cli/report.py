"""``cdi-report [ROOTS...] [--out DIR] [--threshold T]``: parse, call, exit code.

The work is :func:`cdi_experiments.run.report.write_report`; exit status 0 ok, 2 bad input
(one ``cdi-report: error: ...`` line, nothing written).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from cdi_experiments.cli.args import EXIT_USAGE, OneLineArgumentParser, print_error
from cdi_experiments.paths import FIGURE_DIR
from cdi_experiments.run.report import DEFAULT_THRESHOLD, ReportError, write_report
from cdi_experiments.tables import format_frame

PROG = "cdi-report"


def build_parser() -> OneLineArgumentParser:
    parser = OneLineArgumentParser(
        prog=PROG, description="Aggregate cdi-train runs into tables and figures."
    )
    parser.add_argument(
        "roots", nargs="*", type=Path, default=[Path("outputs")], help="folders holding runs"
    )
    parser.add_argument(
        "--out", type=Path, default=Path("outputs/report"), help="where tables and figures go"
    )
    parser.add_argument(
        "--threshold",
        type=float,
        default=DEFAULT_THRESHOLD,
        help="awakened-share threshold for the figures (the nearest tracked one is used)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``cdi-report``; returns the exit status (0 ok, 2 bad input)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # usage errors (one line, exit 2) and --help (exit 0)
        return int(exc.code or 0)
    try:
        table, figures = write_report(args.roots, args.out, args.threshold)
    except (ReportError, OSError) as exc:
        print_error(PROG, exc)
        return EXIT_USAGE
    print(format_frame(table.drop(columns=["run"])))
    print(f"\n{len(table)} runs -> {args.out / 'runs.csv'}, {args.out / 'runs.md'}")
    print(f"{len(figures)} figures in {args.out / FIGURE_DIR}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
