"""One training run: ``train(cfg) -> (metrics, objects)``, a plain function of the config.

Fit, test, prune and report one composed ``cdi-train`` config (the command line is
:mod:`cdi_experiments.cli.train`). The objects are built from the config's ``_target_`` s
(:mod:`cdi_experiments.run.build`); a run directory holding ``checkpoints/last.ckpt`` resumes
it after :func:`~cdi_experiments.run.resume.check_resume`. This module imports Lightning;
the command line imports it only when a run starts, so ``--help`` and config errors stay fast.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import sys
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

import cdi_experiments
from cdi_experiments.generator import bits as B
from cdi_experiments.lightning.callback import InitIdentityError
from cdi_experiments.paths import RunPaths, atomic_write_text
from cdi_experiments.run import build
from cdi_experiments.run.ddp import ddp_ranks_per_job
from cdi_experiments.run.prune_stage import run_prune_stage
from cdi_experiments.run.report import run_figures, summarize_run
from cdi_experiments.run.resume import callback_state, check_resume, epochs_done, identity_error
from cdi_experiments.run.schema import check_config, model_name, plain, task_config

log = logging.getLogger(__name__)

_SEED32 = 2**32


def lightning_seed(seed: int) -> int:
    """The 32-bit seed for Lightning's ``seed_everything`` (torch, numpy, random, workers).

    The generator takes any ``0 <= seed < 2**64``; numpy's global seeding takes 32 bits. Seeds
    below ``2**32`` are used as they are (so runs made before larger seeds were allowed stay
    bit-identical); larger ones are folded: the top 32 bits of ``hash64(seed)``
    (:func:`cdi_experiments.generator.bits.hash64`), a fixed function of the seed.

    >>> lightning_seed(7)
    7
    >>> 0 <= lightning_seed(2**40) < 2**32
    True
    """
    return seed if seed < _SEED32 else B.hash64(seed) >> 32


def run_dir_of(cfg: DictConfig) -> Path:
    """The run directory: Hydra's job output dir, else ``cfg.run_dir``, else the cwd."""
    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    return Path(cfg.get("run_dir") or Path.cwd())


def run_info(cfg: DictConfig, identity: dict[str, Any], extra: dict | None = None) -> dict:
    """Config, versions and fingerprints saved with every run."""
    return {
        "config": plain(cfg),
        "model_name": model_name(cfg.model.get("_target_")),
        "generator": {"version": B.GENERATOR_VERSION, **identity},
        "versions": {
            "cdi_experiments": cdi_experiments.__version__,
            "torch": str(torch.__version__),
            "pytorch_lightning": pl.__version__,
            "python": platform.python_version(),
        },
        "argv": sys.argv,
        "host": platform.node(),
        "pid": os.getpid(),
        **(extra or {}),
    }


def train(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    """Fit, test and prune one configuration. Returns ``(metrics, objects)``.

    Raises:
        ConfigError: A config value that cannot work, or a checkpoint in the run directory
            that this config cannot resume (another seed, init, model, optimizer or data).
    """
    cfg = task_config(cfg)
    check_config(cfg)
    paths = RunPaths(run_dir_of(cfg))
    ckpt = check_resume(cfg, paths.root)  # before anything is written to the run directory
    pl.seed_everything(lightning_seed(int(cfg.seed)), workers=True, verbose=False)

    dm = build.build_datamodule(cfg)
    lit = build.build_lit_module(cfg, dm)
    callbacks = build.build_callbacks(cfg, paths)
    callback = build.init_callback(callbacks)
    paths.root.mkdir(parents=True, exist_ok=True)
    loggers = build.build_loggers(
        cfg,
        paths,
        callback,
        callback_state(ckpt) if ckpt else {},
        resume_epoch=epochs_done(ckpt) - 1 if ckpt else None,
    )
    del ckpt
    trainer = build.build_trainer(cfg, paths, loggers, callbacks)
    ckpt_path = str(paths.last_ckpt) if cfg.resume and paths.last_ckpt.exists() else None
    if ckpt_path:
        log.info("resuming from %s", ckpt_path)
    ok = False
    metrics: dict[str, float] = {}
    prune_df = None
    try:
        with ddp_ranks_per_job():
            try:
                trainer.fit(lit, datamodule=dm, ckpt_path=ckpt_path)
            except InitIdentityError as exc:  # the fingerprint, compared when Lightning restores
                raise identity_error(exc) from None
            if cfg.test_after_fit:
                trainer.test(lit, datamodule=dm, verbose=False)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        if trainer.is_global_zero and cfg.prune.enabled:
            if trainer.world_size > 1:
                # Rank 0 prunes alone: it must see the whole test set, not its DDP shard
                # (setup() would take the shard back from the trainer, so detach it).
                dm.trainer, dm.num_replicas, dm.rank = None, 1, 0
            prune_df = run_prune_stage(lit.model, callback.plan, dm, cfg, paths, loggers)
        if trainer.is_global_zero:
            info = run_info(cfg, callback.identity(), {"final_metrics": metrics})
            atomic_write_text(paths.run_info, json.dumps(info, indent=2, default=str))
            run_figures(paths.root, float(cfg.prune.threshold))
            print(summarize_run(paths.root, metrics, callback, prune_df))
        ok = True
    finally:
        _finish_wandb(loggers, ok)
    return metrics, {
        "trainer": trainer,
        "model": lit,
        "datamodule": dm,
        "callback": callback,
        "prune": prune_df,
        "paths": paths,
    }


def _finish_wandb(loggers: list, ok: bool) -> None:
    """Close the W&B run between multirun jobs; a crash is marked as failed, not finished."""
    if not any(type(lg).__name__ == "WandbLogger" for lg in loggers):
        return
    import wandb

    if wandb.run is not None:
        wandb.finish(exit_code=0 if ok else 1)


__all__ = ["lightning_seed", "run_dir_of", "run_info", "train"]
