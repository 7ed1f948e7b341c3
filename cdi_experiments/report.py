"""Run summaries and ``cdi-report``: aggregate run directories into tables and figures.

``cdi-report outputs/multirun/2026-11-23`` finds every finished run below the given folders
(``run_info.json``), and writes ``runs.csv``/``runs.md`` (one row per run: config choices,
test accuracy, awakened shares, pruning results) plus figures of awakened share per epoch and
accuracy after pruning per criterion.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd

from cdi_experiments.paths import (
    LAYERS_CSV,
    PRUNE_CSV,
    RUN_INFO_JSON,
    atomic_write_csv,
    atomic_write_text,
)

log = logging.getLogger(__name__)


def format_frame(df: pd.DataFrame, floatfmt: str = "{:.4g}") -> str:
    """A DataFrame as an aligned text table (no extra dependency)."""
    cols = [str(c) for c in df.columns]
    rows = [
        [floatfmt.format(v) if isinstance(v, float) else str(v) for v in r]
        for r in df.itertuples(index=False)
    ]
    widths = [
        max(len(c), *(len(r[k]) for r in rows)) if rows else len(c) for k, c in enumerate(cols)
    ]
    line = "  ".join(c.rjust(w) for c, w in zip(cols, widths, strict=True))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(out)


def markdown_frame(df: pd.DataFrame, floatfmt: str = "{:.4g}") -> str:
    head = "| " + " | ".join(map(str, df.columns)) + " |"
    sep = "| " + " | ".join("---" for _ in df.columns) + " |"
    body = [
        "| " + " | ".join(floatfmt.format(v) if isinstance(v, float) else str(v) for v in r) + " |"
        for r in df.itertuples(index=False)
    ]
    return "\n".join([head, sep, *body])


def layer_table(history: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """Awakened shares of the last analysed epoch, one row per tracked tensor."""
    df = pd.DataFrame(list(history))
    if df.empty:
        return df
    last = df[df["epoch"] == df["epoch"].max()].drop(columns=["epoch"])
    return last.reset_index(drop=True)


def summarize_run(
    run_dir: Path, metrics: dict[str, float], callback, prune_df: pd.DataFrame | None
) -> str:
    """The console summary printed at the end of ``cdi-train``."""
    keys = [k for k in ("train/acc", "val/acc", "test/acc", "test/loss") if k in metrics]
    lines = [f"\n== run summary: {run_dir} =="]
    lines.append("  ".join(f"{k} {metrics[k]:.4f}" for k in keys))
    table = layer_table(callback.history)
    if not table.empty:
        lines.append("\nawakened share (% of weights with |w - w0| > t), last epoch:")
        cols = (
            ["name", "numel"]
            + [c for c in table.columns if c.startswith("awake_pct@")]
            + ["max_delta"]
        )
        lines.append(format_frame(table[cols]))
    if prune_df is not None:
        lines.append(f"\nprune results: {Path(run_dir) / PRUNE_CSV}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- aggregation


def find_runs(roots: Iterable[Path]) -> list[Path]:
    runs = []
    for root in roots:
        root = Path(root)
        if (root / RUN_INFO_JSON).exists():
            runs.append(root)
        runs += sorted(p.parent for p in root.rglob(RUN_INFO_JSON) if p.parent != root)
    return sorted(set(runs))


def run_row(run: Path) -> dict[str, Any]:
    info = json.loads((run / RUN_INFO_JSON).read_text())
    cfg = info["config"]
    row: dict[str, Any] = {
        "run": str(run),
        "data": cfg["data"]["name"],
        "model": cfg["model"]["name"],
        "init": cfg["init"]["scheme"]
        + (
            "+" + ",".join(f"{k}={v}" for k, v in cfg["init"]["overrides"].items())
            if cfg["init"].get("overrides")
            else ""
        ),
        "seed": cfg["seed"],
        "epochs": cfg["trainer"]["max_epochs"],
    }
    for k, v in (info.get("final_metrics") or {}).items():
        if k.startswith(("test/", "val/acc")):
            row[k] = v
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


def collect(roots: Iterable[Path]) -> pd.DataFrame:
    runs = find_runs(roots)
    return pd.DataFrame([run_row(r) for r in runs])


def make_figures(roots: Iterable[Path], table: pd.DataFrame, out: Path) -> list[Path]:
    """Awakened share per epoch (one line per run) and accuracy after matched pruning."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    written = []
    fig, ax = plt.subplots(figsize=(7, 4))
    for run in find_runs(roots):
        lp = run / LAYERS_CSV
        if not lp.exists():
            continue
        ld = pd.read_csv(lp)
        col = (
            next((c for c in ld.columns if c == "awake_pct@1e-05"), None)
            or [c for c in ld.columns if c.startswith("awake_pct@")][-1]
        )
        allr = ld[ld["name"] == "all"].sort_values("epoch")
        ax.plot(allr["epoch"] + 1, allr[col], marker="o", label=run.name[-40:])
    ax.set_xlabel("epoch (0 = initial)")
    ax.set_ylabel("awakened weights, %")
    ax.set_title("share of weights with |w - w0| > 1e-5")
    ax.legend(fontsize=6)
    p = out / "awake_per_epoch.png"
    fig.tight_layout()
    fig.savefig(p, dpi=120)
    plt.close(fig)
    written.append(p)
    acc_cols = [c for c in table.columns if c.startswith("prune_") and c.endswith("_acc_after")]
    if acc_cols and "test/acc" in table:
        fig, ax = plt.subplots(figsize=(7, 4))
        labels = [f"{r.init}/{r.data}" for r in table.itertuples()]
        width = 0.8 / (len(acc_cols) + 1)
        xs = range(len(table))
        ax.bar([x - 0.4 + width / 2 for x in xs], table["test/acc"], width, label="unpruned")
        for k, c in enumerate(acc_cols, start=1):
            ax.bar([x - 0.4 + width / 2 + k * width for x in xs], table[c], width, label=c[6:-10])
        ax.set_xticks(list(xs), labels, rotation=30, ha="right", fontsize=7)
        ax.set_ylabel("test accuracy")
        ax.set_title("accuracy after pruning at the sleeping mask's sparsity")
        ax.legend(fontsize=6)
        p = out / "prune_accuracy.png"
        fig.tight_layout()
        fig.savefig(p, dpi=120)
        plt.close(fig)
        written.append(p)
    return written


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:
        print(f"cdi-report: error: {message}", file=sys.stderr)
        sys.exit(2)


