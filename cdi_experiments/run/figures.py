"""The figures a reader needs, drawn from the tidy frames of :mod:`cdi_experiments.run.runs`.

Each figure function takes a tidy frame and returns a matplotlib ``Figure`` (the caller saves
it: :func:`save_figure` writes a PNG and a PDF). Every figure has a title, axes labelled with
their units, and one legend outside the axes (a figure legend). Lines are means over the runs
that share the line's ``hue``, the subplot's ``panel`` and the x value (over seeds, when only
the seed differs between them), with a mean +- std band where there are two runs or more.

Epochs are numbered as in ``layer_changes.csv``: ``-1`` is the initial weights (ticked
``init``), ``0`` the end of the first training epoch. Shares that span decades (the sleeping
share, ``|w - w0|``, the pruned share) are drawn on log axes; a log axis cannot show 0, so
what is not drawn is said on the axis.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from cdi_experiments.paths import atomic_write
from cdi_experiments.run.runs import INIT_EPOCH, epoch_label

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)

VARIANTS = ("one-shot", "fine-tuned", "rewound")
METRIC_NAMES = {
    "val/acc": "validation",
    "test/acc": "test",
    "test_epoch/acc": "test",
    "train/acc": "train",
    "val/loss": "validation loss",
    "test/loss": "test loss",
    "test_epoch/loss": "test loss",
    "train/loss": "train loss",
}
# Learning curves: each metric's line style, the same whatever else is drawn (validation solid,
# the test set per epoch dashed, in the scheme's colour).
CURVE_DASHES = {"val/acc": "-", "test_epoch/acc": "--", "train/acc": ":"}
# The test set measured once after training, and at every epoch (data.test_each_epoch): a run
# that has the second draws it and not the first (its last point is the same model).
AFTER_TRAINING, PER_EPOCH = "test/acc", "test_epoch/acc"
ONCE_MARKER = "*"  # a metric measured once (after training): a star, not a scheme's marker
PANEL_SIZE = (4.6, 3.4)  # inches per subplot
WEIGHT_BINS = 60  # equal-width bins of the weight histograms
MAX_PANELS = 36  # cdi-report leaves out a figure that would need more subplots
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "h")
_DASHES = ("-", "--", ":", "-.")


def _plt():
    """``matplotlib.pyplot`` with the file-only Agg backend (lazy: start-up time)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Figure, stem: Path, formats: Sequence[str] = ("png", "pdf")) -> list[Path]:
    """Write ``fig`` as ``<stem>.png`` and ``<stem>.pdf`` (each atomically: a full disk leaves
    no half-written figure) and close it.

    Returns:
        The files written.

    Raises:
        DiskFullError: the disk is full.
    """
    plt = _plt()
    stem = Path(stem)
    written = []
    try:
        for fmt in formats:
            path = stem.with_name(f"{stem.name}.{fmt}")
            atomic_write(path, lambda tmp, fmt=fmt: fig.savefig(tmp, format=fmt, dpi=120))
            written.append(path)
    finally:
        plt.close(fig)
    return written


# ----------------------------------------------------------------------------- helpers


def _style(k: int) -> dict[str, Any]:
    """Overlapping lines stay visible: they differ in marker and dash, not only in colour."""
    return {"marker": _MARKERS[k % len(_MARKERS)], "linestyle": _DASHES[k % len(_DASHES)]}


def _color(k: int) -> Any:
    """The k-th line's colour: matplotlib's 10-colour cycle, then tab20's other shades, so
    up to 20 lines (13 init schemes) never share one."""
    plt = _plt()
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    if k < len(cycle):
        return cycle[k]
    extra = [plt.get_cmap("tab20")(i) for i in range(1, 20, 2)]  # the lighter shades
    return extra[(k - len(cycle)) % len(extra)]


def _tensor_style(value: Any, k: int) -> dict[str, Any]:
    """The whole network (``all``) in bold black; each tensor in its own colour and dash."""
    if value == "all":
        return {"color": "black", "linewidth": 2.2, "marker": "o", "linestyle": "-"}
    return {"color": _color(k), **_style(k)}


def _keys(panel: str | Sequence[str] | None) -> list[str]:
    if panel is None:
        return []
    return [panel] if isinstance(panel, str) else list(panel)


