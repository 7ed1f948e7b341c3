"""``cdi-report [ROOTS...] [--out DIR] [--threshold T] [--group-by KEY,...] [--no-figures]``:
parse, call, exit code.

The work is :func:`cdi_experiments.run.report.write_report`; exit status 0 ok, 2 bad input
(an unknown ``--group-by`` column included), an output folder another process is writing, or
a full disk (one ``cdi-report: error: ...`` line; nothing half-written). Without ``--out`` the
report goes to ``<first root>/report/``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from cdi_experiments.cli.args import EXIT_USAGE, OneLineArgumentParser, print_error
from cdi_experiments.paths import FIGURE_DIR, DiskFullError
from cdi_experiments.run.report import (
    DEFAULT_THRESHOLD,
    REPORT_DIR,
    TIDY_DIR,
    UNREADABLE_CSV,
    ReportError,
    left_out_frame,
    table_view,
    write_report,
)
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
        "--out",
        type=Path,
        default=None,
        help=f"where tables and figures go (default: <first root>/{REPORT_DIR})",
    )
    parser.add_argument(
        "--threshold",
        type=float,
        default=DEFAULT_THRESHOLD,
        help="awakened-share threshold for the figures (the nearest tracked one is used)",
    )
    parser.add_argument(
        "--group-by",
        type=_columns,
        default=None,
        metavar="KEY,...",
        help="runs.csv columns to group by (e.g. init,optimizer.lr): grouped.csv/.md/.tex "
        "with the mean, std and count of every final number over the runs (seeds) of a group",
    )
    parser.add_argument(
        "--no-figures", action="store_true", help="write the tables only (much faster)"
    )
    return parser


def _columns(text: str) -> list[str]:
    keys = [k.strip() for k in text.split(",") if k.strip()]
    if not keys:
        raise ValueError(text)
    return keys


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``cdi-report``; returns the exit status (0 ok, 2 bad input)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # usage errors (one line, exit 2) and --help (exit 0)
        return int(exc.code or 0)
    try:
        report = write_report(
            args.roots, args.out, args.threshold, args.group_by, draw=not args.no_figures
        )
    except DiskFullError as exc:
        print_error(
            PROG,
            f"cannot write {exc.path}: no space left on {exc.filesystem}; free space on "
            f"{exc.filesystem} and rerun {PROG}",
        )
        return EXIT_USAGE
    except (ReportError, ValueError, OSError) as exc:  # ValueError: RunLockedError
        print_error(PROG, exc)
        return EXIT_USAGE
    out = report.out
    print(format_frame(table_view(report.runs)))
    if report.left_out:
        print(f"\n{len(report.left_out)} runs left out (unfinished or unreadable):")
        print(format_frame(left_out_frame(report.left_out)))
    if report.grouped is not None:
        print(f"\ngrouped by {', '.join(args.group_by)} (mean, std, count over runs):")
        print(format_frame(report.grouped))
    print(f"\n{len(report.table)} runs -> {out / 'runs.csv'}, {out / 'runs.md'}")
    if report.grouped is not None:
        print(f"{len(report.grouped)} groups -> {out / 'grouped.csv'}, .md, .tex")
    print(f"tidy tables -> {out / TIDY_DIR}")
    if report.left_out:
        print(f"{len(report.left_out)} left out -> {out / UNREADABLE_CSV}")
    print(f"{len(report.figures)} figures in {out / FIGURE_DIR}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