def main(argv: list[str] | None = None) -> int:
    parser = _OneLineParser(
        prog="cdi-report", description="Aggregate cdi-train runs into tables and figures."
    )
    parser.add_argument(
        "roots", nargs="*", type=Path, default=[Path("outputs")], help="folders holding runs"
    )
    parser.add_argument(
        "--out", type=Path, default=Path("outputs/report"), help="where tables and figures go"
    )
    args = parser.parse_args(argv)
    for r in args.roots:
        if not r.exists():
            print(
                f"cdi-report: error: {r} does not exist; pass run folders (e.g. outputs/multirun/...)",
                file=sys.stderr,
            )
            return 2
    table = collect(args.roots)
    if table.empty:
        print(
            f"cdi-report: error: no finished runs (run_info.json) under {', '.join(map(str, args.roots))}",
            file=sys.stderr,
        )
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_csv(args.out / "runs.csv", table)
    atomic_write_text(args.out / "runs.md", markdown_frame(table.drop(columns=["run"])) + "\n")
    figs = make_figures(args.roots, table, args.out / "figures")
    print(format_frame(table.drop(columns=["run"])))
    print(
        f"\n{len(table)} runs -> {args.out / 'runs.csv'}, {args.out / 'runs.md'}, "
        + ", ".join(map(str, figs))
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
