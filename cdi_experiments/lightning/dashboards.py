"""What a run shows on W&B and TensorBoard: a few summary charts, not one chart per key.

The callback logs every per-layer figure through ``pl_module.log`` (every logger gets it, and
``metrics.csv`` keeps it). On a dashboard that is one chart per key (14 per tracked tensor),
so this module adds:

* :class:`WandbLogger`: Lightning's, with each per-layer scalar (``awake/<layer>@<t>``,
  ``delta_*/<layer>``) hidden from W&B's automatic charts (``define_metric(hidden=True)``: the
  values stay in the run's history); the totals (``.../all``) keep their charts;
* :func:`log_epoch`: at each analysed epoch, the per-layer awake shares as one W&B table
  (``tables/awake_per_layer``: epoch, layer, threshold, awake %) and one line chart
  (``charts/awake_per_layer``), built from the callback's whole history so a resumed run's
  chart holds every epoch; weight and ``|w - w0|`` histograms on W&B and TensorBoard;
* :class:`TensorBoardLogger`: Lightning's, with the run's composed config (the init scheme
  included) as hparams and a validation metric as ``hp_metric``;
* :func:`log_prune_results`: the prune table as a W&B table and as TensorBoard text (Markdown);
* :func:`wandb_group`, :func:`wandb_tags`, :func:`wandb_name`: what a W&B run is filed under.

W&B is imported only where a W&B logger is in use.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from pytorch_lightning import loggers as pl_loggers
from pytorch_lightning.utilities import rank_zero_only

from cdi_experiments.generator.core import DEFAULT_CHUNK_ELEMS
from cdi_experiments.modules import DELTA_EDGES, DeltaStats, canonical_named_parameters
from cdi_experiments.modules.sharding import local_part

# The per-group keys the callback logs: awake/<g>@<t>, delta_mean/<g>, delta_q50/<g>...
_PER_GROUP = re.compile(r"(awake/(?P<a>.+)@[^@/]+|delta_[a-z0-9]+/(?P<d>.+))")
AWAKE_TABLE = "tables/awake_per_layer"
AWAKE_CHART = "charts/awake_per_layer"
PRUNE_TABLE = "prune/results"
CHART_THRESHOLD = 1e-5  # the sources' "sleeping" threshold, charted when it is tracked
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")


def per_layer_key(key: str) -> bool:
    """Whether ``key`` is one layer's (or one layer type's) figure, not the run's total.

    >>> per_layer_key("awake/fc1.weight@1e-05"), per_layer_key("awake/all@1e-05")
    (True, False)
    >>> per_layer_key("delta_q50/Linear.weight"), per_layer_key("val/acc")
    (True, False)
    """
    m = _PER_GROUP.fullmatch(key)
    return m is not None and (m.group("a") or m.group("d")) != "all"


# ----------------------------------------------------------------------------- loggers


class WandbLogger(pl_loggers.WandbLogger):
    """Lightning's :class:`~pytorch_lightning.loggers.WandbLogger` (same arguments), with every
    per-layer scalar (:func:`per_layer_key`) hidden from W&B's automatic charts.

    The values are still logged (the run's history and any custom panel have them); the
    per-layer view is :data:`AWAKE_CHART` and :data:`AWAKE_TABLE` (:func:`log_epoch`). Use
    ``pytorch_lightning.loggers.WandbLogger`` as ``logger.wandb._target_`` for a chart per key.
    """

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        # No __init__ of its own, so the config's keys are checked against Lightning's (the
        # schema follows the base class): the set of hidden keys is made on first use.
        hidden = self.__dict__.setdefault("_hidden_keys", set())
        new = [k for k in metrics if k not in hidden and per_layer_key(k)]
        for key in new:  # once per key and process (a resumed run defines them again)
            # an explicit definition replaces Lightning's "*" one: keep its x-axis
            self.experiment.define_metric(
                key, step_metric="trainer/global_step", step_sync=True, hidden=True
            )
        hidden.update(new)
        super().log_metrics(metrics, step)


def hparams_of(run_config: Mapping[str, Any]) -> dict[str, Any]:
    """The composed config as TensorBoard hparams: every group but the loggers and callbacks
    (Lightning flattens the nesting to ``init/scheme``, ``optimizer/lr``...)."""
    return {k: v for k, v in run_config.items() if k not in ("logger", "callbacks")}


class TensorBoardLogger(pl_loggers.TensorBoardLogger):
    """Lightning's :class:`~pytorch_lightning.loggers.TensorBoardLogger`, whose hparams are the
    run's composed config and whose ``hp_metric`` is a validation metric.

    Args:
        save_dir, name, version, log_graph, default_hp_metric, prefix, sub_dir: as Lightning's
            (``default_hp_metric`` applies only with ``hp_metric=None``).
        hp_metric: the logged metric TensorBoard's HParams tab shows as ``hp_metric``
            (``val/acc``: each epoch's validation accuracy, the step its own). The hparams
            session is written when its first value arrives, so no placeholder ``-1`` is
            logged. ``None``: Lightning's behaviour.
        run_config: the composed config (``cdi-train`` passes it); its groups but the loggers
            and callbacks are the hparams, so the init scheme (``init/scheme``), seed, model,
            data and optimizer can be compared across runs. ``None``: the LightningModule's
            hyperparameters, as Lightning logs them.
        **kwargs: passed to Lightning's logger (and its ``SummaryWriter``).
    """

    def __init__(
        self,
        save_dir: str | Path,
        name: str | None = "lightning_logs",
        version: int | str | None = None,
        log_graph: bool = False,
        default_hp_metric: bool = True,
        prefix: str = "",
        sub_dir: str | Path | None = None,
        hp_metric: str | None = "val/acc",
        run_config: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            save_dir,
            name=name,
            version=version,
            log_graph=log_graph,
            default_hp_metric=default_hp_metric and hp_metric is None,
            prefix=prefix,
            sub_dir=sub_dir,
            **kwargs,
        )
        self.hp_metric = hp_metric
        self.run_config = dict(run_config) if run_config is not None else None
        self._pending: dict[str, Any] | None = None

    @rank_zero_only
    def log_hyperparams(
        self, params: Any, metrics: dict[str, Any] | None = None, step: int | None = None
    ) -> None:
        if self.run_config is not None:
            params = hparams_of(self.run_config)
        if self.hp_metric is None or metrics is not None:
            super().log_hyperparams(params, metrics, step)
            return
        super().log_hyperparams(params, None, step)  # hparams.yaml now; the session below
        self._pending = params

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        value = metrics.get(self.hp_metric) if self.hp_metric else None
        if value is None:
            super().log_metrics(metrics, step)
            return
        value = float(value.item() if isinstance(value, torch.Tensor) else value)
        super().log_metrics(metrics, step)
        if self._pending is not None:  # the hparams session, with its metric's first value
            params, self._pending = self._pending, None
            super().log_hyperparams(params, {"hp_metric": value}, step)
        else:
            super().log_metrics({"hp_metric": value}, step)


# ----------------------------------------------------------------------------- W&B run fields


def wandb_group(experiment: str | None, sweep_dir: str | Path | None) -> str | None:
    """The W&B group of a run: its sweep (a multirun's directory) within its experiment.

    Hydra's default sweep directory ``outputs/multirun/<date>/<time>`` gives ``<date>/<time>``.

    >>> wandb_group("mnist_demo", None), wandb_group(None, "outputs/multirun/2026-12-02/07-01-02")
    ('mnist_demo', '2026-12-02/07-01-02')
    >>> wandb_group("mnist_demo", "outputs/paper/seeds")
    'mnist_demo/seeds'
    """
    sweep = None
    if sweep_dir is not None:
        path = Path(sweep_dir)
        sweep = (
            f"{path.parent.name}/{path.name}" if _DATE.fullmatch(path.parent.name) else path.name
        )
    if experiment and sweep and sweep != experiment:
        return f"{experiment}/{sweep}"
    return experiment or sweep or None


def wandb_tags(
    labels: Mapping[str, Any], user: Sequence[str] | None = None, max_len: int = 64
) -> list[str]:
    """``user`` tags, then ``key:value`` for each label that is set (W&B allows 64 characters).

    >>> wandb_tags({"model": "mlp", "init": "he", "experiment": None}, ["paper"])
    ['paper', 'model:mlp', 'init:he']
    """
    tags = [str(t) for t in (user or [])]
    tags += [f"{k}:{v}" for k, v in labels.items() if v not in (None, "")]
    return list(dict.fromkeys(t[:max_len] for t in tags))


def wandb_name(run_name: str, override_dirname: str | None) -> str:
    """A sweep job's W&B name: the run name and the job's overrides (its swept values).

    >>> wandb_name("mlp-mnist-he-s0", "init=he,optimizer.lr=0.01")
    'mlp-mnist-he-s0:init=he,optimizer.lr=0.01'
    >>> wandb_name("mlp-mnist-he-s0", "")
    'mlp-mnist-he-s0'
    """
    return f"{run_name}:{override_dirname}" if override_dirname else run_name


# ----------------------------------------------------------------------------- per epoch


def awake_long(history: Iterable[Mapping[str, Any]], groups: Mapping[str, str]) -> pd.DataFrame:
    """The callback's history rows (one per epoch and parameter, ``awake_pct@<t>`` columns) as
    one row per epoch, logged group and threshold: ``epoch, layer, threshold, awake_pct``.

    A group of several tensors (``log_per="type"``) gets their exact pooled share (weighted by
    ``numel``); ``all`` is the history's own total row.
    """
    rows = pd.DataFrame(list(history))
    if rows.empty:
        return pd.DataFrame(columns=["epoch", "layer", "threshold", "awake_pct"])
    cols = [c for c in rows.columns if c.startswith("awake_pct@")]
    rows = rows[rows["name"].isin([*groups, "all"])].copy()
    rows["layer"] = rows["name"].map(lambda n: "all" if n == "all" else groups[n])
    rows = rows[(rows["layer"] != "all") | (rows["name"] == "all")]  # log_per="total"
    long = rows.melt(
        id_vars=["epoch", "layer", "numel"], value_vars=cols, var_name="t", value_name="pct"
    )
    long["threshold"] = long["t"].str.removeprefix("awake_pct@").astype(float)
    long["moved"] = long["pct"] * long["numel"]
    grouped = long.groupby(["epoch", "layer", "threshold"], sort=True)
    out = grouped[["moved", "numel"]].sum()
    # one tensor: its own figure, bit for bit; several: the pooled share
    out["awake_pct"] = (out["moved"] / out["numel"]).where(
        grouped.size() > 1, grouped["pct"].first()
    )
    out = out.reset_index()[["epoch", "layer", "threshold", "awake_pct"]]
    # the total last, the layers in the model's order
    order = {g: i for i, g in enumerate(dict.fromkeys([*groups.values(), "all"]))}
    out["_o"] = out["layer"].map(order)
    out = out.sort_values(["epoch", "threshold", "_o"], kind="stable").drop(columns="_o")
    return out.reset_index(drop=True)


def chart_threshold(thresholds: Sequence[float]) -> float:
    """The threshold charted per layer: 1e-5 if tracked, else the smallest positive one."""
    if CHART_THRESHOLD in thresholds:
        return CHART_THRESHOLD
    positive = [t for t in thresholds if t > 0]
    return min(positive) if positive else min(thresholds)


WEIGHT_BINS = 64
"""Bins of the weight histograms (W&B's own default)."""


class _Hist:
    """A histogram on fixed edges, with the raw moments TensorBoard shows (min, max, count,
    sum, sum of squares)."""

    def __init__(self, counts: np.ndarray, edges: np.ndarray, lo: float, hi: float, moments):
        self.counts, self.edges, self.min, self.max = counts, edges, lo, hi
        self.num, self.sum, self.sum_squares = moments


def _flat_chunks(t: torch.Tensor, chunk_elems: int) -> Iterable[np.ndarray]:
    """The finite values of ``t`` as float64 numpy chunks of at most ``chunk_elems``."""
    flat = t.detach().reshape(-1)
    for a in range(0, flat.numel(), chunk_elems):
        c = flat[a : a + chunk_elems].cpu().double().numpy()
        yield c[np.isfinite(c)]


def _weight_histograms(
    module: torch.nn.Module, groups: Mapping[str, str], chunk_elems: int
) -> dict[str, _Hist]:
    """Per logged group, the histogram of its weights' finite values (of a sharded parameter,
    this rank's shard), in two passes over bounded chunks: the range, then the counts."""
    params = dict(canonical_named_parameters(module))
    members: dict[str, list[torch.Tensor]] = {}
    for name, group in groups.items():
        members.setdefault(group, []).append(local_part(params[name]))
    out = {}
    for group, tensors in members.items():
        lo, hi, num, total, squares = math.inf, -math.inf, 0, 0.0, 0.0
        for t in tensors:
            for c in _flat_chunks(t, chunk_elems):
                if c.size:
                    lo, hi = min(lo, float(c.min())), max(hi, float(c.max()))
                    num, total, squares = num + c.size, total + c.sum(), squares + (c * c).sum()
        if num == 0:
            lo = hi = 0.0
        edges = np.linspace(lo, hi if hi > lo else lo + 1.0, WEIGHT_BINS + 1)
        counts = np.zeros(WEIGHT_BINS, np.int64)
        for t in tensors:
            for c in _flat_chunks(t, chunk_elems):
                counts += np.histogram(c, bins=edges)[0]
        out[group] = _Hist(counts, edges, lo, hi, (num, float(total), float(squares)))
    return out


def _delta_histogram(st: DeltaStats) -> _Hist | None:
    """``log10 |w - w0|`` of the weights that moved, from the analysis' exact bins (no second
    pass over the weights): DELTA_EDGES' log-spaced bins, its outer bins ([0, 1e-10) and
    [10, inf]) drawn one step beyond them. None when nothing moved."""
    if not st.hist.any():
        return None
    inner = np.log10(DELTA_EDGES[1:-1])
    step = inner[1] - inner[0]
    edges = np.concatenate([[inner[0] - step], inner, [inner[-1] + step]])
    centres = (edges[:-1] + edges[1:]) / 2
    nz = np.flatnonzero(st.hist)
    moments = (
        int(st.hist.sum()),
        float((st.hist * centres).sum()),
        float((st.hist * centres**2).sum()),
    )
    return _Hist(st.hist.copy(), edges, float(edges[nz[0]]), float(edges[nz[-1] + 1]), moments)


def _tb_histogram(writer: Any, tag: str, h: _Hist, step: int) -> None:
    writer.add_histogram_raw(
        tag,
        min=h.min,
        max=h.max,
        num=h.num,
        sum=h.sum,
        sum_squares=h.sum_squares,
        bucket_limits=h.edges[1:].tolist(),
        bucket_counts=h.counts.tolist(),
        global_step=step,
    )


def log_epoch(
    loggers: Iterable[Any],
    module: torch.nn.Module,
    groups: Mapping[str, str],
    history: Sequence[Mapping[str, Any]],
    epoch: int,
    stats: Mapping[str, DeltaStats] | None = None,
    chunk_elems: int = DEFAULT_CHUNK_ELEMS,
) -> None:
    """The epoch's dashboards, for each W&B and TensorBoard logger among ``loggers``.

    W&B, once an epoch is trained: :data:`AWAKE_TABLE` (every epoch so far, the initial
    weights' epoch -1 included) and :data:`AWAKE_CHART` (the awake share per layer at
    :func:`chart_threshold`, per trained epoch); with ``stats``, ``weights/<g>`` and
    ``abs_delta_log10/<g>`` (``log10 |w - w0|`` of the entries that moved) at W&B's ``epoch``
    ``max(epoch, 0)``.
    TensorBoard: with ``stats``, ``weights/<g>`` and ``abs_delta_log10/<g>`` histograms at step
    ``epoch + 1`` (epochs trained: 0 is the initial weights).

    Memory stays bounded by ``chunk_elems``: the ``|w - w0|`` histograms are the analysis'
    own exact bins (``stats``: whole tensors, all ranks), and the weight histograms are
    counted chunk by chunk (of a sharded parameter, the logging rank's shard). Non-finite
    weights are left out; an infinite delta counts in the top bin.

    Args:
        loggers: the trainer's loggers (others are skipped).
        module: the tracked network.
        groups: tracked parameter name -> logged group (the callback's ``groups()``).
        history: the callback's history rows (every analysed epoch so far).
        epoch: the epoch just analysed (-1: the initial weights).
        stats: the epoch's analysis per logged group (the callback's ``logged_stats``), or
            None to log no histograms.
        chunk_elems: elements read at once for the weight histograms.
    """
    wandb_loggers = [lg for lg in loggers if isinstance(lg, pl_loggers.WandbLogger)]
    tb_loggers = [lg for lg in loggers if isinstance(lg, pl_loggers.TensorBoardLogger)]
    if not (wandb_loggers or tb_loggers):
        return
    hists: dict[str, _Hist] = {}
    if stats is not None:
        for group, h in _weight_histograms(module, groups, chunk_elems).items():
            hists[f"weights/{group}"] = h
            moved = _delta_histogram(stats[group])
            if moved is not None:  # nothing has moved at init: no histogram to draw
                hists[f"abs_delta_log10/{group}"] = moved
    for lg in tb_loggers:
        for tag, h in hists.items():
            _tb_histogram(lg.experiment, tag, h, epoch + 1)
    if not wandb_loggers:
        return
    import wandb  # lazy: only W&B runs pay its import

    payload: dict[str, Any] = {
        tag: wandb.Histogram(np_histogram=(h.counts, h.edges)) for tag, h in hists.items()
    }
    long = awake_long(history, groups)
    if not long.empty and (long["epoch"] >= 0).any():
        payload[AWAKE_TABLE] = wandb.Table(
            columns=list(long.columns),
            data=[[int(e), str(g), float(t), float(p)] for e, g, t, p in long.to_numpy()],
        )
        # the thresholds as the history's columns name them (6 significant digits)
        t = chart_threshold(sorted(long["threshold"].unique()))
        # trained epochs only: the initial weights' 0 % would stretch the axis from 0 to 100
        # and flatten the curves (99.2 % vs 99.9 % is what the chart is for)
        trained = long[(long["threshold"] == t) & (long["epoch"] >= 0)]
        at = trained.pivot(index="epoch", columns="layer", values="awake_pct")
        layers = list(dict.fromkeys(long["layer"]))  # model order, all last
        payload[AWAKE_CHART] = wandb.plot.line_series(
            xs=[int(e) for e in at.index],
            ys=[at[g].astype(float).tolist() for g in layers],
            keys=layers,
            title=f"awake % per layer (|w - w0| > {t:g})",
            xname="epoch",
        )
    payload["epoch"] = max(epoch, 0)
    for lg in wandb_loggers:
        lg.experiment.log(payload, commit=False)


# ----------------------------------------------------------------------------- prune table


def markdown_table(df: pd.DataFrame, digits: int = 6) -> str:
    """``df`` as a GitHub Markdown table (TensorBoard's text tab renders it)."""

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return "nan" if math.isnan(v) else f"{v:.{digits}g}"
        return str(v).replace("|", "\\|")

    head = "| " + " | ".join(map(cell, df.columns)) + " |"
    rule = "|" + "|".join("---" for _ in df.columns) + "|"
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([head, rule, *body])


def log_prune_results(loggers: Iterable[Any], df: pd.DataFrame) -> None:
    """The prune table: a W&B table (``prune/results``) with each criterion's accuracy in the
    run summary (``prune/<criterion>/<target>/acc_after``), and TensorBoard text."""
    for lg in loggers:
        if isinstance(lg, pl_loggers.WandbLogger):
            lg.log_table(key=PRUNE_TABLE, dataframe=df)
            lg.experiment.summary.update(
                {f"prune/{r.criterion}/{r.target}/acc_after": r.acc_after for r in df.itertuples()}
            )
        elif isinstance(lg, pl_loggers.TensorBoardLogger):
            lg.experiment.add_text(PRUNE_TABLE, markdown_table(df), global_step=0)
            lg.experiment.flush()


__all__ = [
    "AWAKE_CHART",
    "AWAKE_TABLE",
    "PRUNE_TABLE",
    "TensorBoardLogger",
    "WandbLogger",
    "awake_long",
    "chart_threshold",
    "hparams_of",
    "log_epoch",
    "log_prune_results",
    "markdown_table",
    "per_layer_key",
    "wandb_group",
    "wandb_name",
    "wandb_tags",
]
