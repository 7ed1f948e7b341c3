"""Run summaries and ``cdi-report``: aggregate run directories into tables and figures.

``cdi-report outputs/multirun/2026-11-23`` finds every finished run below the given folders
(``run_info.json``), and writes, under ``--out``:

* ``runs.csv`` / ``runs.md``: one row per run: config choices, final train/val/test accuracy,
  awakened shares of all tracked weights at the last epoch, accuracy after matched pruning;
* ``figures/awake_per_epoch.png``: awakened share per epoch, one line per run;
* ``figures/prune_accuracy.png``: accuracy after pruning at the sleeping mask's sparsity, per
  criterion and run;
* ``figures/runs/<run>_layers.png``: per layer, awakened share and mean ``|w - w0|`` per epoch;
* ``figures/runs/<run>_prune.png``: accuracy against sparsity, one curve per criterion.
"""

from __future__ import annotations

import json
import logging
import math
import re
import textwrap
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from cdi_experiments.paths import (
    FIGURE_DIR,
    LAYERS_CSV,
    METRICS_CSV,
    PRUNE_CSV,
    RUN_INFO_JSON,
    atomic_write_csv,
    atomic_write_text,
)
from cdi_experiments.tables import format_frame, markdown_frame

log = logging.getLogger(__name__)

SUMMARY_KEYS = ("train/acc", "train/loss", "val/acc", "val/loss", "test/acc", "test/loss")
DEFAULT_THRESHOLD = 1e-5


