"""Build a run's objects from its config: ``hydra.utils.instantiate`` on every ``_target_``.

The config names the classes and their arguments; the builder adds only what depends on the
run, and only where the target's constructor takes it by name and the config did not set it:

* the model: ``input_shape`` and ``num_classes`` from the datamodule;
* callbacks: ``out_dir`` (the run directory) and ``dirpath`` (its ``checkpoints/``);
* loggers: ``save_dir`` (the run directory), ``keep_epochs_upto`` (the epochs a resumed
  checkpoint holds) and, for W&B, the run id kept in the checkpoint, ``resume="allow"``, the
  config and the mode (offline unless asked);
* the trainer: :class:`~cdi_experiments.lightning.checkpoint_io.AtomicCheckpointIO` (checkpoints
  written atomically on any filesystem) unless ``trainer.plugins`` is set.

Under Lightning's ``ModelParallelStrategy`` (``trainer=fsdp2``) the model is built on the meta
device: no memory, no random init. ``Classifier.configure_model`` shards it and the init callback
fills each rank's shards (:meth:`~cdi_experiments.lightning.callback.DeterministicInitCallback.materialize`).

The LightningModule carries the composed task config, which every checkpoint then stores
(``checkpoint["cdi"]["config"]``).
"""

from __future__ import annotations

import os
import uuid
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig
from pytorch_lightning.loggers import CSVLogger, Logger, MLFlowLogger, WandbLogger
from torch import nn

from cdi_experiments.lightning.callback import DeterministicInitCallback
from cdi_experiments.lightning.checkpoint_io import AtomicCheckpointIO
from cdi_experiments.lightning.classifier import Classifier
from cdi_experiments.lightning.csv_logger import ResumableCSVLogger
from cdi_experiments.lightning.dashboards import wandb_group, wandb_name, wandb_tags
from cdi_experiments.paths import RunPaths
from cdi_experiments.run.schema import (
    ConfigError,
    is_model_parallel,
    model_name,
    one_line,
    plain,
    short_name,
    target_signature,
    task_config,
)

# Optional packages a target may need, and how to install them.
_PIP = {"mlflow": "'cdi-experiments[mlflow]' (or mlflow-skinny)"}


def _with_run_args(spec: dict[str, Any], run_args: dict[str, Any]) -> dict[str, Any]:
    """``spec`` plus each ``run_args`` entry its target takes by name and ``spec`` lacks."""
    sig = target_signature(spec["_target_"])
    return {**{k: v for k, v in run_args.items() if k in sig.names and k not in spec}, **spec}


def _instantiate(key: str, spec: dict[str, Any], **kwargs: Any) -> Any:
    """``instantiate(spec)`` with plain containers; a missing package or a constructor's
    ValueError/TypeError becomes one :class:`ConfigError` line naming ``key``."""
    try:
        return instantiate(spec, _convert_="all", **kwargs)
    except InstantiationException as exc:
        cause = exc.__cause__
        if isinstance(cause, ImportError) and getattr(cause, "name", None):
            pkg = str(cause.name).split(".")[0]
            raise ConfigError(
                f"{key}._target_={spec['_target_']!r} needs the package {pkg!r}; "
                f"pip install {_PIP.get(pkg, pkg)}"
            ) from None
        raise ConfigError(f"{key}: {one_line(cause or exc)}") from None


def build_datamodule(cfg: DictConfig) -> pl.LightningDataModule:
    """The datamodule ``cfg.data`` describes."""
    return _instantiate("data", plain(cfg.data))


def model_spec(cfg: DictConfig, dm: Any) -> dict[str, Any]:
    """``cfg.model`` plus ``input_shape``/``num_classes`` from ``dm`` where the model takes them:
    the dict the checkpoint stores and that rebuilds the model."""
    run_args = {}
    if hasattr(dm, "input_shape"):
        run_args["input_shape"] = list(dm.input_shape)
    if hasattr(dm, "num_classes"):
        run_args["num_classes"] = int(dm.num_classes)
    return _with_run_args(plain(cfg.model), run_args)


