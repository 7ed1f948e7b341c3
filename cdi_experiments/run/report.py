"""Run summaries and ``cdi-report``: aggregate run directories into tables and figures.

``cdi-report outputs/multirun/2026-11-23`` finds every run below the given folders
(``run_info.json`` or ``status.json``) and reports those whose ``status.json`` says
``finished`` (written last by ``cdi-train``). It writes, under ``--out`` (default: ``report/``
inside the first folder; never the current directory by accident):

* ``runs.csv`` / ``runs.md``: one row per run: config choices, final train/val/test accuracy,
  awakened shares of all tracked weights at the last epoch, accuracy after matched pruning;
* ``figures/awake_per_epoch.png``: awakened share per epoch, one line per run;
* ``figures/prune_accuracy.png``: accuracy after pruning at the sleeping mask's sparsity, per
  criterion and run;
* ``figures/runs/<run>_layers.png``: per layer, awakened share and mean ``|w - w0|`` per epoch;
* ``figures/runs/<run>_prune.png``: accuracy against sparsity, one curve per criterion;
* ``unreadable_runs.csv`` (and a section of ``runs.md``): runs left out, each with the file
  that is missing, corrupt or says the run did not finish. A reported run whose metrics,
  layer or prune file is missing or corrupt has it named in the ``problems`` column.
"""

from __future__ import annotations

import json
import logging
import math
import re
import textwrap
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from cdi_experiments.paths import (
    FIGURE_DIR,
    LAYERS_CSV,
    METRICS_CSV,
    PRUNE_CSV,
    RUN_INFO_JSON,
    STATUS_JSON,
    atomic_write,
    atomic_write_csv,
    atomic_write_text,
)
from cdi_experiments.run.lock import run_lock
from cdi_experiments.run.status import read_status
from cdi_experiments.tables import format_frame, markdown_frame

log = logging.getLogger(__name__)

SUMMARY_KEYS = ("train/acc", "train/loss", "val/acc", "val/loss", "test/acc", "test/loss")
DEFAULT_THRESHOLD = 1e-5
REPORT_DIR = "report"  # cdi-report's default --out: <first root>/report
UNREADABLE_CSV = "unreadable_runs.csv"


class UnreadableFileError(ValueError):
    """A run's file that is missing or cannot be parsed; names the file and what is wrong."""

    def __init__(self, path: Path, problem: str) -> None:
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")


def read_csv(path: Path) -> pd.DataFrame:
    """``pd.read_csv(path)``, with every failure an :class:`UnreadableFileError` naming ``path``."""
    try:
        return pd.read_csv(path)
    except FileNotFoundError:
        raise UnreadableFileError(path, "missing") from None
    except pd.errors.EmptyDataError:
        raise UnreadableFileError(path, "empty") from None
    except (ValueError, pd.errors.ParserError) as exc:  # also UnicodeDecodeError
        reason = " ".join(str(exc).split())[:120]
        raise UnreadableFileError(path, f"not a CSV table ({reason})") from None
    except OSError as exc:
        raise UnreadableFileError(path, f"unreadable ({exc.strerror})") from None


def _try_csv(path: Path) -> pd.DataFrame | None:
    """:func:`read_csv`, or ``None`` (the problem is reported in the runs table instead)."""
    try:
        return read_csv(path) if path.exists() else None
    except UnreadableFileError:
        return None


