"""The Lightning callback at the centre of the design: deterministic init at setup, and at
every epoch end the share of weights that moved from their initial values.

In the default ``mode="generate"`` no copy of the initial weights is ever stored: each epoch
regenerates them in bounded chunks from (seed, canonical parameter name, coordinates). In
``mode="record"`` the model keeps its own init and the callback stores a copy of it. The
checkpoint state carries the init's identity and a fingerprint of the initial weights;
resuming a run under another identity is refused.
"""

from __future__ import annotations

import json
import logging
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities.model_helpers import is_overridden

from cdi_experiments.generator import bits as B
from cdi_experiments.generator import schemes
from cdi_experiments.generator.core import DEFAULT_CHUNK_ELEMS, check_threshold
from cdi_experiments.lightning.dashboards import log_epoch
from cdi_experiments.modules import (
    DEFAULT_QUANTILES,
    DEFAULT_THRESHOLDS,
    DELTA_EDGES,
    DeltaStats,
    Plan,
    delta_stats,
    init_module,
    plan_from_dict,
    record_module,
)
from cdi_experiments.modules.naming import parameter_kinds
from cdi_experiments.paths import RunPaths, atomic_write_csv

log = logging.getLogger(__name__)

MODES = ("generate", "record")
LOG_PER = ("auto", "parameter", "type", "total")
AUTO_PER_PARAMETER_MAX = 16
"""``log_per="auto"`` logs per parameter up to this many tracked tensors, else per type."""


class InitIdentityError(ValueError):
    """A checkpoint was made under another init identity (seed, scheme, version...).

    Attributes:
        diff: ``{field: (checkpoint value, this callback's value)}`` for each differing
            identity field (empty for a state with no identity), so an application can
            restate the message in its own terms (:func:`mismatch_message`).
    """

    def __init__(self, message: str, diff: Mapping[str, tuple[Any, Any]] | None = None) -> None:
        super().__init__(message)
        self.diff = dict(diff or {})


# identity fields a user sets through a constructor argument of the same name
_ARGUMENTS = (
    "mode",
    "seed",
    "scheme",
    "params",
    "overrides",
    "layer_ids",
    "biases",
    "zero_mean_conv",
)


def _override_value(value: Any) -> str:
    """A value as a command-line override writes it: ``he``, ``7``, ``{"std": 0.02}``."""
    return str(value) if isinstance(value, (str, int, float)) else json.dumps(value)


def mismatch_message(
    diff: Mapping[str, tuple[Any, Any]], names: Mapping[str, str] | None = None
) -> str:
    """One line: every differing identity field with both values, then how to fix it.

    Args:
        diff: ``{field: (checkpoint value, this run's value)}``, as :class:`InitIdentityError`
            carries it.
        names: how to call each field (e.g. an application's config keys,
            ``{"scheme": "init.scheme"}``); the fix then reads ``key=value``. Default: the
            callback's own arguments, and the fix reads ``DeterministicInitCallback(arg=...)``.
    """
    label = (lambda k: names.get(k, k)) if names is not None else (lambda k: k)
    settable = [k for k in diff if k in (names if names is not None else _ARGUMENTS)]
    values = "; ".join(
        f"{label(k)}: checkpoint {a!r} vs this run {b!r}" for k, (a, b) in diff.items()
    )
    if "generator_version" in diff:
        fix = "install the cdi-experiments version that wrote the checkpoint"
    elif settable and names is not None:
        pairs = " ".join(f"{label(k)}={_override_value(diff[k][0])}" for k in settable)
        fix = f"rerun with the checkpoint's values ({pairs})"
    elif settable:
        args = ", ".join(f"{k}={diff[k][0]!r}" for k in settable)
        fix = f"pass the checkpoint's values, DeterministicInitCallback({args})"
    else:  # same arguments, other initial weights: the model's parameters or the generator changed
        fix = "rerun with the model and code that wrote the checkpoint"
    return (
        f"cannot resume: the checkpoint's initial weights were made differently ({values}). "
        f"To continue it, {fix}; to start over, use a new run directory or do not resume from "
        "this checkpoint"
    )


def _is_last_epoch(trainer: pl.Trainer, epoch: int) -> bool:
    """The run ends after this epoch: max_epochs reached, max_steps reached or a requested stop
    (early stopping sets ``should_stop`` before the epoch-end hooks run)."""
    if (
        trainer.max_epochs is not None
        and trainer.max_epochs >= 0
        and epoch + 1 >= trainer.max_epochs
    ):
        return True
    if trainer.max_steps is not None and 0 <= trainer.max_steps <= trainer.global_step:
        return True
    return bool(trainer.should_stop)


