"""``cdi-train``: the Hydra app. ``train(cfg)`` is a plain function; ``main`` wraps it.

Examples::

    cdi-train data=mnist model=mlp init=zeros trainer.max_epochs=1
    cdi-train -m init=zeros,ones,he data=mnist,fashion_mnist
    cdi-train experiment=mnist_demo logger=wandb
"""

from __future__ import annotations

import json
import logging
import os
import platform
import sys
import uuid
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf

import cdi_experiments
from cdi_experiments import schemes
from cdi_experiments.config_check import ConfigError, check_config, check_group_overrides
from cdi_experiments.generator import bits as B
from cdi_experiments.paths import RunPaths, atomic_write_text
from cdi_experiments.tracking import DeterministicInitCallback

log = logging.getLogger(__name__)

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "configs")


def plain(node: Any) -> Any:
    """An OmegaConf node as plain containers (checkpoints must not hold OmegaConf classes)."""
    if isinstance(node, DictConfig) or OmegaConf.is_config(node):
        return OmegaConf.to_container(node, resolve=True)
    return node


def run_dir_of(cfg: DictConfig) -> Path:
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    return Path(cfg.get("run_dir") or Path.cwd())


def build_datamodule(cfg: DictConfig):
    from cdi_experiments.data import ImageDataModule

    return ImageDataModule(**plain(cfg.data), seed=int(cfg.seed))


def build_lit_module(cfg: DictConfig):
    from cdi_experiments.lit_module import Classifier

    return Classifier(model_cfg=plain(cfg.model), optimizer=plain(cfg.optimizer))


def build_callback(cfg: DictConfig, run_dir: Path | None) -> DeterministicInitCallback:
    init = plain(cfg.init)
    tr = plain(cfg.tracking)
    return DeterministicInitCallback(
        seed=int(cfg.seed),
        scheme=init["scheme"],
        params=init.get("params") or {},
        overrides=init.get("overrides") or {},
        layer_ids=init.get("layer_ids", "name"),
        biases=init.get("biases", True),
        zero_mean_conv=init.get("zero_mean_conv", False),
        lsuv_batch_size=init.get("lsuv_batch_size", 256),
        thresholds=tr["thresholds"],
        track_biases=tr.get("track_biases", True),
        every_n_epochs=tr.get("every_n_epochs", 1),
        quantiles=tr.get("quantiles", ()),
        histograms=tr.get("histograms", True),
        out_dir=str(run_dir) if run_dir is not None else None,
    )


def _resume_state(paths: RunPaths) -> dict[str, Any]:
    """Our callback's saved state from ``last.ckpt`` (for the W&B run id), or ``{}``."""
    if not paths.last_ckpt.exists():
        return {}
    ckpt = torch.load(paths.last_ckpt, map_location="cpu", weights_only=True)
    for key, state in ckpt.get("callbacks", {}).items():
        if key.startswith("DeterministicInitCallback"):
            return state
    return {}


def build_loggers(
    cfg: DictConfig, paths: RunPaths, callback: DeterministicInitCallback, resumed: dict
) -> list:
    from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger, WandbLogger

    lcfg = plain(cfg.logger) or {}
    loggers: list = []
    if "csv" in lcfg:
        loggers.append(CSVLogger(save_dir=str(paths.root), name="", version=""))
    if "tensorboard" in lcfg:
        loggers.append(TensorBoardLogger(save_dir=str(paths.root), name="tensorboard", version=""))
    if "wandb" in lcfg:
        w = dict(lcfg["wandb"] or {})
        # Offline unless the user asks otherwise (WANDB_MODE or logger.wandb.mode). Passing mode
        # to wandb.init, not WandbLogger(offline=True), keeps WANDB_MODE out of os.environ, where
        # it would leak into later multirun jobs.
        mode = os.environ.get("WANDB_MODE") or w.pop("mode", "offline")
        w.pop("mode", None)
        run_id = resumed.get("extra", {}).get("wandb_run_id") or uuid.uuid4().hex[:12]
        callback.extra_state["wandb_run_id"] = run_id
        paths.wandb.mkdir(parents=True, exist_ok=True)
        loggers.append(
            WandbLogger(
                name=str(cfg.run_name),
                save_dir=str(paths.root),
                id=run_id,
                resume="allow",
                mode=mode,
                config=plain(cfg),
                **w,
            )
        )
    return loggers


def run_info(
    cfg: DictConfig, callback: DeterministicInitCallback, extra: dict | None = None
) -> dict[str, Any]:
    """Config, versions and fingerprints saved with every run."""
    return {
        "config": plain(cfg),
        "generator": {"version": B.GENERATOR_VERSION, **callback.identity()},
        "versions": {
            "cdi_experiments": cdi_experiments.__version__,
            "torch": torch.__version__,
            "pytorch_lightning": pl.__version__,
            "python": platform.python_version(),
        },
        "argv": sys.argv,
        **(extra or {}),
    }


def train(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    """Fit, test and prune one configuration. Returns ``(metrics, objects)``."""
    check_config(cfg)
    paths = RunPaths(run_dir_of(cfg))
    paths.root.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
    torch.use_deterministic_algorithms(bool(cfg.deterministic))

    dm = build_datamodule(cfg)
    lit = build_lit_module(cfg)
    callback = build_callback(cfg, paths.root)
    resumed = _resume_state(paths) if cfg.resume else {}
    loggers = build_loggers(cfg, paths, callback, resumed)
    from pytorch_lightning.callbacks import ModelCheckpoint

    ckpt = ModelCheckpoint(
        dirpath=str(paths.checkpoints), save_last=True, save_top_k=0, every_n_epochs=1
    )
    trainer = pl.Trainer(
        **plain(cfg.trainer),
        logger=loggers or False,
        callbacks=[callback, ckpt],
        default_root_dir=str(paths.root),
    )
    ckpt_path = str(paths.last_ckpt) if cfg.resume and paths.last_ckpt.exists() else None
    if ckpt_path:
        log.info("resuming from %s", ckpt_path)
    ok = False
    metrics: dict[str, float] = {}
    prune_df = None
    try:
        trainer.fit(lit, datamodule=dm, ckpt_path=ckpt_path)
        if cfg.test_after_fit:
            trainer.test(lit, datamodule=dm, verbose=False)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        if trainer.is_global_zero and cfg.prune.enabled:
            from cdi_experiments.prune import run_prune_stage

            prune_df = run_prune_stage(lit.model, callback.plan, dm, cfg, paths, loggers)
        if trainer.is_global_zero:
            atomic_write_text(
                paths.run_info,
                json.dumps(
                    run_info(cfg, callback, {"final_metrics": metrics}), indent=2, default=str
                ),
            )
            from cdi_experiments.report import summarize_run

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


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def _hydra_main(cfg: DictConfig) -> float | None:
    try:
        metrics, _ = train(cfg)
    except ConfigError as exc:
        print(f"cdi-train: error: {exc}", file=sys.stderr)
        sys.exit(2)
    return metrics.get("test/acc")


def main() -> None:
    """Console entry point: check group overrides (one-line errors), then run Hydra."""
    try:
        check_group_overrides(sys.argv[1:], CONFIG_DIR)
    except ConfigError as exc:
        print(f"cdi-train: error: {exc}", file=sys.stderr)
        sys.exit(2)
    _hydra_main()


if __name__ == "__main__":
    main()

__all__ = ["main", "train", "schemes"]