def optimizer_spec(cfg: DictConfig) -> dict[str, Any]:
    return plain(cfg.optimizer)


def scheduler_spec(cfg: DictConfig) -> dict[str, Any] | None:
    spec = plain(cfg.get("scheduler")) or None
    return spec if spec and spec.get("_target_") else None


def build_lit_module(cfg: DictConfig, dm: Any) -> Classifier:
    """The LightningModule: the model ``cfg.model`` names, trained with ``cfg.optimizer`` (and
    ``cfg.scheduler``); on the meta device when the trainer's strategy shards it in
    ``configure_model`` (``trainer=fsdp2``)."""
    spec = model_spec(cfg, dm)
    if is_model_parallel(plain(cfg.trainer)):
        with torch.device("meta"):  # as trainer.init_module(empty_init=True) would for it
            model = _instantiate("model", spec)
    else:
        model = _instantiate("model", spec)
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"model._target_={spec['_target_']!r} built a {type(model).__name__}, not a "
            "torch.nn.Module; give a module.Class that subclasses nn.Module"
        )
    lit = Classifier(
        model=model, model_cfg=spec, optimizer=optimizer_spec(cfg), scheduler=scheduler_spec(cfg)
    )
    lit.run_config = plain(task_config(cfg))  # into every checkpoint: it describes itself
    return lit


def build_callbacks(cfg: DictConfig, paths: RunPaths | None) -> list[pl.Callback]:
    """``cfg.callbacks`` in config order (``null`` entries are switched off)."""
    run_args = {}
    if paths is not None:
        run_args = {"out_dir": str(paths.root), "dirpath": str(paths.checkpoints)}
    specs = plain(cfg.get("callbacks")) or {}
    return [
        _instantiate(f"callbacks.{name}", _with_run_args(spec, run_args))
        for name, spec in specs.items()
        if spec is not None
    ]


def init_callback(callbacks: list[pl.Callback]) -> DeterministicInitCallback:
    """The :class:`DeterministicInitCallback` among ``callbacks``.

    Raises:
        ConfigError: There is none (its initial weights are what the run tracks and prunes).
    """
    for cb in callbacks:
        if isinstance(cb, DeterministicInitCallback):
            return cb
    raise ConfigError(
        "callbacks has no DeterministicInitCallback; keep callbacks.deterministic_init "
        "(cdi-train tracks and prunes against its initial weights)"
    )