def _on_meta(module: torch.nn.Module) -> bool:
    """Whether any of the module's tensors is on the meta device (not allocated yet)."""
    tensors = (*module.parameters(), *module.buffers())
    return any(t.is_meta for t in tensors)


def tracked_module(pl_module: pl.LightningModule) -> torch.nn.Module:
    """The network inside a LightningModule (its ``model`` attribute if it has one)."""
    inner = getattr(pl_module, "model", None)
    return inner if isinstance(inner, torch.nn.Module) else pl_module


def threshold_key(t: float) -> str:
    """The threshold as it appears in metric keys: ``1e-05`` in ``awake/fc1.weight@1e-05``."""
    return f"{t:g}"


def quantile_key(q: float) -> str:
    """``0.5 -> "q50"``, as in ``delta_q50/fc1.weight``."""
    return f"q{round(q * 100):02d}"


def _positive_int(key: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{key} must be an integer >= 1, got {value!r}")


def _plain(value: Any) -> Any:
    """Plain Python containers and scalars (numpy scalars and tuples would break a
    ``torch.load(..., weights_only=True)`` of the checkpoint, or the identity comparison)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


class DeterministicInitCallback(Callback):
    """Initialize deterministically at setup (or record the model's own init); log how much of
    each tensor moved from its initial value every ``every_n_epochs``.

    A drop-in for any LightningModule: it tracks ``pl_module.model`` if that is a module,
    else the LightningModule itself. Parameters are named canonically
    (:mod:`cdi_experiments.modules.naming`): under ``torch.compile``, DDP, FSDP1 or activation
    checkpointing a model gets the same layer ids, initial weights and metric keys as bare.

    Args:
        seed: generator seed (0 is a seed).
        scheme: init scheme name (``he``, ``xavier``, ``zeros``, ..., ``lsuv``).
        params: the scheme's parameters.
        overrides: per-layer schemes, e.g. ``{"fc1": "zeros"}``.
        layer_ids: ``"name"`` (stable, from canonical parameter names) or ``"index"``.
        biases: initialize (``mode="record"``: record) biases too.
        zero_mean_conv: shift each conv filter to zero mean.
        thresholds: ``|w - w0|`` thresholds; 0 means "exactly unchanged".
        track_biases: also track biases and norm parameters.
        every_n_epochs: analysis cadence (the last epoch is always analysed).
        quantiles: quantiles of ``|w - w0|`` logged per logged group.
        histograms: keep per-epoch ``|w - w0|`` histogram counts (CSV, and W&B histograms).
        lsuv_batch_size: images from the datamodule's ``sample_batch`` for LSUV.
        chunk_elems: elements regenerated at once (peak extra memory ~40 bytes each).
        out_dir: run directory for ``layer_changes.csv`` and ``delta_histograms.csv`` (None:
            don't write).
        mode: ``"generate"`` (replace the weights with the deterministic init; nothing stored,
            ``w0`` is regenerated each epoch) or ``"record"`` (keep the model's own initial
            weights; ``seed``, ``scheme``, ``params``, ``overrides``, ``layer_ids``,
            ``zero_mean_conv`` and ``lsuv_batch_size`` are then unused). A foreign init cannot
            be regenerated, so record mode stores a CPU copy of every tracked tensor's initial
            value, in its own dtype (a :class:`~cdi_experiments.modules.RecordedPlan`), and
            writes the same copy into the checkpoint's callback state so a resume compares
            against the true ``w0``. Cost: memory equal to the size of the tracked parameters,
            and the checkpoint grows by as much. Everything downstream (metrics, histograms,
            fingerprint, ``analyze_module``, ``awakened_masks``, ``rewind``, pruning) works
            from the record.
        log_per: logging granularity of the metrics (the CSV files always keep one row per
            parameter): ``"parameter"``, ``"type"`` (per layer type and parameter kind, e.g.
            ``Conv2d.weight``, ``BatchNorm2d.bias``: exact counts, sums and max, merged
            histograms), ``"total"`` (``all`` only), or ``"auto"``: per parameter up to 16
            tracked tensors, else per type. Every mode also logs ``all``.

    Logged keys (``<g>`` is a parameter name, a type such as ``Linear.weight``, or ``all``), as
    float64, at the epoch's end (14 keys per group with the default 6 thresholds and 6
    quantiles; a resnet18 logs 84 per epoch with ``log_per="type"``):

    * ``awake/<g>@<t>``: percent of entries with ``|w - w0| > t`` (exact counts; NaN counts
      as moved);
    * ``delta_mean/<g>``, ``delta_max/<g>``: exact mean and max of ``|w - w0|``;
    * ``delta_qNN/<g>``: approximate quantiles from a histogram with fixed log-spaced edges
      (8 per decade, :data:`~cdi_experiments.modules.DELTA_EDGES`). The estimate lies in the
      same bin as the nearest-rank quantile (``np.quantile(d, q, method="inverted_cdf")``), so
      it is within a factor ``10**(1/8)`` (~1.33) of it for ``|w - w0|`` in ``[1e-10, 10]``;
      0 exactly when that order statistic is 0. It can differ more from numpy's default
      (linear interpolation between order statistics) on small tensors, where neighbouring
      order statistics lie bins apart. See :meth:`~cdi_experiments.modules.DeltaStats.quantile`.

    Epoch ``-1`` (the initial weights, all zeros) is written to ``layer_changes.csv`` but not
    logged. With ``histograms``, ``delta_histograms.csv`` holds per-epoch bin counts (one row
    per non-empty bin ``[low, high)``, plus ``low = high = 0`` for exact zeros), from which the
    awakened share at any other threshold can be read to bin resolution.

    Example:
        >>> cb = DeterministicInitCallback(seed=0, scheme="he")  # doctest: +SKIP
        >>> pl.Trainer(max_epochs=1, callbacks=[cb]).fit(MyModule(), loader)  # doctest: +SKIP

    Raises:
        ValueError: an unknown ``scheme``, ``layer_ids``, ``mode`` or ``log_per``, a negative
            or non-finite threshold, ``every_n_epochs < 1``, a quantile outside ``[0, 1]``;
            the message names the argument.
    """

    def __init__(
        self,
        seed: int = 0,
        scheme: str = "he",
        params: Mapping[str, Any] | None = None,
        overrides: Mapping[str, Any] | None = None,
        layer_ids: str = "name",
        biases: bool = True,
        zero_mean_conv: bool = False,
        thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
        track_biases: bool = True,
        every_n_epochs: int = 1,
        quantiles: Sequence[float] = DEFAULT_QUANTILES,
        histograms: bool = True,
        lsuv_batch_size: int = 256,
        chunk_elems: int = DEFAULT_CHUNK_ELEMS,
        out_dir: str | None = None,
        mode: str = "generate",
        log_per: str = "auto",
    ) -> None:
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be an integer >= 0 (0 is a seed), got {seed!r}")
        if mode not in MODES:
            raise ValueError(f"mode={mode!r} is not one of {MODES}")
        if log_per not in LOG_PER:
            raise ValueError(f"log_per={log_per!r} is not one of {LOG_PER}")
        if scheme != "lsuv":
            try:
                schemes.get(scheme)  # unknown names fail here, before any training
            except ValueError as exc:
                raise ValueError(f"scheme: {exc}") from None
        if layer_ids not in ("name", "index"):
            raise ValueError(f"layer_ids={layer_ids!r} is not one of ('name', 'index')")
        if isinstance(thresholds, (str, bytes)) or len(thresholds) == 0:
            raise ValueError(
                f"thresholds must list at least one number >= 0, e.g. [0, 1e-5]; got {thresholds!r}"
            )
        for t in thresholds:
            try:
                check_threshold(t)
            except ValueError:
                raise ValueError(
                    f"thresholds: {t!r} is not a finite number >= 0; use e.g. "
                    "[0, 1e-6, 1e-5] (0 = exactly unchanged)"
                ) from None
        _positive_int("every_n_epochs", every_n_epochs)
        _positive_int("lsuv_batch_size", lsuv_batch_size)
        _positive_int("chunk_elems", chunk_elems)
        for q in quantiles:
            if isinstance(q, bool) or not isinstance(q, numbers.Real) or not 0 <= q <= 1:
                raise ValueError(f"quantiles must be fractions in [0, 1] (0.5 = median), got {q!r}")
        self.seed = int(seed)
        self.scheme = scheme
        self.params = _plain(dict(params or {}))
        self.overrides = _plain(dict(overrides or {}))
        self.layer_ids = layer_ids
        self.biases = bool(biases)
        self.zero_mean_conv = bool(zero_mean_conv)
        self.thresholds = tuple(sorted({check_threshold(t) for t in thresholds}))
        self.track_biases = bool(track_biases)
        self.every_n_epochs = int(every_n_epochs)
        self.quantiles = tuple(float(q) for q in quantiles)
        self.histograms = bool(histograms)
        self.lsuv_batch_size = int(lsuv_batch_size)
        self.chunk_elems = int(chunk_elems)
        self.mode = mode
        self.log_per = log_per
        self.paths = RunPaths(out_dir) if out_dir else None
        self.plan: Plan | None = None
        self.fingerprint: str | None = None
        self.history: list[dict[str, Any]] = []  # per-epoch per-layer rows (also on disk)
        self._hist_rows: list[dict[str, Any]] = []
        self._kinds: dict[str, str] = {}  # parameter name -> "Conv2d.weight", for log_per
        self.extra_state: dict[str, Any] = {}  # e.g. the W&B run id, kept in checkpoints

    # ------------------------------------------------------------------ identity

    def identity(self) -> dict[str, Any]:
        """Everything that determines the initial weights (compared on resume)."""
        if self.mode == "record":  # the weights came from elsewhere: only the record says
            return {"mode": self.mode, "biases": self.biases, "fingerprint": self.fingerprint}
        return {
            "seed": self.seed,
            "scheme": self.scheme,
            "params": self.params,
            "overrides": self.overrides,
            "layer_ids": self.layer_ids,
            "biases": self.biases,
            "zero_mean_conv": self.zero_mean_conv,
            "generator_version": B.GENERATOR_VERSION,
            "fingerprint": self.fingerprint,
        }

    # ------------------------------------------------------------------ hooks

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.plan is not None:  # already initialized (a second fit/test on this trainer)
            return
        module = tracked_module(pl_module)
        unbuilt = next(module.parameters(), None) is None and is_overridden(
            "configure_model", pl_module
        )
        if _on_meta(module) or unbuilt:
            # built on the meta device (or not built yet), to be sharded in configure_model,
            # which runs after this hook: the LightningModule calls materialize() there; else
            # on_fit_start initializes
            log.info("model not built yet or on the meta device: init deferred to materialize()")
            return
        self._initialize(trainer, pl_module)

    def materialize(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Allocate a model built on the meta device and fill it with the deterministic init.

        For LightningModules that build (or shard) their model in ``configure_model``, as
        under Lightning's ``ModelParallelStrategy``: call this at the end of
        ``configure_model``, after ``fully_shard``. Each rank allocates only its own shards
        (``to_empty`` on the strategy's root device: uninitialized memory, no random draw) and
        fills them from the generator, from the shards' global coordinates, without
        communication: the gathered weights equal the single-process init bit for bit, at any
        world size. Lightning's own materialization (``to_empty`` + ``reset_parameters``, a
        random init drawn per rank) then finds no meta tensor and does nothing.
        :class:`~cdi_experiments.lightning.classifier.Classifier` calls it. If nothing calls
        it, :meth:`on_fit_start` initializes after Lightning's materialization instead (the
        same values; a random init was drawn first and is overwritten).
        """
        if self.plan is not None:
            return
        if self.mode == "record":
            raise ValueError(
                "mode='record' cannot record a model built on the meta device: it has no init "
                "of its own yet; use mode='generate', or build the model on a real device"
            )
        self._initialize(trainer, pl_module, device=trainer.strategy.root_device)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.plan is None:  # deferred in setup and materialize() was never called
            log.info("deterministic init after Lightning materialized the meta-device model")
            self._initialize(trainer, pl_module)

    def _initialize(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, device: Any = None
    ) -> None:
        module = tracked_module(pl_module)
        if self.mode == "record":
            self.plan = record_module(module, biases=self.biases)
        else:
            batch = None
            if self.scheme == "lsuv":
                dm = trainer.datamodule
                if dm is None or not hasattr(dm, "sample_batch"):
                    raise ValueError(
                        "scheme='lsuv' needs a datamodule with sample_batch(n) for its "
                        "fitting batch"
                    )
                batch = dm.sample_batch(self.lsuv_batch_size)
            self.plan = init_module(
                module,
                self.seed,
                self.scheme,
                params=self.params,
                overrides=self.overrides,
                layer_ids=self.layer_ids,
                biases=self.biases,
                zero_mean_conv=self.zero_mean_conv,
                lsuv_batch=batch,
                device=device,
            )
        if not self.track_biases:
            self.plan = self.plan.subset(n for n in self.plan.names() if n.endswith("weight"))
        self._kinds = parameter_kinds(module, self.plan.names())
        self.fingerprint = self.plan.fingerprint()
        log.info(
            "deterministic init (%s): %d tensors, fingerprint %s",
            self.mode,
            len(self.plan.names()),
            self.fingerprint[:12],
        )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        if trainer.current_epoch == 0 and trainer.global_step == 0:
            self._analyse(trainer, pl_module, epoch=-1, log_metrics=False)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        epoch = trainer.current_epoch
        if (epoch + 1) % self.every_n_epochs == 0 or _is_last_epoch(trainer, epoch):
            self._analyse(trainer, pl_module, epoch=epoch, log_metrics=True)

    # ------------------------------------------------------------------ analysis

    def analyse(self, module: torch.nn.Module) -> dict[str, DeltaStats]:
        """``DeltaStats`` per tracked parameter (plus ``"all"``), ``w0`` regenerated in chunks
        (or read from the record).

        Sharded parameters (FSDP2 ``DTensor``s) are compared shard by shard on each rank and
        the summaries all-reduced (:func:`~cdi_experiments.modules.delta_stats`), so every
        rank gets the numbers of the whole tensors: counts and histogram bins exact, sums up
        to rounding. It is then a collective: every rank calls it (the epoch-end hook does).
        """
        if self.plan is None:
            raise RuntimeError("the callback has not initialized a model yet (setup not run)")
        if not self._kinds:
            self._kinds = parameter_kinds(module, self.plan.names())
        out = delta_stats(module, self.plan, self.thresholds, chunk_elems=self.chunk_elems)
        out["all"] = out.pop("__total__")
        return out

    def resolved_log_per(self) -> str:
        """``log_per`` with ``"auto"`` decided by the number of tracked tensors."""
        if self.log_per != "auto":
            return self.log_per
        n = len(self.plan.names()) if self.plan is not None else 0
        return "parameter" if n <= AUTO_PER_PARAMETER_MAX else "type"

    def groups(self) -> dict[str, str]:
        """Tracked parameter name -> the group its metrics are logged under (itself, its
        type such as ``Conv2d.weight``, or ``all``, by :meth:`resolved_log_per`)."""
        per = self.resolved_log_per()
        names = self.plan.names() if self.plan is not None else []
        if per == "parameter":
            return {n: n for n in names}
        if per == "total":
            return {n: "all" for n in names}
        return {n: self._kinds[n] for n in names}

    def logged_stats(self, stats: Mapping[str, DeltaStats]) -> dict[str, DeltaStats]:
        """Per-parameter ``stats`` (from :meth:`analyse`) merged into the logged groups,
        ``all`` last; per parameter they are returned as they are."""
        if self.resolved_log_per() == "parameter":
            return dict(stats)
        out: dict[str, DeltaStats] = {}
        for name, group in self.groups().items():
            if group != "all":
                out.setdefault(group, DeltaStats(self.thresholds)).merge(stats[name])
        out["all"] = stats["all"]
        return out

    def metrics_from(self, stats: Mapping[str, DeltaStats]) -> dict[str, float]:
        """The logged metrics of per-parameter ``stats``, grouped as ``log_per`` says."""
        m: dict[str, float] = {}
        for name, st in self.logged_stats(stats).items():
            for t in self.thresholds:
                m[f"awake/{name}@{threshold_key(t)}"] = st.pct_changed(t)
            m[f"delta_mean/{name}"] = st.mean
            m[f"delta_max/{name}"] = st.max
            for q in self.quantiles:
                m[f"delta_{quantile_key(q)}/{name}"] = st.quantile(q)
        return m

    def _analyse(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, epoch: int, log_metrics: bool
    ) -> None:
        stats = self.analyse(tracked_module(pl_module))
        if log_metrics:
            for key, value in self.metrics_from(stats).items():
                # float64 tensor: Lightning would store a Python float as float32 (7 digits);
                # batch_size=1: the value is already the epoch's exact figure, nothing to average
                pl_module.log(
                    key,
                    torch.tensor(value, dtype=torch.float64),
                    on_step=False,
                    on_epoch=True,
                    sync_dist=False,
                    rank_zero_only=True,
                    batch_size=1,
                )
        for name, st in stats.items():  # the files keep one row per parameter, always
            row = {
                "epoch": epoch,
                "name": name,
                "numel": st.total,
                "mean_delta": st.mean,
                "max_delta": st.max,
            }
            for t in self.thresholds:
                row[f"awake_pct@{threshold_key(t)}"] = st.pct_changed(t)
            self.history.append(row)
            if self.histograms:
                counts = np.concatenate([[st.zeros], st.hist])
                lows = np.concatenate([[0.0], DELTA_EDGES[:-1]])
                highs = np.concatenate([[0.0], DELTA_EDGES[1:]])
                for lo, hi, c in zip(lows, highs, counts, strict=True):
                    if c:
                        self._hist_rows.append(
                            {
                                "epoch": epoch,
                                "name": name,
                                "low": float(lo),
                                "high": float(hi),
                                "count": int(c),
                            }
                        )
        if trainer.is_global_zero:
            self._log_histograms(trainer, pl_module, epoch, stats)
            self._write_files()

    def _log_histograms(
        self, trainer: pl.Trainer, pl_module, epoch: int, stats: Mapping[str, DeltaStats]
    ) -> None:
        """The epoch's dashboards on the trainer's W&B and TensorBoard loggers: the per-layer
        awake table and chart, and (with ``histograms``) weight and ``|w - w0|`` histograms
        (:func:`cdi_experiments.lightning.dashboards.log_epoch`)."""
        log_epoch(
            trainer.loggers,
            tracked_module(pl_module),
            self.groups(),
            self.history,
            epoch,
            self.logged_stats(stats) if self.histograms else None,
            chunk_elems=self.chunk_elems,
        )

    def _write_files(self) -> None:
        if self.paths is None:
            return
        atomic_write_csv(self.paths.layers, pd.DataFrame(self.history))
        if self.histograms:
            atomic_write_csv(self.paths.delta_hist, pd.DataFrame(self._hist_rows))

    # ------------------------------------------------------------------ checkpoint state

    def state_dict(self) -> dict[str, Any]:
        """Plain containers, scalars and (record mode) tensors: the checkpoint loads with
        ``torch.load(..., weights_only=True)``."""
        return {
            "identity": self.identity(),
            "plan": self.plan.to_dict() if self.plan is not None else None,
            "history": self.history,
            "hist_rows": self._hist_rows,
            "extra": dict(self.extra_state),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the history and plan; refuse a checkpoint made under another identity.

        In record mode the checkpoint's record replaces the one made at setup (the model
        built for the resume was initialized afresh; the run's true ``w0`` is the record).

        Raises:
            InitIdentityError: the checkpoint's mode, seed, scheme, parameters, overrides,
                layer ids, generator version or initial-weight fingerprint differ from this
                callback's; the message names each argument, both values and the fix.
        """
        theirs = state_dict.get("identity")
        if not isinstance(theirs, Mapping):
            raise InitIdentityError(
                "cannot resume: the checkpoint's DeterministicInitCallback state has no "
                "'identity'; it was not written by this callback. Use a new run directory"
            )
        ours = self.identity()
        theirs = {"mode": "generate", **theirs}  # checkpoints before record mode: generate
        keys = ["mode", *(k for k in ours if k != "mode")]
        diff = {
            k: (theirs.get(k), ours.get(k, "generate"))
            for k in keys
            if _plain(theirs.get(k)) != ours.get(k, "generate")
            # the fingerprint needs the model (None before setup); a record is taken as is
            and not (k == "fingerprint" and (ours[k] is None or self.mode == "record"))
        }
        if "mode" in diff:  # the other fields do not compare across modes
            diff = {"mode": diff["mode"]}
        if diff:
            raise InitIdentityError(mismatch_message(diff), diff)
        if state_dict.get("plan") and (self.plan is None or self.mode == "record"):
            plan = plan_from_dict(state_dict["plan"])
            if self.mode == "record" and plan.fingerprint() != theirs.get("fingerprint"):
                raise InitIdentityError(
                    "cannot resume: the checkpoint's recorded initial weights do not match its "
                    "own fingerprint (a damaged checkpoint); use a new run directory",
                    {"fingerprint": (theirs.get("fingerprint"), plan.fingerprint())},
                )
            self.plan = plan
            self.fingerprint = theirs.get("fingerprint")
        self.history = list(state_dict.get("history", []))
        self._hist_rows = list(state_dict.get("hist_rows", []))
        self.extra_state = dict(state_dict.get("extra", {}))


__all__ = [
    "AUTO_PER_PARAMETER_MAX",
    "DEFAULT_QUANTILES",
    "DEFAULT_THRESHOLDS",
    "LOG_PER",
    "MODES",
    "DeterministicInitCallback",
    "InitIdentityError",
    "mismatch_message",
    "quantile_key",
    "threshold_key",
    "tracked_module",
]