def layer_table(history: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """Awakened shares of the last analysed epoch, one row per tracked tensor."""
    df = pd.DataFrame(list(history))
    if df.empty:
        return df
    last = df[df["epoch"] == df["epoch"].max()].drop(columns=["epoch"])
    return last.reset_index(drop=True)


def final_metrics(run_dir: Path, metrics: Mapping[str, float] | None = None) -> dict[str, float]:
    """Train/val/test loss and accuracy at the end of a run.

    Raises:
        UnreadableFileError: ``metrics.csv`` exists but cannot be parsed.

    ``metrics`` (e.g. ``trainer.callback_metrics``) wins where it has a key; the rest is the
    last logged value in the run's ``metrics.csv`` (``trainer.test`` clears the train and val
    entries of ``callback_metrics``, so without this the summary would show test figures only).
    """
    out = {k: float(v) for k, v in (metrics or {}).items() if k in SUMMARY_KEYS}
    path = Path(run_dir) / METRICS_CSV
    if path.exists():
        df = read_csv(path)
        try:
            for key in SUMMARY_KEYS:
                if key not in out and key in df:
                    values = df[key].dropna()
                    if len(values):
                        out[key] = float(values.iloc[-1])
            if "epoch" in df and "train/acc" in df and df["train/acc"].notna().any():
                out["epochs"] = int(df.loc[df["train/acc"].notna(), "epoch"].max()) + 1
        except (TypeError, ValueError) as exc:  # text where numbers belong
            raise UnreadableFileError(path, f"corrupt values ({exc})") from None
    return out


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


# ----------------------------------------------------------------------------- aggregation


def find_runs(roots: Iterable[Path]) -> list[Path]:
    """Every run directory (holding ``run_info.json`` or ``status.json``) at or below ``roots``
    (sorted, unique)."""
    runs: set[Path] = set()
    for root in roots:
        root = Path(root)
        for marker in (RUN_INFO_JSON, STATUS_JSON):
            runs.update(p.parent for p in root.rglob(marker))
            if (root / marker).exists():
                runs.add(root)
    return sorted(runs)


@dataclass(frozen=True)
class LeftOut:
    """A run that is not in the report, and the file that says why."""

    run: Path
    file: Path
    problem: str


def not_finished(run: Path) -> LeftOut | None:
    """Why ``run`` is not a finished run (``None`` if its ``status.json`` says finished)."""
    path = Path(run) / STATUS_JSON
    status = read_status(run)
    if status is None:
        if path.exists():
            return LeftOut(run, path, "unreadable (not a status cdi-train wrote)")
        return LeftOut(
            run, path, "missing: the run did not finish (or predates status.json); rerun it"
        )
    if status["state"] != "finished":
        reason = f": {status['reason']}" if status.get("reason") else ""
        pid = (
            f" (pid {status.get('pid')} on {status.get('host')})"
            if status["state"] == "running"
            else ""
        )
        return LeftOut(run, path, f"{status['state']}{pid}{reason}")
    return None


def _init_label(init: Mapping[str, Any]) -> str:
    label = str(init["scheme"])
    if init.get("overrides"):
        label += "+" + ",".join(
            f"{k}={v if isinstance(v, str) else v.get('scheme', v)}"
            for k, v in init["overrides"].items()
        )
    return label


def run_row(run: Path) -> dict[str, Any]:
    """One row of ``runs.csv``: config choices and the run's final numbers, read from its files.

    A metrics, layer or prune file that is missing or corrupt is named in the row's
    ``problems`` entry (the rest of the row is still filled).

    Raises:
        UnreadableFileError: ``run_info.json`` is missing, corrupt or not a run's.
    """
    path = run / RUN_INFO_JSON
    try:
        info = json.loads(path.read_text())
        cfg = info["config"]
        row: dict[str, Any] = {
            "run": str(run),
            "data": cfg["data"]["name"],
            "model": info.get("model_name") or cfg["model"]["name"],  # older runs: model.name
            "init": _init_label(cfg["init"]),
            "seed": cfg["seed"],
            "epochs": cfg["trainer"]["max_epochs"],
        }
    except FileNotFoundError:
        raise UnreadableFileError(path, "missing") from None
    except OSError as exc:
        raise UnreadableFileError(path, f"unreadable ({exc.strerror})") from None
    except ValueError as exc:
        raise UnreadableFileError(path, f"not JSON ({exc})") from None
    except (KeyError, TypeError, AttributeError) as exc:
        raise UnreadableFileError(path, f"not a run's info (no {exc})") from None
    problems = []
    try:
        if not (run / METRICS_CSV).exists():
            problems.append(f"{METRICS_CSV} missing")
        fm = final_metrics(run, info.get("final_metrics") or {})
    except UnreadableFileError as exc:
        problems.append(f"{exc.path.name} {exc.problem}")
        fm = {k: float(v) for k, v in (info.get("final_metrics") or {}).items()}
    for key in ("train/acc", "val/acc", "test/acc", "test/loss"):
        if key in fm:
            row[key] = fm[key]
    layers = run / LAYERS_CSV
    try:
        if layers.exists():
            ld = read_csv(layers)
            last = ld[(ld["epoch"] == ld["epoch"].max()) & (ld["name"] == "all")]
            for c in last.columns:
                if c.startswith("awake_pct@"):
                    row[c.replace("awake_pct", "awake_all")] = float(last[c].iloc[0])
    except UnreadableFileError as exc:
        problems.append(f"{LAYERS_CSV} {exc.problem}")
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        problems.append(f"{LAYERS_CSV} corrupt ({type(exc).__name__}: {exc})")
    prune = run / PRUNE_CSV
    try:
        if prune.exists():
            pdf = read_csv(prune)
            for r in pdf.itertuples():
                if str(r.target).startswith("matched"):
                    row[f"prune_{r.criterion}_acc_after"] = r.acc_after
                    row["prune_sparsity"] = r.sparsity
    except UnreadableFileError as exc:
        problems.append(f"{PRUNE_CSV} {exc.problem}")
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        problems.append(f"{PRUNE_CSV} corrupt ({type(exc).__name__}: {exc})")
    row["problems"] = "; ".join(problems)
    return row


def _labels(table: pd.DataFrame) -> list[str]:
    """Short, unique run labels: ``model data init sN`` (+ the directory name if needed)."""
    base = [f"{r.model} {r.data} {r.init} s{r.seed}" for r in table.itertuples()]
    counts = {b: base.count(b) for b in base}
    return [
        b if counts[b] == 1 else f"{b} ({Path(run).name})"
        for b, run in zip(base, table["run"], strict=True)
    ]


def collect_all(
    roots: Iterable[Path], finished_only: bool = True
) -> tuple[pd.DataFrame, list[LeftOut]]:
    """``runs.csv``'s table for the runs below ``roots``, and the runs left out.

    Args:
        roots: Folders holding runs (at any depth).
        finished_only: Report only runs whose ``status.json`` says ``finished``. (``cdi-train``
            draws a run's own figures before it writes that, with ``False``.)

    Returns:
        The table (empty if no run could be read; a ``problems`` column only when some run has
        a missing or corrupt file) and, for each run left out, the file that says why.
    """
    rows, left_out = [], []
    for run in find_runs(roots):
        why = not_finished(run) if finished_only else None
        if why is not None:
            left_out.append(why)
            continue
        try:
            rows.append(run_row(run))
        except UnreadableFileError as exc:
            left_out.append(LeftOut(run, exc.path, exc.problem))
    table = pd.DataFrame(rows)
    if not table.empty:
        table.insert(1, "label", _labels(table))
        if not table["problems"].astype(bool).any():
            table = table.drop(columns=["problems"])
    return table, left_out


def collect(roots: Iterable[Path], finished_only: bool = True) -> pd.DataFrame:
    """:func:`collect_all`'s table; each run left out is logged as a warning naming its file."""
    table, left_out = collect_all(roots, finished_only)
    for item in left_out:
        log.warning("skipping %s: %s %s", item.run, item.file, item.problem)
    return table


# ----------------------------------------------------------------------------- figures


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=+-]+", "_", label).strip("_")


