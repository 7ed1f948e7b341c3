"""The Lightning callback at the centre of the design: deterministic init at setup, and at
every epoch end the share of weights that moved from their (regenerated) initial values.

No copy of the initial weights is ever stored: each epoch regenerates them in bounded chunks
from (seed, parameter name, coordinates). The callback's checkpoint state carries the
generator's identity and a fingerprint of the initial weights; resuming a run under another
identity is refused.
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

from cdi_experiments.generator import bits as B
from cdi_experiments.generator import schemes
from cdi_experiments.generator.core import DEFAULT_CHUNK_ELEMS, check_threshold
from cdi_experiments.modules import DELTA_EDGES, DeltaStats, InitPlan, init_module, param_deltas
from cdi_experiments.paths import RunPaths, atomic_write_csv

log = logging.getLogger(__name__)

DEFAULT_THRESHOLDS = (0.0, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2)
DEFAULT_QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9, 0.99)


class InitIdentityError(ValueError):
    """A checkpoint was made under another generator identity (seed, scheme, version...)."""


# identity field -> the config key that sets it (for error messages)
_CONFIG_KEYS = {
    "seed": "seed",
    "scheme": "init.scheme",
    "params": "init.params",
    "overrides": "init.overrides",
    "layer_ids": "init.layer_ids",
    "biases": "init.biases",
    "zero_mean_conv": "init.zero_mean_conv",
}


def _mismatch_message(diff: Mapping[str, tuple[Any, Any]]) -> str:
    """One line: every differing identity field with both values, then how to fix it."""
    values = "; ".join(
        f"{_CONFIG_KEYS.get(k, k)}: checkpoint {a!r} vs this run {b!r}"
        for k, (a, b) in diff.items()
    )
    if "generator_version" in diff:
        fix = "install the cdi-experiments version that wrote the checkpoint"
    elif any(k in _CONFIG_KEYS for k in diff):
        fix = (
            "rerun with the checkpoint's values ("
            + " ".join(
                f"{_CONFIG_KEYS[k]}={a if isinstance(a, (str, int, float)) else json.dumps(a)}"
                for k, (a, _) in diff.items()
                if k in _CONFIG_KEYS
            )
            + ")"
        )
    else:  # same config, other initial weights: the model's parameters or the generator changed
        fix = "rerun with the model config and code that wrote the checkpoint"
    return (
        f"cannot resume: the checkpoint's initial weights were made differently ({values}). "
        f"To continue it, {fix}; to start over, use a new run directory or resume=false"
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
    """Initialize deterministically at setup; log awakened shares every ``every_n_epochs``.

    Args:
        seed: generator seed (0 is a seed).
        scheme: init scheme name (``he``, ``xavier``, ``zeros``, ..., ``lsuv``).
        params: the scheme's parameters.
        overrides: per-layer schemes, e.g. ``{"fc1": "zeros"}``.
        layer_ids: ``"name"`` (stable, from parameter names) or ``"index"``.
        thresholds: ``|w - w0|`` thresholds; 0 means "exactly unchanged".
        track_biases: also track biases and norm parameters.
        every_n_epochs: analysis cadence (the last epoch is always analysed).
        quantiles: quantiles of ``|w - w0|`` logged per layer.
        histograms: keep per-epoch ``|w - w0|`` histogram counts (CSV, and W&B histograms).
        lsuv_batch_size: images from the datamodule's ``sample_batch`` for LSUV.
        out_dir: run directory for the histogram CSV (None: don't write).

    Logged keys (``<param>`` is a parameter name or ``all``), as float64, at the epoch's end:

    * ``awake/<param>@<t>``: percent of entries with ``|w - w0| > t`` (exact counts; NaN counts
      as moved);
    * ``delta_mean/<param>``, ``delta_max/<param>``: exact mean and max of ``|w - w0|``;
    * ``delta_qNN/<param>``: approximate quantiles from a histogram with fixed log-spaced edges
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

    Raises:
        ValueError: an unknown scheme or ``layer_ids``, a negative or non-finite threshold,
            ``every_n_epochs < 1``, a quantile outside ``[0, 1]``.
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
    ) -> None:
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be an integer >= 0 (0 is a seed), got {seed!r}")
        if scheme != "lsuv":
            try:
                schemes.get(scheme)  # unknown names fail here, before any training
            except ValueError as exc:
                raise ValueError(f"init.scheme: {exc}") from None
        if layer_ids not in ("name", "index"):
            raise ValueError(f"init.layer_ids must be 'name' or 'index', got {layer_ids!r}")
        if isinstance(thresholds, (str, bytes)) or len(thresholds) == 0:
            raise ValueError(
                f"tracking.thresholds must list at least one number >= 0, e.g. [0, 1e-5]; "
                f"got {thresholds!r}"
            )
        for t in thresholds:
            try:
                check_threshold(t)
            except ValueError:
                raise ValueError(
                    f"tracking.thresholds: {t!r} is not a finite number >= 0; use e.g. "
                    "[0, 1e-6, 1e-5] (0 = exactly unchanged)"
                ) from None
        _positive_int("tracking.every_n_epochs", every_n_epochs)
        _positive_int("init.lsuv_batch_size", lsuv_batch_size)
        _positive_int("chunk_elems", chunk_elems)
        for q in quantiles:
            if isinstance(q, bool) or not isinstance(q, numbers.Real) or not 0 <= q <= 1:
                raise ValueError(
                    f"tracking.quantiles must be fractions in [0, 1] (0.5 = median), got {q!r}"
                )
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
        self.paths = RunPaths(out_dir) if out_dir else None
        self.plan: InitPlan | None = None
        self.fingerprint: str | None = None
        self.history: list[dict[str, Any]] = []  # per-epoch per-layer rows (also on disk)
        self._hist_rows: list[dict[str, Any]] = []
        self.extra_state: dict[str, Any] = {}  # e.g. the W&B run id, kept in checkpoints

    # ------------------------------------------------------------------ identity

    def identity(self) -> dict[str, Any]:
        """Everything that determines the initial weights (compared on resume)."""
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
        batch = None
        if self.scheme == "lsuv":
            dm = trainer.datamodule
            if dm is None or not hasattr(dm, "sample_batch"):
                raise ValueError(
                    "init 'lsuv' needs a datamodule with sample_batch(n) for its fitting batch"
                )
            batch = dm.sample_batch(self.lsuv_batch_size)
        self.plan = init_module(
            tracked_module(pl_module),
            self.seed,
            self.scheme,
            params=self.params,
            overrides=self.overrides,
            layer_ids=self.layer_ids,
            biases=self.biases,
            zero_mean_conv=self.zero_mean_conv,
            lsuv_batch=batch,
        )
        if not self.track_biases:
            self.plan.blocks = {k: v for k, v in self.plan.blocks.items() if k.endswith("weight")}
        self.fingerprint = self.plan.fingerprint()
        log.info(
            "deterministic init: %d tensors, fingerprint %s",
            len(self.plan.blocks),
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
        """``DeltaStats`` per tracked parameter (plus ``"all"``), regenerating w0 in chunks."""
        if self.plan is None:
            raise RuntimeError("the callback has not initialized a model yet (setup not run)")
        out: dict[str, DeltaStats] = {}
        overall = DeltaStats(self.thresholds)
        for name in self.plan.names():
            st = DeltaStats(self.thresholds)
            for _, delta in param_deltas(module, self.plan, name, self.chunk_elems):
                st.add(delta)
                overall.add(delta)
            out[name] = st
        out["all"] = overall
        return out

    def metrics_from(self, stats: Mapping[str, DeltaStats]) -> dict[str, float]:
        m: dict[str, float] = {}
        for name, st in stats.items():
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
        metrics = self.metrics_from(stats)
        if log_metrics:
            for key, value in metrics.items():
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
        for name, st in stats.items():
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
            self._log_histograms(trainer, pl_module, stats, epoch)
            self._write_files()

    def _log_histograms(self, trainer: pl.Trainer, pl_module, stats, epoch: int) -> None:
        if not self.histograms:
            return
        try:
            from pytorch_lightning.loggers import WandbLogger
        except ImportError:  # pragma: no cover
            return
        for lg in trainer.loggers:
            if isinstance(lg, WandbLogger):
                import wandb

                params = dict(tracked_module(pl_module).named_parameters())
                payload = {}
                for name in self.plan.names():
                    w = params[name].detach().cpu().float().numpy().reshape(-1)
                    payload[f"weights/{name}"] = wandb.Histogram(w)
                    deltas = np.concatenate(
                        [
                            d.reshape(-1)
                            for _, d in param_deltas(params, self.plan, name, self.chunk_elems)
                        ]
                    )
                    moved = deltas[deltas > 0]
                    if moved.size:  # nothing has moved at train start: no histogram to draw
                        payload[f"abs_delta_log10/{name}"] = wandb.Histogram(np.log10(moved))
                payload["epoch"] = max(epoch, 0)
                lg.experiment.log(payload, commit=False)

    def _write_files(self) -> None:
        if self.paths is None:
            return
        atomic_write_csv(self.paths.layers, pd.DataFrame(self.history))
        if self.histograms:
            atomic_write_csv(self.paths.delta_hist, pd.DataFrame(self._hist_rows))

    # ------------------------------------------------------------------ checkpoint state

    def state_dict(self) -> dict[str, Any]:
        return {
            "identity": self.identity(),
            "plan": self.plan.to_dict() if self.plan is not None else None,
            "history": self.history,
            "hist_rows": self._hist_rows,
            "extra": dict(self.extra_state),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the history and plan; refuse a checkpoint made under another identity.

        Raises:
            InitIdentityError: the checkpoint's seed, scheme, parameters, overrides, layer ids,
                generator version or initial-weight fingerprint differ from this run's; the
                message names each field, both values and the fix.
        """
        theirs = state_dict.get("identity")
        if not isinstance(theirs, Mapping):
            raise InitIdentityError(
                "cannot resume: the checkpoint's DeterministicInitCallback state has no "
                "'identity'; it was not written by this callback. Use a new run directory"
            )
        ours = self.identity()
        diff = {
            k: (theirs.get(k), ours[k])
            for k in ours
            if _plain(theirs.get(k)) != ours[k] and not (k == "fingerprint" and ours[k] is None)
        }
        if diff:
            raise InitIdentityError(_mismatch_message(diff))
        if state_dict.get("plan") and self.plan is None:
            self.plan = InitPlan.from_dict(state_dict["plan"])
            self.fingerprint = theirs.get("fingerprint")
        self.history = list(state_dict.get("history", []))
        self._hist_rows = list(state_dict.get("hist_rows", []))
        self.extra_state = dict(state_dict.get("extra", {}))