def build_loggers(
    cfg: DictConfig,
    paths: RunPaths,
    callback: DeterministicInitCallback,
    resumed: dict[str, Any],
    resume_epoch: int | None = None,
    epoch_end_row: dict[str, Any] | None = None,
) -> list[Logger]:
    """``cfg.logger``'s loggers, after a :class:`ResumableCSVLogger` (``metrics.csv``) where
    none of them writes a CSV. ``resumed``: the init callback's checkpoint state (``{}`` for a
    fresh run); ``resume_epoch``: the checkpoint's epoch, whose rows the metrics CSV keeps;
    ``epoch_end_row``: the row that epoch's end had not logged yet when it was saved."""
    loggers: list[Logger] = []
    for name, spec in (plain(cfg.get("logger")) or {}).items():
        if spec is None:
            continue
        run_args: dict[str, Any] = {
            "save_dir": str(paths.root),
            "keep_epochs_upto": resume_epoch,
            "epoch_end_row": epoch_end_row,
            "run_config": plain(cfg),  # TensorBoard's hparams (dashboards.TensorBoardLogger)
        }
        cls = get_class(spec["_target_"])
        if issubclass(cls, MLFlowLogger):
            run_args["save_dir"] = str(paths.root / "mlruns")
            if not (spec.get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI")):
                # A store in the run directory, needing no server or database. MLflow 3 keeps
                # its file store in maintenance mode and refuses it unless this is set.
                os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        spec = _with_run_args(spec, run_args)
        if issubclass(cls, WandbLogger):
            spec = _wandb_args(cfg, spec, paths, callback, resumed)
        # Not recursive: W&B's `config` holds the run's own _target_ nodes, to record, not build.
        loggers.append(_instantiate(f"logger.{name}", spec, _recursive_=False))
    if not any(isinstance(lg, CSVLogger) for lg in loggers):
        # metrics.csv is the run's own record (cdi-report reads it): kept whatever the
        # dashboards are, e.g. logger=wandb, whose history is only in its offline binary log
        loggers.insert(0, ResumableCSVLogger(str(paths.root), resume_epoch, epoch_end_row))
    return loggers


def _wandb_args(
    cfg: DictConfig,
    spec: dict[str, Any],
    paths: RunPaths,
    callback: DeterministicInitCallback,
    resumed: dict[str, Any],
) -> dict[str, Any]:
    spec = dict(spec)
    # Offline unless the user asks otherwise (WANDB_MODE or logger.wandb.mode). Passing mode
    # to wandb.init, not WandbLogger(offline=True), keeps WANDB_MODE out of os.environ, where
    # it would leak into later multirun jobs.
    spec["mode"] = os.environ.get("WANDB_MODE") or spec.get("mode") or "offline"
    # The run id lives in the checkpoint, so a resumed run continues the same W&B run.
    run_id = spec.get("id") or resumed.get("extra", {}).get("wandb_run_id") or uuid.uuid4().hex[:12]
    callback.extra_state["wandb_run_id"] = run_id
    spec.setdefault("id", run_id)
    spec.setdefault("resume", "allow")
    spec.setdefault("config", plain(cfg))
    spec.update(_wandb_run_fields(cfg, spec))
    paths.wandb.mkdir(parents=True, exist_ok=True)
    return spec


def _wandb_run_fields(cfg: DictConfig, spec: dict[str, Any]) -> dict[str, Any]:
    """What the W&B run is filed under, where ``logger.wandb`` leaves it unset: the group (the
    experiment and/or the sweep), ``job_type="train"``, tags from the config after the given
    ones, and for a sweep job the name with the job's overrides (distinct across the sweep)."""
    hydra = HydraConfig.get() if HydraConfig.initialized() else None
    choices = dict(hydra.runtime.choices) if hydra is not None else {}
    multirun = hydra is not None and hydra.mode == RunMode.MULTIRUN
    experiment = choices.get("experiment")
    optimizer = choices.get("optimizer")
    if not optimizer or optimizer == "custom":
        optimizer = short_name(cfg.optimizer.get("_target_"))
    labels = {
        "model": model_name(cfg.model.get("_target_")),
        "data": cfg.data.get("name") or short_name(cfg.data.get("_target_")),
        "init": cfg.init.scheme,
        "optimizer": optimizer,
        "experiment": experiment,
    }
    name = spec.get("name")
    if multirun and name == cfg.run_name:
        name = wandb_name(str(name), hydra.job.override_dirname)
    sweep_dir = hydra.sweep.dir if multirun else None
    return {
        "group": spec.get("group") or wandb_group(experiment, sweep_dir),
        "job_type": spec.get("job_type") or "train",
        "tags": wandb_tags(labels, spec.get("tags")),
        "name": name,
    }


def build_trainer(
    cfg: DictConfig, paths: RunPaths, loggers: list[Logger], callbacks: list[pl.Callback]
) -> pl.Trainer:
    """``cfg.trainer`` with the run's loggers, callbacks and directory, saving checkpoints
    with :class:`AtomicCheckpointIO` unless ``trainer.plugins`` names plugins of its own."""
    spec = plain(cfg.trainer)
    extra: dict[str, Any] = {}
    if not spec.get("plugins"):
        extra["plugins"] = [AtomicCheckpointIO()]
    return _instantiate(
        "trainer",
        spec,
        logger=loggers or False,
        callbacks=callbacks,
        default_root_dir=str(paths.root),
        **extra,
    )


__all__ = [
    "build_callbacks",
    "build_datamodule",
    "build_lit_module",
    "build_loggers",
    "build_trainer",
    "init_callback",
    "model_spec",
    "optimizer_spec",
    "scheduler_spec",
]