def _threshold_column(columns: Iterable[str], threshold: float) -> str | None:
    """The ``awake_pct@t`` column closest to ``threshold`` (exact when it was tracked)."""
    cols = [c for c in columns if c.startswith("awake_pct@")]
    if not cols:
        return None
    return min(
        cols,
        key=lambda c: abs(math.log10(float(c.split("@")[1]) or 1e-300) - math.log10(threshold)),
    )


# Overlapping lines stay visible: runs or layers with equal values (a dead network's layers
# all at 0%) differ in marker and dash, not only in colour.
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "h")
_DASHES = ("-", "--", ":", "-.")


def _style(k: int) -> dict[str, Any]:
    return {"marker": _MARKERS[k % len(_MARKERS)], "linestyle": _DASHES[k % len(_DASHES)]}


def _save(plt, fig, path: Path, dpi: int) -> None:
    """Write ``fig`` as a PNG atomically (a full disk leaves no half-written figure) and close
    it. Raises :class:`~cdi_experiments.paths.DiskFullError` when the disk is full."""
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format="png"))
    finally:
        plt.close(fig)


def _awake_all_figure(
    plt, runs: list[Path], labels: list[str], threshold: float, path: Path
) -> bool:
    fig, ax = plt.subplots(figsize=(8, 4.5))
    drawn = 0
    shown: set[str] = set()
    for run, label in zip(runs, labels, strict=True):
        ld = _try_csv(run / LAYERS_CSV)
        if ld is None or "name" not in ld or "epoch" not in ld:
            continue
        col = _threshold_column(ld.columns, threshold)
        if col is None:
            continue
        shown.add(col.split("@")[1])
        allr = ld[ld["name"] == "all"].sort_values("epoch")
        ax.plot(allr["epoch"] + 1, allr[col], label=label, alpha=0.85, **_style(drawn))
        drawn += 1
    if not drawn:
        plt.close(fig)
        return False
    ax.set_xlabel("epoch (0 = initial weights)")
    ax.set_ylabel("awakened weights, % of all tracked")
    ax.set_title(
        f"Share of weights that moved from their initial value: |w - w0| > {', '.join(sorted(shown))}"
    )
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylim(-3, 103)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), title="run")
    fig.tight_layout()
    _save(plt, fig, path, dpi=120)
    return True