def _check_columns(frame: pd.DataFrame, columns: Iterable[str], what: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(
            f"{what}: the frame has no column {', '.join(map(repr, missing))}; pass a frame "
            f"from cdi_experiments.run.runs.load_runs or name columns it has"
        )


def _panels(
    frame: pd.DataFrame, panel: str | Sequence[str] | None
) -> list[tuple[str, pd.DataFrame]]:
    """``(title, rows)`` per combination of the ``panel`` columns (one untitled panel for
    ``None``)."""
    keys = _keys(panel)
    if not keys:
        return [("", frame)]
    out = []
    for values, rows in frame.groupby(keys, dropna=False, sort=True):
        values = values if isinstance(values, tuple) else (values,)
        out.append((", ".join(f"{k}={v}" for k, v in zip(keys, values, strict=True)), rows))
    return out


def _grid(nrows: int, ncols: int, title: str) -> tuple[Figure, np.ndarray]:
    plt = _plt()
    w, h = PANEL_SIZE
    fig, axes = plt.subplots(
        nrows,
        ncols,
        figsize=(w * ncols + 2.6, h * nrows + 0.8),
        squeeze=False,
        layout="constrained",
    )
    fig.suptitle(title)
    return fig, axes


def _wrap(n: int, max_cols: int = 3) -> tuple[int, int]:
    ncols = max(1, min(n, max_cols))
    return math.ceil(n / ncols), ncols


def _hide_unused(axes: np.ndarray, used: int) -> None:
    for ax in axes.flat[used:]:
        ax.set_visible(False)


def _legend(fig: Figure, handles: dict[str, Any], title: str) -> None:
    """One legend for the whole figure, right of the axes (never over the data)."""
    if handles:
        fig.legend(
            list(handles.values()),
            list(handles.keys()),
            loc="outside right center",
            title=title,
            fontsize=8,
        )


def _mean_std(rows: pd.DataFrame, x: str, y: str) -> pd.DataFrame:
    """Per ``x``: mean, std (ddof 1) and count of ``y`` over the rows (runs)."""
    g = rows.groupby(x, sort=True)[y].agg(["mean", "std", "count"]).reset_index()
    return g.dropna(subset=["mean"])


def _band(ax: Axes, stats: pd.DataFrame, x: str, log_y: bool = False, **style: Any) -> Any | None:
    """A mean line, and a mean +- std band where two or more runs give a value; ``None`` when
    nothing can be drawn (no value, or none > 0 on a log axis)."""
    if log_y:
        stats = stats[stats["mean"] > 0]
    if stats.empty:
        return None
    (line,) = ax.plot(stats[x], stats["mean"], **style)
    several = stats["count"] > 1
    if several.any():
        s = stats[several]
        lo = s["mean"] - s["std"].fillna(0)
        hi = s["mean"] + s["std"].fillna(0)
        if log_y:  # a log axis cannot draw <= 0: the band runs off the bottom of the axis
            lo = lo.where(lo > 0, s["mean"] * 1e-3)
        ax.fill_between(s[x], lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)
    return line


def _epoch_bands(
    ax: Axes,
    sub: pd.DataFrame,
    hue: str,
    hues: Sequence[Any],
    y: str,
    handles: dict[str, Any],
    **style: Any,
) -> list[tuple[str, pd.DataFrame, Any]]:
    """One :func:`_band` of ``y`` per epoch on a log axis for each of ``hues`` (the tensor
    styles); the legend ``handles`` gain the lines drawn. Returns ``(value, stats, line)``
    per hue, ``line`` None where nothing could be drawn."""
    drawn = []
    for k, value in enumerate(hues):
        stats = _mean_std(sub[sub[hue] == value], "epoch", y)
        line = _band(ax, stats, "epoch", log_y=True, **style, **_tensor_style(value, k))
        if line is not None:
            handles.setdefault(str(value), line)
        drawn.append((str(value), stats, line))
    return drawn


def _log_axis(ax: Axes, which: str = "y") -> None:
    """A log axis with plain numbers (``0.1``, ``99.99``), not ``9.999 x 10^1``; minor ticks
    are labelled only when the axis spans less than a decade (else they would crowd)."""
    from matplotlib.ticker import FuncFormatter

    axis = ax.yaxis if which == "y" else ax.xaxis
    (ax.set_yscale if which == "y" else ax.set_xscale)("log")

    def minor(value: float, _pos: Any) -> str:
        lo, hi = sorted(axis.get_view_interval())
        return f"{value:g}" if lo > 0 and hi / lo < 10 else ""

    axis.set_major_formatter(FuncFormatter(lambda value, _pos: f"{value:g}"))
    axis.set_minor_formatter(FuncFormatter(minor))


def _epoch_axis(ax: Axes, epochs: Iterable[int]) -> None:
    """Integer epoch ticks, the initial weights ticked ``init``."""
    ticks = sorted({int(e) for e in epochs})
    if len(ticks) > 12:  # keep every k-th, always the first and the last
        k = math.ceil(len(ticks) / 12)
        ticks = sorted({*ticks[::k], ticks[0], ticks[-1]})
    ax.set_xticks(ticks, [epoch_label(e) for e in ticks])


def nearest_threshold(thresholds: Iterable[float], threshold: float) -> float:
    """The tracked threshold closest to ``threshold`` on a log scale (``0`` only for 0)."""
    tracked = sorted({float(t) for t in thresholds})
    if not tracked:
        raise ValueError("the frame has no thresholds; pass load_runs(...).layers")
    if threshold == 0 or all(t == 0 for t in tracked):
        return min(tracked, key=abs) if threshold == 0 else tracked[0]
    positive = [t for t in tracked if t > 0]
    return min(positive, key=lambda t: abs(math.log10(t) - math.log10(threshold)))


def _ordered(values: Iterable[Any], first: str = "all") -> list[Any]:
    """Unique values in order of appearance, ``first`` (e.g. the whole network) first."""
    seen = list(dict.fromkeys(values))
    return sorted(seen, key=lambda v: v != first)


def _runs_note(frame: pd.DataFrame, keys: Sequence[str]) -> str:
    """How many runs each line averages: ``"mean ± std over 3 runs per line"``."""
    if "run" not in frame or frame.empty:
        return "1 run per line"
    counts = frame.groupby(list(keys), dropna=False)["run"].nunique() if keys else None
    lo, hi = (counts.min(), counts.max()) if counts is not None else (1, frame["run"].nunique())
    n = str(hi) if lo == hi else f"{lo}-{hi}"
    return f"mean ± std over {n} runs per line" if hi > 1 else "1 run per line"


# ----------------------------------------------------------------------------- the figures


def learning_curves(
    epochs: pd.DataFrame,
    hue: str = "init",
    panel: str | Sequence[str] | None = "data",
    metrics: Sequence[str] = ("val/acc", PER_EPOCH, AFTER_TRAINING),
    chance: float | None = 0.1,
) -> Figure:
    """Validation and test accuracy per epoch, one colour per ``hue`` (init scheme), one
    subplot per ``panel`` value (dataset).

    Validation is a solid line, the test set per epoch (``test_epoch/acc``, logged by runs
    with ``data.test_each_epoch``) a dashed line in the same colour, each with a mean +- std
    band over the runs. A run without it has its test accuracy measured once after training
    (``test/acc``): a mean +- std marker at its last epoch.

    Args:
        epochs: :class:`~cdi_experiments.run.runs.Runs`' ``epochs`` frame.
        hue: The column whose values get a colour each.
        panel: The column(s) whose values get a subplot each.
        metrics: The accuracy columns to draw (styles in :data:`CURVE_DASHES`; others dashed,
            dotted... in order).
        chance: Accuracy of guessing (a dotted line); ``None``: no line.

    Raises:
        ValueError: a column the frame does not have.
    """
    _check_columns(epochs, ["epoch", hue, *_keys(panel)], "learning_curves")
    epochs = _test_once_or_per_epoch(epochs, metrics)
    metrics = [m for m in metrics if m in epochs.columns and epochs[m].notna().any()]
    if not metrics:
        raise ValueError(
            "learning_curves: the frame has no accuracy values (val/acc, test/acc); the runs' "
            "metrics files are missing (see runs.csv problems)"
        )
    panels = _panels(epochs, panel)
    nrows, ncols = _wrap(len(panels))
    fig, axes = _grid(
        nrows, ncols, f"Learning curves per {hue} ({_runs_note(epochs, [hue, *_keys(panel)])})"
    )
    handles: dict[str, Any] = {}
    hues = _ordered(epochs[hue], first="")
    plt = _plt()
    for ax, (title, rows) in zip(axes.flat, panels, strict=False):
        for k, value in enumerate(hues):
            sub = rows[rows[hue] == value]
            color, mark = _color(k), _MARKERS[k % len(_MARKERS)]
            for j, metric in enumerate(metrics):
                stats = _mean_std(sub.dropna(subset=[metric]), "epoch", metric)
                if stats.empty:
                    continue
                dash = CURVE_DASHES.get(metric, _DASHES[j % len(_DASHES)])
                if len(stats) > 1:
                    # the scheme's marker too: schemes that overlap (zeros and a zeroed layer
                    # both at chance) stay visible
                    _band(ax, stats, "epoch", color=color, linestyle=dash, marker=mark, ms=4)
                else:
                    ax.errorbar(
                        stats["epoch"],
                        stats["mean"],
                        yerr=stats["std"].fillna(0),
                        color=color,
                        marker=ONCE_MARKER,  # not among the schemes' markers
                        markersize=9,
                        capsize=3,
                        linestyle="none",
                    )
                handles.setdefault(
                    f"{hue}={value}", plt.Line2D([], [], color=color, lw=2, marker=mark, ms=4)
                )
        if chance is not None:
            ax.axhline(chance, color="grey", linestyle=":", linewidth=1, gid="chance")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("epoch")
        ax.set_ylabel("accuracy (fraction correct)")
        _epoch_axis(ax, rows["epoch"])
        ax.grid(alpha=0.3)
    _hide_unused(axes, len(panels))
    for j, metric in enumerate(metrics):
        single = epochs.dropna(subset=[metric]).groupby("run")["epoch"].nunique().max() <= 1
        style = (
            {"marker": ONCE_MARKER, "markersize": 9, "linestyle": "none"}
            if single
            else {"linestyle": CURVE_DASHES.get(metric, _DASHES[j % len(_DASHES)])}
        )
        when = " (after training)" if single else " (per epoch)" if metric == PER_EPOCH else ""
        name = METRIC_NAMES.get(metric, metric) + when
        handles[name] = plt.Line2D([], [], color="black", **style)
    if chance is not None:
        handles[f"chance ({chance:g})"] = plt.Line2D([], [], color="grey", linestyle=":")
    _legend(fig, handles, "line")
    return fig


def _test_once_or_per_epoch(epochs: pd.DataFrame, metrics: Sequence[str]) -> pd.DataFrame:
    """``epochs`` without the after-training test accuracy of the runs that measured the test
    set every epoch (drawn as their curve instead): each run shows one of the two."""
    if not {PER_EPOCH, AFTER_TRAINING} <= {*metrics} & {*epochs.columns} or "run" not in epochs:
        return epochs
    per_epoch = epochs.loc[epochs[PER_EPOCH].notna(), "run"].unique()
    if not len(per_epoch):
        return epochs
    out = epochs.copy()
    out.loc[out["run"].isin(per_epoch), AFTER_TRAINING] = np.nan
    return out


def sleeping_share(
    layers: pd.DataFrame,
    threshold: float = 1e-5,
    hue: str = "param",
    panel: str | Sequence[str] | None = None,
    params: Sequence[str] | None = None,
) -> Figure:
    """The sleeping share (``100 - awakened``: weights with ``|w - w0| <= t``) per epoch on a
    log axis, one line per ``hue`` (tensor), one subplot per ``panel`` value (e.g. optimizer
    and input preprocessing). 99.94 % awake is 0.06 % asleep: visible here, not on 0-100 %.

    Args:
        layers: :class:`~cdi_experiments.run.runs.Runs`' ``layers`` frame.
        threshold: ``t``; the nearest tracked threshold is drawn.
        hue: The column whose values get a line each (``param``: one per tensor, the whole
            network ``all`` in black).
        panel: The column(s) whose values get a subplot each.
        params: The tensors to draw (default: all, and ``all``).

    Raises:
        ValueError: a column the frame does not have.
    """
    _check_columns(
        layers,
        ["epoch", "param", "threshold", "sleeping_pct", hue, *_keys(panel)],
        "sleeping_share",
    )
    t = nearest_threshold(layers["threshold"], threshold)
    rows = layers[layers["threshold"] == t]
    if params is not None:
        rows = rows[rows["param"].isin(params)]
    panels = _panels(rows, panel)
    nrows, ncols = _wrap(len(panels))
    fig, axes = _grid(
        nrows,
        ncols,
        f"Sleeping weights: share with |w - w0| <= {t:g}, per epoch ({_runs_note(rows, [hue, *_keys(panel)])})",
    )
    handles: dict[str, Any] = {}
    hues = _ordered(rows[hue])
    for ax, (title, sub) in zip(axes.flat, panels, strict=False):
        drawn = _epoch_bands(ax, sub, hue, hues, "sleeping_pct", handles, alpha=0.9)
        zero = [value for value, stats, _ in drawn if (stats["mean"] <= 0).any()]
        _log_axis(ax, "y")
        ax.set_title(title, fontsize=9)
        ax.set_ylabel("sleeping weights, % (log scale)")
        note = f"\n0 % (all moved) not drawn: {', '.join(zero)}" if zero else ""
        ax.set_xlabel("epoch (init = initial weights)" + note)
        _epoch_axis(ax, sub["epoch"])
        ax.grid(alpha=0.3, which="both")
    _hide_unused(axes, len(panels))
    _legend(fig, handles, hue)
    return fig


def mean_delta(
    layers: pd.DataFrame, hue: str = "param", panel: str | Sequence[str] | None = None
) -> Figure:
    """Mean ``|w - w0|`` per epoch on a log axis, one line per ``hue`` (tensor).

    Raises:
        ValueError: a column the frame does not have.
    """
    _check_columns(layers, ["epoch", "threshold", "mean_delta", hue, *_keys(panel)], "mean_delta")
    t = sorted(layers["threshold"].unique())[0]  # one row per epoch x tensor
    rows = layers[(layers["threshold"] == t) & (layers["epoch"] > INIT_EPOCH)]
    panels = _panels(rows, panel)
    nrows, ncols = _wrap(len(panels))
    fig, axes = _grid(
        nrows,
        ncols,
        f"How far weights moved: mean |w - w0| ({_runs_note(rows, [hue, *_keys(panel)])})",
    )
    handles: dict[str, Any] = {}
    hues = _ordered(rows[hue])
    for ax, (title, sub) in zip(axes.flat, panels, strict=False):
        drawn = _epoch_bands(ax, sub, hue, hues, "mean_delta", handles)
        still = [value for value, stats, line in drawn if line is None and len(stats)]
        _log_axis(ax, "y")
        ax.set_title(title, fontsize=9)
        ax.set_ylabel("mean |w - w0| (weight units, log scale)")
        note = f"\nnever moved, not drawn: {', '.join(still)}" if still else ""
        ax.set_xlabel("epoch" + note)
        if len(sub):
            _epoch_axis(ax, sub["epoch"])
        ax.grid(alpha=0.3, which="both")
    _hide_unused(axes, len(panels))
    _legend(fig, handles, hue)
    return fig


def prune_accuracy(
    prune: pd.DataFrame,
    hue: str = "criterion",
    panel: str | Sequence[str] | None = None,
    variants: Sequence[str] | None = None,
    chance: float | None = 0.1,
) -> Figure:
    """Test accuracy against the pruned share (log axis), one line per ``hue`` (criterion),
    one column of subplots per variant (one-shot, fine-tuned, rewound), one row per ``panel``
    value; the unpruned accuracy (with its std band) and chance as horizontal lines.

    The sleeping criterion prunes at its own (matched) sparsity only: a star with error bars.

    Args:
        prune: :class:`~cdi_experiments.run.runs.Runs`' ``prune`` frame.
        hue: The column whose values get a line each.
        panel: The column(s) whose values get a row of subplots each.
        variants: The variants to draw (default: those in the frame, in the order above).
        chance: Accuracy of guessing (a dotted line); ``None``: no line.

    Raises:
        ValueError: a column the frame does not have, or no row of the given variants.
    """
    need = ["criterion", "target", "sparsity", "acc", "acc_before", "variant", hue, *_keys(panel)]
    _check_columns(prune, need, "prune_accuracy")
    present = [v for v in VARIANTS if v in set(prune["variant"])]
    variants = list(variants) if variants is not None else present
    rows = prune[prune["variant"].isin(variants) & (prune["sparsity"] > 0)]
    if rows.empty:
        raise ValueError(
            f"prune_accuracy: no rows of variants {variants} with sparsity > 0; the frame has "
            f"{present}"
        )
    panels = _panels(rows, panel)
    fig, axes = _grid(
        len(panels),
        len(variants),
        f"Accuracy after pruning, per criterion ({_runs_note(rows, [hue, *_keys(panel)])})",
    )
    plt = _plt()
    handles: dict[str, Any] = {}
    hues = _ordered(rows[hue], first="sleeping")
    for r, (title, sub) in enumerate(panels):
        ref = sub.groupby("run")["acc_before"].first()
        for c, variant in enumerate(variants):
            ax = axes[r, c]
            cell = sub[sub["variant"] == variant]
            for k, value in enumerate(hues):
                pts = cell[cell[hue] == value]
                if pts.empty:
                    continue
                stats = (
                    pts.groupby("target")
                    .agg(
                        x=("sparsity", "mean"),
                        xstd=("sparsity", "std"),
                        mean=("acc", "mean"),
                        std=("acc", "std"),
                        count=("acc", "count"),
                    )
                    .reset_index()
                    .sort_values("x")
                )
                stats["x"] *= 100
                color = "black" if value == "sleeping" else _color(k)
                if len(stats) == 1:
                    line = ax.errorbar(
                        stats["x"],
                        stats["mean"],
                        yerr=stats["std"].fillna(0),
                        xerr=100 * stats["xstd"].fillna(0),
                        marker="*",
                        markersize=13,
                        color=color,
                        linestyle="none",
                        capsize=3,
                    )
                else:
                    line = _band(ax, stats, "x", color=color, **_style(k))
                handles.setdefault(str(value), line)
            if len(ref):
                mean, std = float(ref.mean()), float(ref.std()) if len(ref) > 1 else 0.0
                ax.axhline(mean, color="grey", linestyle="--", linewidth=1.2, gid="unpruned")
                if std > 0:
                    ax.axhspan(
                        mean - std,
                        mean + std,
                        color="grey",
                        alpha=0.15,
                        linewidth=0,
                        gid="unpruned",
                    )
                handles.setdefault("unpruned", plt.Line2D([], [], color="grey", linestyle="--"))
            if chance is not None:
                ax.axhline(chance, color="grey", linestyle=":", linewidth=1, gid="chance")
                handles.setdefault(
                    f"chance ({chance:g})", plt.Line2D([], [], color="grey", linestyle=":")
                )
            _log_axis(ax, "x")
            ax.set_title(f"{variant}" + (f"\n{title}" if title else ""), fontsize=9)
            ax.set_xlabel("pruned weights, % of prunable (log scale)")
            ax.set_ylabel("test accuracy (fraction correct)")
            ax.set_ylim(0, 1.02)
            ax.grid(alpha=0.3, which="both")
    _legend(fig, handles, hue)
    return fig


def _edges(bins: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Contiguous stair edges and values for bins ``[low, high)`` (gaps filled with 0)."""
    edges: list[float] = []
    values: list[float] = []
    for lo, hi, v in bins[["low", "high", "share"]].itertuples(index=False):
        if edges and lo > edges[-1]:
            values.append(0.0)
            edges.append(lo)
        if not edges:
            edges.append(lo)
        values.append(v)
        edges.append(hi)
    return np.asarray(edges), np.asarray(values)


def histograms(
    hist: pd.DataFrame,
    epochs: Sequence[int] | None = None,
    params: Sequence[str] | None = None,
) -> Figure:
    """Histograms per tensor at chosen epochs: ``|w - w0|`` (log bins) and, where the runs
    wrote them, the weights. One row of subplots per tensor, one column per kind, one step
    line per epoch. Counts are pooled over the runs in ``hist`` (pass one run's rows, or one
    scheme's seeds) and shown as a percentage of the tensor's entries; the share exactly 0
    (never moved), which a log axis cannot show, is given in the legend.

    Args:
        hist: :class:`~cdi_experiments.run.runs.Runs`' ``histograms`` frame.
        epochs: The epochs to draw (default: the first, middle and last trained epoch, and the
            initial weights where there are weight histograms).
        params: The tensors (default: the weight tensors, else every tensor but ``all``).

    Raises:
        ValueError: a column the frame does not have, or nothing left to draw.
    """
    _check_columns(hist, ["kind", "epoch", "param", "low", "high", "count"], "histograms")
    trained = sorted(int(e) for e in hist["epoch"].unique() if e > INIT_EPOCH)
    if epochs is None:
        epochs = sorted({trained[0], trained[len(trained) // 2], trained[-1]}) if trained else []
        weights_at_init = (hist["kind"] == "weight") & (hist["epoch"] == INIT_EPOCH)
        if weights_at_init.any():  # the initial weights' distribution, beside the trained ones
            epochs = [INIT_EPOCH, *epochs]
    if params is None:
        params = [p for p in _ordered(hist["param"]) if p != "all"]
        weights = [p for p in params if str(p).endswith("weight")]
        params = weights or params  # the weight matrices: where the parameters are
    rows = hist[hist["epoch"].isin(epochs) & hist["param"].isin(params)]
    if rows.empty:
        raise ValueError(f"histograms: no rows at epochs {list(epochs)} for {params}")
    kinds = [k for k in ("weight", "abs_delta") if k in set(rows["kind"])]
    pooled = rows.groupby(["kind", "param", "epoch", "low", "high"], as_index=False)["count"].sum()
    pooled["share"] = (
        100 * pooled["count"] / pooled.groupby(["kind", "param", "epoch"])["count"].transform("sum")
    )
    n = rows["run"].nunique() if "run" in rows else 1
    cells = [(param, kind) for param in params for kind in kinds]
    nrows, ncols = (len(params), len(kinds)) if len(kinds) > 1 else _wrap(len(cells))
    fig, axes = _grid(
        nrows,
        ncols,
        f"Histograms per tensor at epochs {', '.join(map(epoch_label, epochs))}"
        f" ({'pooled over ' + str(n) + ' runs' if n > 1 else '1 run'})",
    )
    plt = _plt()
    handles: dict[str, Any] = {}
    for ax, (param, kind) in zip(axes.flat, cells, strict=False):
        zeros = []
        for k, epoch in enumerate(epochs):
            bins = pooled[
                (pooled["kind"] == kind) & (pooled["param"] == param) & (pooled["epoch"] == epoch)
            ].sort_values("low")
            if bins.empty:
                continue
            color = _color(k)
            if kind == "abs_delta":
                exact = bins[bins["high"] <= 0]
                zeros.append(f"epoch {epoch_label(epoch)}: {exact['share'].sum():.3g} %")
                bins = bins[bins["high"] > 0]
            if kind == "weight":
                # TensorBoard's buckets narrow towards 0 (exponential widths), so per-bucket
                # shares dip there and densities spike: put them on WEIGHT_BINS equal bins.
                cell = pooled[(pooled["kind"] == kind) & (pooled["param"] == param)]
                e = np.linspace(cell["low"].min(), cell["high"].max(), WEIGHT_BINS + 1)
                # entries spread evenly within a bucket: the cumulative share is piecewise
                # linear between bucket edges; each equal bin gets its increase
                lows, highs = bins["low"].to_numpy(), bins["high"].to_numpy()
                cum = np.cumsum(bins["share"].to_numpy())
                xs = np.column_stack([lows, highs]).ravel()
                ys = np.column_stack([cum - bins["share"].to_numpy(), cum]).ravel()
                v = np.diff(np.interp(e, xs, ys))
                ax.stairs(v, e, color=color, linewidth=1.4, baseline=None)
            elif len(bins):
                e, v = _edges(bins)
                ax.stairs(v, e, color=color, linewidth=1.4, baseline=None)
            handles.setdefault(f"epoch {epoch_label(epoch)}", plt.Line2D([], [], color=color, lw=2))
        if kind == "abs_delta":
            _log_axis(ax, "x")
            ax.set_xlabel("|w - w0| (weight units, log scale)")
            ax.text(
                0.01,
                0.98,
                "exactly 0 (not on the axis):\n" + "\n".join(zeros),
                transform=ax.transAxes,
                va="top",
                fontsize=7,
            )
            _log_axis(ax, "y")
            ax.set_ylabel("% of entries per bin (log scale)")
        else:
            ax.set_xlabel("w (weight units)")
            ax.set_ylabel(f"% of entries per bin ({WEIGHT_BINS} equal bins)")
        ax.set_title(f"{param}: {'|w - w0|' if kind == 'abs_delta' else 'weights'}", fontsize=9)
        ax.grid(alpha=0.3, which="both")
    _hide_unused(axes, len(cells))
    _legend(fig, handles, "epoch")
    return fig


def signal_propagation(
    sp: pd.DataFrame,
    hue: str = "scheme",
    panel: str | Sequence[str] | None = "activation",
    values: Sequence[str] = ("act_std", "grad_std"),
) -> Figure:
    """Activation and gradient std per layer at initialisation, one line per ``hue`` (init
    scheme), one column per ``panel`` value (activation); log y: vanishing and exploding
    signals are decades apart.

    Args:
        sp: One row per scheme x activation x layer x seed
            (:func:`cdi_experiments.modules.signal.signal_frame`, ``signal_propagation.csv``).
        hue: The column whose values get a line each.
        panel: The column(s) whose values get a column of subplots each.
        values: The std columns to draw, a row of subplots each (those the frame has).

    Raises:
        ValueError: a column the frame does not have.
    """
    values = [v for v in values if v in sp.columns]
    _check_columns(sp, ["layer", hue, *_keys(panel)], "signal_propagation")
    if not values:
        raise ValueError("signal_propagation: the frame has none of the columns act_std, grad_std")
    panels = _panels(sp, panel)
    n = sp["seed"].nunique() if "seed" in sp else 1
    fig, axes = _grid(
        len(values),
        len(panels),
        f"Signal propagation at initialisation ({'mean ± std over ' + str(n) + ' seeds' if n > 1 else '1 seed'})",
    )
    handles: dict[str, Any] = {}
    hues = _ordered(sp[hue], first="")
    names = {
        "act_std": "activation std",
        "preact_std": "pre-activation std",
        "grad_std": "gradient std (dL/dz)",
        "weight_grad_std": "weight gradient std (dL/dW)",
    }
    for r, value in enumerate(values):
        for c, (title, sub) in enumerate(panels):
            ax = axes[r, c]
            flat = []
            for k, h in enumerate(hues):
                rows = sub[(sub[hue] == h) & np.isfinite(sub[value])]
                stats = _mean_std(rows, "layer", value)
                line = _band(ax, stats, "layer", log_y=True, color=_color(k), **_style(k))
                if line is not None:
                    handles.setdefault(str(h), line)
                elif (sub[hue] == h).any():
                    flat.append(str(h))
            _log_axis(ax, "y")
            name = names.get(value, value)
            ax.set_title(name + (f", {title}" if title else ""), fontsize=9)
            note = f"\n0 or not finite, not drawn: {', '.join(flat)}" if flat else ""
            ax.set_xlabel("layer (depth)" + note)
            ax.set_ylabel(f"{name} (log scale)")
            ax.grid(alpha=0.3, which="both")
    _legend(fig, handles, hue)
    return fig


# ----------------------------------------------------------------------------- sets of figures


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=+-]+", "_", label).strip("_")


def _draw(name: str, make, stem: Path, formats: Sequence[str]) -> list[Path]:
    """``make()``'s figure saved as ``stem``; a frame it cannot draw is logged and skipped."""
    try:
        fig = make()
    except ValueError as exc:
        log.info("figure %s not drawn: %s", name, exc)
        return []
    return save_figure(fig, stem, formats)


def _too_many(name: str, frame: pd.DataFrame, keys: Sequence[str], per_panel: int = 1) -> bool:
    """Whether ``frame`` would need more than :data:`MAX_PANELS` subplots over ``keys`` (the
    figure is then left out, with a warning saying how to draw subsets)."""
    n = len(frame[list(keys)].drop_duplicates()) * per_panel
    if n > MAX_PANELS:
        log.warning(
            "figure %s not drawn: %d subplots (more than %d); draw subsets with "
            "cdi_experiments.run.figures.%s(frame[...], panel=[...])",
            name,
            n,
            MAX_PANELS,
            name,
        )
        return True
    return False


def report_figures(runs: Any, out: Path, threshold: float = 1e-5) -> list[Path]:
    """``cdi-report``'s figures of :class:`~cdi_experiments.run.runs.Runs`, as PNG and PDF
    under ``out``: learning curves, sleeping share, mean ``|w - w0|`` and prune accuracy with
    one subplot per combination of the swept config values, and ``|w - w0|`` histograms per
    group of runs that differ only in their seed (``histograms/``).

    Returns:
        The files written (a figure that would need more than :data:`MAX_PANELS` subplots is
        left out, with a warning).
    """
    out = Path(out)
    # One subplot (or histogram figure) per combination of the swept values; the dataset and
    # the init scheme are named by their short columns (data, init).
    swept = [v for v in runs.varying() if not v.startswith("init.") and v != "data.name"]
    groups = ["data", "init", *swept]
    formats = ("png", "pdf")
    written: list[Path] = []
    if len(runs.epochs) and not _too_many("learning_curves", runs.epochs, ["data", *swept]):
        written += _draw(
            "learning_curves",
            lambda: learning_curves(runs.epochs, hue="init", panel=["data", *swept]),
            out / "learning_curves",
            formats,
        )
    if len(runs.layers) and not _too_many("sleeping_share", runs.layers, groups):
        written += _draw(
            "sleeping_share",
            lambda: sleeping_share(runs.layers, threshold, panel=groups),
            out / "sleeping_share",
            formats,
        )
        written += _draw(
            "mean_delta", lambda: mean_delta(runs.layers, panel=groups), out / "mean_delta", formats
        )
    prune = runs.prune
    if len(prune):
        prune = prune[prune["source"] == "train"]
    if len(prune) and not _too_many("prune_accuracy", prune, groups, prune["variant"].nunique()):
        written += _draw(
            "prune_accuracy",
            lambda: prune_accuracy(prune, panel=groups),
            out / "prune_accuracy",
            formats,
        )
    if len(runs.histograms):
        for values, rows in runs.histograms.groupby(groups, dropna=False, sort=True):
            values = values if isinstance(values, tuple) else (values,)
            name = _slug("_".join(map(str, values)))
            written += _draw(
                f"histograms/{name}",
                lambda rows=rows: histograms(rows),
                out / "histograms" / name,
                formats,
            )
    return written


def run_figures(runs: Any, out: Path, threshold: float = 1e-5) -> list[Path]:
    """One run's figures, as PNGs under ``out`` (``cdi-train`` draws them into the run's
    ``figures/``): ``awake_per_epoch`` (the sleeping share per tensor, log axis),
    ``mean_delta_layers``, ``learning_curves``, ``prune_accuracy`` and ``delta_histograms``.

    Returns:
        The files written.
    """
    out = Path(out)
    formats = ("png",)
    written: list[Path] = []
    if len(runs.layers):
        written += _draw(
            "awake_per_epoch",
            lambda: sleeping_share(runs.layers, threshold),
            out / "awake_per_epoch",
            formats,
        )
        written += _draw(
            "mean_delta_layers", lambda: mean_delta(runs.layers), out / "mean_delta_layers", formats
        )
    if len(runs.epochs):
        written += _draw(
            "learning_curves",
            lambda: learning_curves(runs.epochs, panel=None),
            out / "learning_curves",
            formats,
        )
    if len(runs.prune):
        written += _draw(
            "prune_accuracy", lambda: prune_accuracy(runs.prune), out / "prune_accuracy", formats
        )
    if len(runs.histograms):
        written += _draw(
            "delta_histograms",
            lambda: histograms(runs.histograms),
            out / "delta_histograms",
            formats,
        )
    return written


__all__ = [
    "histograms",
    "learning_curves",
    "mean_delta",
    "nearest_threshold",
    "prune_accuracy",
    "report_figures",
    "run_figures",
    "save_figure",
    "signal_propagation",
    "sleeping_share",
]