def layer_table(history: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """Awakened shares of the last analysed epoch, one row per tracked tensor."""
    df = pd.DataFrame(list(history))
    if df.empty:
        return df
    last = df[df["epoch"] == df["epoch"].max()].drop(columns=["epoch"])
    return last.reset_index(drop=True)


def final_metrics(run_dir: Path, metrics: Mapping[str, float] | None = None) -> dict[str, float]:
    """Train/val/test loss and accuracy at the end of a run.

    ``metrics`` (e.g. ``trainer.callback_metrics``) wins where it has a key; the rest is the
    last logged value in the run's ``metrics.csv`` (``trainer.test`` clears the train and val
    entries of ``callback_metrics``, so without this the summary would show test figures only).
    """
    out = {k: float(v) for k, v in (metrics or {}).items() if k in SUMMARY_KEYS}
    path = Path(run_dir) / METRICS_CSV
    if path.exists():
        df = pd.read_csv(path)
        for key in SUMMARY_KEYS:
            if key not in out and key in df:
                values = df[key].dropna()
                if len(values):
                    out[key] = float(values.iloc[-1])
        if "epoch" in df and "train/acc" in df and df["train/acc"].notna().any():
            out["epochs"] = int(df.loc[df["train/acc"].notna(), "epoch"].max()) + 1
    return out


def summarize_run(
    run_dir: Path, metrics: Mapping[str, float], callback, prune_df: pd.DataFrame | None
) -> str:
    """The console summary printed at the end of ``cdi-train``: final accuracies, the
    per-layer awakened shares of the last epoch, and the sleeping-pruning headline."""
    fm = final_metrics(run_dir, metrics)
    lines = [f"\n== run summary: {run_dir} =="]
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
    """Every directory holding a ``run_info.json`` at or below ``roots`` (sorted, unique)."""
    runs = []
    for root in roots:
        root = Path(root)
        if (root / RUN_INFO_JSON).exists():
            runs.append(root)
        runs += sorted(p.parent for p in root.rglob(RUN_INFO_JSON) if p.parent != root)
    return sorted(set(runs))


def _init_label(init: Mapping[str, Any]) -> str:
    label = str(init["scheme"])
    if init.get("overrides"):
        label += "+" + ",".join(
            f"{k}={v if isinstance(v, str) else v.get('scheme', v)}"
            for k, v in init["overrides"].items()
        )
    return label


def run_row(run: Path) -> dict[str, Any]:
    """One row of ``runs.csv``: config choices and the run's final numbers, read from its files."""
    info = json.loads((run / RUN_INFO_JSON).read_text())
    cfg = info["config"]
    row: dict[str, Any] = {
        "run": str(run),
        "data": cfg["data"]["name"],
        "model": info.get("model_name") or cfg["model"]["name"],  # older runs: model.name
        "init": _init_label(cfg["init"]),
        "seed": cfg["seed"],
        "epochs": cfg["trainer"]["max_epochs"],
    }
    fm = final_metrics(run, info.get("final_metrics") or {})
    for key in ("train/acc", "val/acc", "test/acc", "test/loss"):
        if key in fm:
            row[key] = fm[key]
    layers = run / LAYERS_CSV
    if layers.exists():
        ld = pd.read_csv(layers)
        last = ld[(ld["epoch"] == ld["epoch"].max()) & (ld["name"] == "all")]
        for c in last.columns:
            if c.startswith("awake_pct@"):
                row[c.replace("awake_pct", "awake_all")] = float(last[c].iloc[0])
    prune = run / PRUNE_CSV
    if prune.exists():
        pdf = pd.read_csv(prune)
        for r in pdf.itertuples():
            if str(r.target).startswith("matched"):
                row[f"prune_{r.criterion}_acc_after"] = r.acc_after
                row["prune_sparsity"] = r.sparsity
    return row


def _labels(table: pd.DataFrame) -> list[str]:
    """Short, unique run labels: ``model data init sN`` (+ the directory name if needed)."""
    base = [f"{r.model} {r.data} {r.init} s{r.seed}" for r in table.itertuples()]
    counts = {b: base.count(b) for b in base}
    return [
        b if counts[b] == 1 else f"{b} ({Path(run).name})"
        for b, run in zip(base, table["run"], strict=True)
    ]


def collect(roots: Iterable[Path]) -> pd.DataFrame:
    """``runs.csv``'s table for every run below ``roots`` (empty if there are none)."""
    rows = []
    for run in find_runs(roots):
        try:
            rows.append(run_row(run))
        except (KeyError, TypeError, ValueError) as exc:  # a truncated or foreign run_info.json
            log.warning("skipping %s: unreadable %s (%s)", run, RUN_INFO_JSON, exc)
    table = pd.DataFrame(rows)
    if not table.empty:
        table.insert(1, "label", _labels(table))
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


def _awake_all_figure(
    plt, runs: list[Path], labels: list[str], threshold: float, path: Path
) -> bool:
    fig, ax = plt.subplots(figsize=(8, 4.5))
    drawn = 0
    shown: set[str] = set()
    for run, label in zip(runs, labels, strict=True):
        lp = run / LAYERS_CSV
        if not lp.exists():
            continue
        ld = pd.read_csv(lp)
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
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _layers_figure(plt, run: Path, label: str, threshold: float, path: Path) -> bool:
    """Three panels per run: awakened share per layer at ``threshold``; the whole network's
    awakened share at every tracked threshold; mean ``|w - w0|`` per layer (log scale)."""
    lp = run / LAYERS_CSV
    if not lp.exists():
        return False
    ld = pd.read_csv(lp)
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
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _prune_curve_figure(plt, run: Path, label: str, path: Path) -> bool:
    """Accuracy after pruning against sparsity, one curve per criterion (target-sparsity rows
    plus the matched point); the sleeping mask as a star."""
    pp = run / PRUNE_CSV
    if not pp.exists():
        return False
    df = pd.read_csv(pp)
    if df.empty:
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
    fig.savefig(path, dpi=120)
    plt.close(fig)
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
    fig.savefig(path, dpi=120)
    plt.close(fig)
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
    """The figures of one finished run, into ``<run_dir>/figures`` (called by ``cdi-train``)."""
    table = collect([Path(run_dir)])
    if table.empty:
        return []
    return make_figures(table, Path(run_dir) / FIGURE_DIR, threshold)


# ----------------------------------------------------------------------------- cdi-report


class ReportError(ValueError):
    """Bad input to :func:`write_report`: a missing folder, a file as ``out``, no runs."""


def write_report(
    roots: Iterable[Path], out: Path, threshold: float = DEFAULT_THRESHOLD
) -> tuple[pd.DataFrame, list[Path]]:
    """``cdi-report``'s work: collect the runs below ``roots``, write tables and figures.

    Everything is checked before anything is written: on an error ``out`` is not created.

    Args:
        roots: folders holding runs (at any depth).
        out: where ``runs.csv``, ``runs.md`` and ``figures/`` go.
        threshold: awakened-share threshold for the figures (the nearest tracked one is used).

    Returns:
        The runs table (:func:`collect`) and the figures written.

    Raises:
        ReportError: ``threshold`` not a number > 0, a root that is not a directory, ``out``
            an existing file, or no finished run below ``roots``.
    """
    roots = [Path(r) for r in roots]
    out = Path(out)
    if not (math.isfinite(threshold) and threshold > 0):
        raise ReportError(f"--threshold {threshold} must be a number > 0, e.g. 1e-5")
    for r in roots:
        if not r.is_dir():
            raise ReportError(
                f"{r} is not a directory; pass folders holding runs (e.g. outputs/multirun/...)"
            )
    if out.exists() and not out.is_dir():
        raise ReportError(f"--out {out} is a file; pass a directory")
    table = collect(roots)
    if table.empty:
        raise ReportError(f"no finished runs (run_info.json) under {', '.join(map(str, roots))}")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_csv(out / "runs.csv", table)
    atomic_write_text(out / "runs.md", markdown_frame(table.drop(columns=["run"])) + "\n")
    return table, make_figures(table, out / FIGURE_DIR, threshold)