def _layers_figure(plt, run: Path, label: str, threshold: float, path: Path) -> bool:
    """Three panels per run: awakened share per layer at ``threshold``; the whole network's
    awakened share at every tracked threshold; mean ``|w - w0|`` per layer (log scale)."""
    ld = _try_csv(run / LAYERS_CSV)
    if ld is None or not {"name", "epoch", "mean_delta"} <= set(ld.columns):
        return False
    col = _threshold_column(ld.columns, threshold)
    if col is None:
        return False
    fig, (left, mid, right) = plt.subplots(1, 3, figsize=(15, 4.4))
    for k, (name, g) in enumerate(ld.groupby("name", sort=False)):
        g = g.sort_values("epoch")
        style = (
            {"color": "black", "linewidth": 2.2, "marker": "o", "linestyle": "-"}
            if name == "all"
            else _style(k)
        )
        left.plot(g["epoch"] + 1, g[col], label=name, alpha=0.85, **style)
        moved = g[g["epoch"] >= 0]
        right.plot(moved["epoch"] + 1, moved["mean_delta"], label=name, alpha=0.85, **style)
    allr = ld[ld["name"] == "all"].sort_values("epoch")
    cols = sorted(
        (c for c in ld.columns if c.startswith("awake_pct@")), key=lambda c: float(c.split("@")[1])
    )
    for k, c in enumerate(cols):
        mid.plot(allr["epoch"] + 1, allr[c], label=f"> {c.split('@')[1]}", **_style(k))
    left.set_title(f"per layer: |w - w0| > {col.split('@')[1]}")
    left.set_ylabel("awakened weights, %")
    mid.set_title("whole network, per threshold")
    mid.set_ylabel("awakened weights, %")
    right.set_title("per layer: mean |w - w0|")
    right.set_ylabel("mean |w - w0| (log scale)")
    right_label = "epoch"
    if (ld["mean_delta"] > 0).any():
        right.set_yscale("log")  # a log axis cannot show 0: name the tensors that never moved
        trained = ld[ld["epoch"] >= 0]
        still = [n for n, g in trained.groupby("name", sort=False) if (g["mean_delta"] == 0).all()]
        if still:
            right_label = "epoch\n" + textwrap.fill(
                "never moved, not drawn: " + ", ".join(still), width=60
            )
    for ax in (left, mid):
        ax.set_ylim(-3, 103)
        ax.set_xlabel("epoch (0 = initial weights)")
    right.set_xlabel(right_label)
    for ax in (left, mid, right):
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
    left.legend(fontsize=7, loc="best", title="tensor")
    mid.legend(fontsize=7, loc="best", title="threshold")
    fig.suptitle(f"{label}: which weights moved from their initial values")
    fig.tight_layout()
    _save(plt, fig, path, dpi=110)
    return True


