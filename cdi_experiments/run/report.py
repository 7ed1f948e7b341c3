"""``cdi-report``'s aggregation and rendering: tidy run frames grouped, and written out as
tables and figures; and the console summary at the end of ``cdi-train``.

Reading run directories into tidy frames is :mod:`cdi_experiments.run.runs`
(:func:`~cdi_experiments.run.runs.load_runs`, :class:`~cdi_experiments.run.runs.Runs`); this
module aggregates them (:func:`aggregate`: mean, std and count over seeds, grouped by any
column) and writes them.

:func:`write_report` (``cdi-report``) writes, under ``--out`` (default: ``report/`` inside the
first folder; never the current directory by accident):

* ``runs.csv`` (every column) and ``runs.md`` / ``runs.tex`` (the columns that tell runs
  apart: the swept config values and the final numbers);
* ``grouped.csv`` / ``.md`` / ``.tex`` with ``--group-by``: mean, std and count over seeds;
* ``tidy/<frame>.csv``: the tidy frames of :class:`~cdi_experiments.run.runs.Runs`, with the
  run-level and swept columns (the config values every run shares are in ``runs.csv``: join
  on ``run``);
* ``figures/*.png`` and ``*.pdf`` (:mod:`cdi_experiments.run.figures`);
* ``unreadable_runs.csv`` (and a section of ``runs.md``): runs left out, each with the file
  that is missing, corrupt or says the run did not finish. A reported run whose metrics,
  layer or prune file is missing or corrupt has it named in the ``problems`` column.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from cdi_experiments.paths import FIGURE_DIR, PRUNE_CSV, atomic_write_csv, atomic_write_text
from cdi_experiments.run import figures
from cdi_experiments.run.lock import run_lock
from cdi_experiments.run.runs import (
    META_COLUMNS,
    SUMMARY_KEYS,
    LeftOut,
    Runs,
    UnreadableFileError,
    final_metrics,
    load_runs,
)
from cdi_experiments.tables import format_frame, markdown_frame

DEFAULT_THRESHOLD = 1e-5
REPORT_DIR = "report"  # cdi-report's default --out: <first root>/report
UNREADABLE_CSV = "unreadable_runs.csv"
TIDY_DIR = "tidy"

# Columns that index a tidy frame's rows rather than measure something.
INDEX_COLUMNS = ("epoch", "threshold", "low", "high", "layer", "step")


class ReportError(ValueError):
    """Bad input to :func:`write_report` or :func:`aggregate`: a missing folder, a file as
    ``out``, no runs, an unknown ``--group-by`` column."""


# ----------------------------------------------------------------------------- end of a run


def layer_table(history: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """Awakened shares of the last analysed epoch, one row per tracked tensor."""
    df = pd.DataFrame(list(history))
    if df.empty:
        return df
    last = df[df["epoch"] == df["epoch"].max()].drop(columns=["epoch"])
    return last.reset_index(drop=True)


def summarize_run(
    run_dir: Path, metrics: Mapping[str, float], callback, prune_df: pd.DataFrame | None
) -> str:
    """The console summary printed at the end of ``cdi-train``: final accuracies, the
    per-layer awakened shares of the last epoch, and the sleeping-pruning headline."""
    lines = [f"\n== run summary: {run_dir} =="]
    try:
        fm = final_metrics(run_dir, metrics)
    except UnreadableFileError as exc:  # the summary still shows what the trainer holds
        fm = {k: float(v) for k, v in metrics.items() if k in SUMMARY_KEYS}
        lines.append(f"({exc})")
    head = [f"epochs {fm['epochs']}"] if "epochs" in fm else []
    head += [f"{k} {fm[k]:.4f}" for k in SUMMARY_KEYS if k in fm]
    lines.append("  ".join(head))
    table = layer_table(callback.history)
    if not table.empty:
        lines.append("\nawakened share (% of weights with |w - w0| > t), last epoch:")
        cols = (
            ["name", "numel"]
            + [c for c in table.columns if c.startswith("awake_pct@")]
            + ["max_delta"]
        )
        lines.append(format_frame(table[cols]))
    if prune_df is not None and len(prune_df):
        sleeping = prune_df[prune_df["criterion"] == "sleeping"]
        if len(sleeping):
            r = sleeping.iloc[0]
            lines.append(
                f"\nsleeping weights ({r['target']}): {100 * r['sparsity']:.2f}% pruned, "
                f"test acc {r['acc_before']:.4f} -> {r['acc_after']:.4f}"
            )
        lines.append(f"prune results: {Path(run_dir) / PRUNE_CSV}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- tables


def value_columns(frame: pd.DataFrame, by: Sequence[str] = ()) -> list[str]:
    """The measured columns of a tidy frame: numeric, not in ``by``, not run-level
    (:data:`~cdi_experiments.run.runs.META_COLUMNS`, dotted config names) and not a row index
    (:data:`INDEX_COLUMNS`)."""
    out = []
    for c in frame.columns:
        c = str(c)
        if c in by or c in META_COLUMNS or c in INDEX_COLUMNS or c == "epochs":
            continue
        if "." in c and "@" not in c:  # a config column such as optimizer.lr
            continue
        if pd.api.types.is_numeric_dtype(frame[c]) and not pd.api.types.is_bool_dtype(frame[c]):
            out.append(c)
    return out


def aggregate(
    frame: pd.DataFrame, by: Sequence[str], values: Sequence[str] | None = None
) -> pd.DataFrame:
    """Mean, std and count over the rows that share ``by`` (over seeds, when ``by`` holds
    everything else that differs between runs).

    Args:
        frame: A tidy frame (:class:`~cdi_experiments.run.runs.Runs`).
        by: The columns to group by, e.g. ``["optimizer", "optimizer.lr"]``; rows with a
            missing key form their own group.
        values: The columns to aggregate; ``None``: :func:`value_columns`.

    Returns:
        One row per group: ``by``, ``n_runs`` (distinct runs), then ``<v>_mean``,
        ``<v>_std`` (sample std, NaN for one value) and ``<v>_count`` (non-missing values) per
        value column.

    Raises:
        ReportError: a ``by`` or ``values`` column the frame does not have (one line, naming
            the columns it has).
    """
    by = list(by)
    if not by:
        raise ReportError("--group-by needs at least one column, e.g. --group-by init,data")
    for c in [*by, *(values or [])]:
        if c not in frame.columns:
            known = [str(k) for k in frame.columns if k != "run"]
            near = [k for k in known if k.endswith(f".{c}")]
            near += [k for k in difflib.get_close_matches(c, known, n=3) if k not in near]
            hint = f"did you mean {', '.join(map(repr, near))}? " if near else ""
            shown = ", ".join(known[:30]) + (", ..." if len(known) > 30 else "")
            raise ReportError(
                f"--group-by column {c!r} is not in the table; {hint}columns: {shown}"
            )
    values = list(values) if values is not None else value_columns(frame, by)
    grouped = frame.groupby(by, dropna=False, sort=True)
    stats = grouped[values].agg(["mean", "std", "count"]) if values else None
    out = grouped["run"].nunique().rename("n_runs").to_frame() if "run" in frame else None
    if out is None:
        out = grouped.size().rename("n_runs").to_frame()
    if stats is not None:
        stats.columns = [f"{v}_{s}" for v, s in stats.columns]
        out = out.join(stats)
    return out.reset_index()


def mean_std_text(grouped: pd.DataFrame, floatfmt: str = "{:.4g}") -> pd.DataFrame:
    """:func:`aggregate`'s table for reading: each ``<v>_mean``/``_std``/``_count`` triple as
    one column ``v`` of text ``"mean ± std"`` (just the mean for a single value), the group
    columns and ``n_runs`` as they are.

    >>> g = pd.DataFrame({"init": ["he"], "n_runs": [3], "acc_mean": [0.9], "acc_std": [0.01],
    ...                   "acc_count": [3]})
    >>> mean_std_text(g).to_dict("records")
    [{'init': 'he', 'n_runs': 3, 'acc': '0.9 ± 0.01'}]
    """
    out = pd.DataFrame(index=grouped.index)
    for c in grouped.columns:
        c = str(c)
        if c.endswith("_mean") and f"{c[:-5]}_std" in grouped:
            v = c[:-5]
            out[v] = [
                "--"
                if pd.isna(m)
                else floatfmt.format(m) + ("" if pd.isna(sd) else f" ± {floatfmt.format(sd)}")
                for m, sd in zip(grouped[c], grouped[f"{v}_std"], strict=True)
            ]
        elif not c.endswith(("_std", "_count")):
            out[c] = grouped[c]
    return out


# ----------------------------------------------------------------------------- writing


def latex_table(frame: pd.DataFrame, floatfmt: str = "{:.4g}") -> str:
    """``frame`` as a LaTeX ``tabular`` (booktabs rules: ``\\usepackage{booktabs}``), text
    escaped, ``±`` as ``$\\pm$``, missing values as ``--``."""
    latex = frame.to_latex(
        index=False, escape=True, na_rep="--", float_format=lambda v: floatfmt.format(v)
    )
    return latex.replace("±", r"$\pm$")


def write_tables(
    frame: pd.DataFrame,
    stem: Path,
    floatfmt: str = "{:.4g}",
    readable: pd.DataFrame | None = None,
) -> list[Path]:
    """``frame`` as ``<stem>.csv`` (every digit), and ``readable`` (default: ``frame``) as
    ``<stem>.md`` and ``<stem>.tex`` (numbers as ``floatfmt``), each written atomically.

    Returns:
        The three files.
    """
    stem = Path(stem)
    readable = frame if readable is None else readable
    csv, md, tex = (stem.with_name(f"{stem.name}.{ext}") for ext in ("csv", "md", "tex"))
    atomic_write_csv(csv, frame)
    atomic_write_text(md, markdown_frame(readable, floatfmt=floatfmt) + "\n")
    atomic_write_text(tex, latex_table(readable, floatfmt))
    return [csv, md, tex]


def table_view(runs: Runs) -> pd.DataFrame:
    """``runs.md``'s columns: the label, what tells runs apart (the varying config columns),
    the seed, and the final numbers."""
    t = runs.runs
    fixed = [c for c in ("label", "data", "model", "optimizer", "init", "seed", "epochs") if c in t]
    swept = [c for c in runs.varying() if c not in (*fixed, "init.scheme", "data.name")]
    numbers = [
        c
        for c in t.columns
        if c in SUMMARY_KEYS or str(c).startswith(("awake_all@", "prune_")) or c == "problems"
    ]
    return t[[*fixed, *swept, *numbers]]


def left_out_frame(left_out: list[LeftOut]) -> pd.DataFrame:
    """The runs left out as a table: ``run``, ``file``, ``problem``."""
    return pd.DataFrame(
        [{"run": str(x.run), "file": str(x.file), "problem": x.problem} for x in left_out],
        columns=["run", "file", "problem"],
    )


def default_out(roots: Iterable[Path]) -> Path:
    """``cdi-report``'s output folder when ``--out`` is not given: ``<first root>/report``
    (beside its inputs; never the current directory unless that is the first root)."""
    return Path(next(iter(roots))) / REPORT_DIR


@dataclass
class Report:
    """What :func:`write_report` wrote, and the runs it left out."""

    out: Path
    table: pd.DataFrame
    figures: list[Path] = field(default_factory=list)
    left_out: list[LeftOut] = field(default_factory=list)
    grouped: pd.DataFrame | None = None
    runs: Runs | None = None


def run_figures(run_dir: Path, threshold: float = DEFAULT_THRESHOLD) -> list[Path]:
    """The figures of one run, as PNGs in ``<run_dir>/figures`` (``cdi-train`` calls this
    before it marks the run finished)."""
    runs = load_runs([Path(run_dir)], finished_only=False)
    if runs.runs.empty:  # no run_info.json (yet): nothing names the run
        return []
    return figures.run_figures(runs, Path(run_dir) / FIGURE_DIR, threshold)


def write_report(
    roots: Iterable[Path],
    out: Path | None = None,
    threshold: float = DEFAULT_THRESHOLD,
    group_by: Sequence[str] | None = None,
    draw: bool = True,
) -> Report:
    """``cdi-report``'s work: read the runs below ``roots``, write tables and figures.

    Everything is checked before anything is written: on an error ``out`` is not created.
    ``out`` is locked while it is written (a second ``cdi-report`` on it gets one line naming
    the first one's PID). Runs that did not finish, or whose config is unreadable, are left
    out and listed (``unreadable_runs.csv`` and a section of ``runs.md``).

    Args:
        roots: folders holding runs (at any depth).
        out: where the tables and ``figures/`` go; ``None``: :func:`default_out`.
        threshold: awakened-share threshold for the figures (the nearest tracked one is used).
        group_by: columns of ``runs.csv`` to group by (``grouped.*``: mean, std and count of
            every final number over the runs of each group, i.e. over seeds).
        draw: draw the figures (``False``: tables only, in a fraction of the time).

    Returns:
        The :class:`Report`.

    Raises:
        ReportError: ``threshold`` not a number > 0, a root that is not a directory, ``out``
            an existing file, no finished, readable run below ``roots``, or a ``group_by``
            column that ``runs.csv`` lacks.
        RunLockedError: another process is writing ``out``.
        DiskFullError: the disk filled up while writing (nothing half-written is left).
    """
    roots = [Path(r) for r in roots]
    if not (math.isfinite(threshold) and threshold > 0):
        raise ReportError(f"--threshold {threshold} must be a number > 0, e.g. 1e-5")
    for r in roots:
        if not r.is_dir():
            raise ReportError(
                f"{r} is not a directory; pass folders holding runs (e.g. outputs/multirun/...)"
            )
    out = Path(out) if out is not None else default_out(roots)
    if out.exists() and not out.is_dir():
        raise ReportError(f"--out {out} is a file; pass a directory")
    runs = load_runs(roots)
    table, left_out = runs.runs, runs.left_out
    where = ", ".join(map(str, roots))
    if table.empty:
        if left_out:
            first = left_out[0]
            raise ReportError(
                f"no finished, readable runs under {where}: {len(left_out)} left out, e.g. "
                f"{first.run} ({first.file}: {first.problem})"
            )
        raise ReportError(f"no runs (run_info.json or status.json) under {where}")
    grouped = None
    if group_by:
        values = [c for c in table_view(runs).columns if c in value_columns(table)]
        grouped = aggregate(table, group_by, values)
    with run_lock(out, "cdi-report"):
        view = table_view(runs)
        write_tables(table, out / "runs", readable=view)
        markdown = markdown_frame(view) + "\n"
        unreadable = out / UNREADABLE_CSV
        if left_out:
            frame = left_out_frame(left_out)
            atomic_write_csv(unreadable, frame)
            markdown += "\n## Runs left out (unfinished or unreadable)\n\n"
            markdown += markdown_frame(frame) + "\n"
        else:
            unreadable.unlink(missing_ok=True)  # from an earlier report of these folders
        atomic_write_text(out / "runs.md", markdown)
        if grouped is not None:
            write_tables(grouped, out / "grouped", readable=mean_std_text(grouped))
        # The tidy files keep the run-level and swept columns; runs.csv has every config
        # column (join on "run"): repeating ~60 constant values on every histogram bin of a
        # sweep would make them tens of megabytes.
        constant = set(runs.config_columns) - {"seed", *runs.varying()}
        for name in Runs.FRAMES:
            frame = getattr(runs, name)
            if len(frame):
                frame = frame[[c for c in frame.columns if c not in constant]]
                atomic_write_csv(out / TIDY_DIR / f"{name}.csv", frame)
        written = figures.report_figures(runs, out / FIGURE_DIR, threshold) if draw else []
    return Report(out, table, written, left_out, grouped, runs)


__all__ = [
    "DEFAULT_THRESHOLD",
    "INDEX_COLUMNS",
    "REPORT_DIR",
    "TIDY_DIR",
    "UNREADABLE_CSV",
    "Report",
    "ReportError",
    "aggregate",
    "default_out",
    "latex_table",
    "layer_table",
    "left_out_frame",
    "mean_std_text",
    "run_figures",
    "summarize_run",
    "table_view",
    "value_columns",
    "write_report",
    "write_tables",
]