def _prune_curve_figure(plt, run: Path, label: str, path: Path) -> bool:
    """Accuracy after pruning against sparsity, one curve per criterion (target-sparsity rows
    plus the matched point); the sleeping mask as a star."""
    df = _try_csv(run / PRUNE_CSV)
    if df is None or df.empty or not {"criterion", "sparsity", "acc_after"} <= set(df.columns):
        return False
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    before = float(df["acc_before"].iloc[0])
    for crit, g in df[df["criterion"] != "sleeping"].groupby("criterion", sort=False):
        g = g.sort_values("sparsity")
        xs = [0.0, *(100 * g["sparsity"])]
        ys = [before, *g["acc_after"]]
        ax.plot(xs, ys, marker="o", label=crit)
    sleeping = df[df["criterion"] == "sleeping"]
    if len(sleeping):
        r = sleeping.iloc[0]
        ax.plot(
            [100 * r["sparsity"]],
            [r["acc_after"]],
            marker="*",
            markersize=14,
            linestyle="none",
            color="black",
            label=f"sleeping ({r['target']})",
        )
    ax.axhline(before, color="grey", linestyle="--", linewidth=1, label="unpruned")
    ax.set_xlabel("pruned weights, % of prunable")
    ax.set_ylabel("test accuracy after pruning (no fine-tuning)")
    ax.set_title(f"Accuracy against sparsity per criterion\n{label}")
    ax.set_xlim(-2, 102)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    _save(plt, fig, path, dpi=120)
    return True


def _prune_bars_figure(plt, table: pd.DataFrame, path: Path) -> bool:
    acc_cols = [c for c in table.columns if c.startswith("prune_") and c.endswith("_acc_after")]
    if not acc_cols or "test/acc" not in table:
        return False
    fig, ax = plt.subplots(figsize=(max(8, 1.3 * len(table) + 4), 4.8))
    width = 0.8 / (len(acc_cols) + 1)
    xs = list(range(len(table)))
    ax.bar([x - 0.4 + width / 2 for x in xs], table["test/acc"], width, label="unpruned")
    for k, c in enumerate(acc_cols, start=1):
        offs = [x - 0.4 + width / 2 + k * width for x in xs]
        ax.bar(offs, table[c], width, label=c[len("prune_") : -len("_acc_after")])
    ticks = list(table["label"])
    if "prune_sparsity" in table:
        ticks = [
            f"{t}\n{100 * s:.3g}% pruned" if pd.notna(s) else t
            for t, s in zip(ticks, table["prune_sparsity"], strict=True)
        ]
    ax.set_xticks(xs, ticks, fontsize=7)
    ax.set_ylabel("test accuracy after pruning")
    ax.set_ylim(0, 1.02)
    ax.set_title("Pruning as many weights per layer as the sleeping mask (|w - w0| <= t)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), title="criterion")
    fig.tight_layout()
    _save(plt, fig, path, dpi=120)
    return True


def make_figures(
    table: pd.DataFrame, out: Path, threshold: float = DEFAULT_THRESHOLD
) -> list[Path]:
    """Draw every figure for the runs of ``table`` (from :func:`collect`) under ``out``.

    Returns:
        The PNG files written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    runs = [Path(r) for r in table["run"]]
    labels = list(table["label"])
    written: list[Path] = []
    p = out / "awake_per_epoch.png"
    if _awake_all_figure(plt, runs, labels, threshold, p):
        written.append(p)
    p = out / "prune_accuracy.png"
    if _prune_bars_figure(plt, table, p):
        written.append(p)
    per_run = out / "runs"
    per_run.mkdir(exist_ok=True)
    for run, label in zip(runs, labels, strict=True):
        p = per_run / f"{_slug(label)}_layers.png"
        if _layers_figure(plt, run, label, threshold, p):
            written.append(p)
        p = per_run / f"{_slug(label)}_prune.png"
        if _prune_curve_figure(plt, run, label, p):
            written.append(p)
    return written


def run_figures(run_dir: Path, threshold: float = DEFAULT_THRESHOLD) -> list[Path]:
    """The figures of one run, into ``<run_dir>/figures`` (called by ``cdi-train`` before it
    marks the run finished)."""
    table, _ = collect_all([Path(run_dir)], finished_only=False)
    if table.empty:  # no run_info.json (yet): label the run by its directory
        table = pd.DataFrame([{"run": str(run_dir), "label": Path(run_dir).name}])
        metrics = _try_csv(Path(run_dir) / METRICS_CSV)
        if metrics is not None and "test/acc" in metrics and metrics["test/acc"].notna().any():
            table["test/acc"] = float(metrics["test/acc"].dropna().iloc[-1])
    return make_figures(table, Path(run_dir) / FIGURE_DIR, threshold)


# ----------------------------------------------------------------------------- cdi-report


class ReportError(ValueError):
    """Bad input to :func:`write_report`: a missing folder, a file as ``out``, no runs."""


@dataclass
class Report:
    """What :func:`write_report` wrote, and the runs it left out."""

    out: Path
    table: pd.DataFrame
    figures: list[Path] = field(default_factory=list)
    left_out: list[LeftOut] = field(default_factory=list)


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


def write_report(
    roots: Iterable[Path], out: Path | None = None, threshold: float = DEFAULT_THRESHOLD
) -> Report:
    """``cdi-report``'s work: collect the runs below ``roots``, write tables and figures.

    Everything is checked before anything is written: on an error ``out`` is not created.
    ``out`` is locked while it is written (a second ``cdi-report`` on it gets one line naming
    the first one's PID). Runs that did not finish, or whose ``run_info.json`` is unreadable,
    are left out and listed (``unreadable_runs.csv`` and a section of ``runs.md``).

    Args:
        roots: folders holding runs (at any depth).
        out: where ``runs.csv``, ``runs.md`` and ``figures/`` go; ``None``:
            :func:`default_out`.
        threshold: awakened-share threshold for the figures (the nearest tracked one is used).

    Returns:
        The :class:`Report`.

    Raises:
        ReportError: ``threshold`` not a number > 0, a root that is not a directory, ``out``
            an existing file, or no finished, readable run below ``roots``.
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
    table, left_out = collect_all(roots)
    where = ", ".join(map(str, roots))
    if table.empty:
        if left_out:
            first = left_out[0]
            raise ReportError(
                f"no finished, readable runs under {where}: {len(left_out)} left out, e.g. "
                f"{first.run} ({first.file}: {first.problem})"
            )
        raise ReportError(f"no runs (run_info.json or status.json) under {where}")
    with run_lock(out, "cdi-report"):
        atomic_write_csv(out / "runs.csv", table)
        markdown = markdown_frame(table.drop(columns=["run"])) + "\n"
        unreadable = out / UNREADABLE_CSV
        if left_out:
            frame = left_out_frame(left_out)
            atomic_write_csv(unreadable, frame)
            markdown += "\n## Runs left out (unfinished or unreadable)\n\n"
            markdown += markdown_frame(frame) + "\n"
        else:
            unreadable.unlink(missing_ok=True)  # from an earlier report of these folders
        atomic_write_text(out / "runs.md", markdown)
        figures = make_figures(table, out / FIGURE_DIR, threshold)
    return Report(out, table, figures, left_out)
