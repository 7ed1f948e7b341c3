"""The prune-and-evaluate stage: the end of ``cdi-train``, and ``cdi-prune`` on a checkpoint.

:func:`load_run` reloads a ``cdi-train`` checkpoint and regenerates the initial weights from the
identity stored in it (no copy of them is stored anywhere); :func:`run_prune_stage` compares the
pruning criteria. Fine-tuning uses the run's own optimizer config (``cfg.optimizer``), and every
accuracy comes from :func:`cdi_experiments.modules.evaluate.evaluate`.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from cdi_experiments.lightning.classifier import Classifier, optimizer_factory
from cdi_experiments.modules import InitPlan
from cdi_experiments.modules.evaluate import evaluate
from cdi_experiments.paths import RunPaths, atomic_torch_save, atomic_write_csv
from cdi_experiments.pruning import (
    format_table,
    make_permanent,
    masked_copy,
    prune_and_evaluate,
    sleeping_mask,
)

log = logging.getLogger(__name__)


def accuracy(model: nn.Module, loader) -> float:
    """Top-1 accuracy of ``model`` over ``loader`` (:func:`~cdi_experiments.modules.evaluate.evaluate`)."""
    return float(evaluate(model, loader)["acc"])


def train_epochs(
    model: nn.Module, dm, optimizer_cfg: dict[str, Any], epochs: int, seed: int
) -> None:
    """Plain training loop (used for fine-tuning pruned copies and lottery-ticket retraining).

    The data order is the datamodule's (a function of seed and epoch), so it is reproducible.
    """
    if epochs <= 0:
        return
    torch.manual_seed(seed)
    opt = optimizer_factory(optimizer_cfg)(model.parameters())
    loader = dm.train_dataloader()
    model.train()
    for epoch in range(epochs):
        sampler = getattr(loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        for x, y in loader:
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
    model.eval()


def export_sleeping_pruned(
    model: nn.Module, plan: InitPlan, threshold: float, paths: RunPaths
) -> None:
    """Save the model with its sleeping weights pruned, masks made permanent (plain tensors,
    loadable with ``weights_only=True``)."""
    mask = sleeping_mask(model, plan, threshold)
    pruned = make_permanent(masked_copy(model.cpu(), mask))
    atomic_torch_save(
        paths.pruned_model,
        {
            "state_dict": pruned.state_dict(),
            "threshold": threshold,
            "sparsity": float(mask.sparsity),
        },
    )


def run_prune_stage(
    model: nn.Module, plan: InitPlan, dm, cfg: DictConfig, paths: RunPaths, loggers=()
) -> pd.DataFrame:
    """Compare pruning criteria on ``model``; write the table (CSV), log it, print it."""
    p = OmegaConf.to_container(cfg.prune, resolve=True)
    opt_cfg = OmegaConf.to_container(cfg.optimizer, resolve=True)
    seed = int(cfg.seed)
    if hasattr(dm, "setup"):  # idempotent: the data is decoded once
        dm.setup("fit")
        dm.setup("test")
    test_loader = dm.test_dataloader()

    def test_acc(m: nn.Module) -> float:
        return accuracy(m, test_loader)

    finetune = None
    if p.get("finetune_epochs", 0) > 0:

        def finetune(m: nn.Module) -> None:
            train_epochs(m, dm, opt_cfg, p["finetune_epochs"], seed)

    retrain = None
    if p.get("rewind", False):

        def retrain(m: nn.Module) -> None:
            train_epochs(m, dm, opt_cfg, p.get("retrain_epochs", 1), seed)

    df = prune_and_evaluate(
        copy.deepcopy(model).cpu(),
        plan,
        test_acc,
        threshold=float(p["threshold"]),
        criteria=tuple(p["criteria"]),
        sparsities=tuple(p.get("sparsities") or ()),
        finetune_fn=finetune,
        retrain_fn=retrain,
        seed=seed,
    )
    atomic_write_csv(paths.prune, df)
    export_sleeping_pruned(model, plan, float(p["threshold"]), paths)
    for lg in loggers:
        if type(lg).__name__ == "WandbLogger":
            lg.log_table(key="prune/results", dataframe=df)
            lg.experiment.summary.update(
                {f"prune/{r.criterion}/{r.target}/acc_after": r.acc_after for r in df.itertuples()}
            )
    print(format_table(df))
    return df


# ----------------------------------------------------------------------------- checkpoints


def load_run(ckpt: Path) -> tuple[nn.Module, InitPlan, DictConfig]:
    """Model, init plan and config from a ``cdi-train`` checkpoint (weights_only load)."""
    try:
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling, zip or EOF errors: not a torch checkpoint we can read
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(
            f"{ckpt} is not a readable checkpoint ({reason}); pass a .ckpt from <run>/checkpoints/"
        ) from None
    callbacks = state.get("callbacks", {}) if isinstance(state, dict) else {}
    cb_state = next(
        (v for k, v in callbacks.items() if k.startswith("DeterministicInitCallback")), None
    )
    if not isinstance(cb_state, dict) or not cb_state.get("plan"):
        raise ValueError(
            f"{ckpt}: no deterministic-init state in this checkpoint; was it written by cdi-train?"
        )
    plan = InitPlan.from_dict(cb_state["plan"])
    recorded = (cb_state.get("identity") or {}).get("fingerprint")
    if recorded and plan.fingerprint() != recorded:
        raise ValueError(
            f"{ckpt}: the initial weights regenerated here differ from the ones the run used "
            "(fingerprint mismatch); use the cdi-experiments version that wrote the checkpoint"
        )
    run_info = ckpt.resolve().parent.parent / "run_info.json"
    hydra_cfg = ckpt.resolve().parent.parent / ".hydra" / "config.yaml"
    if hydra_cfg.exists():
        cfg = OmegaConf.load(hydra_cfg)
    elif run_info.exists():
        cfg = OmegaConf.create(json.loads(run_info.read_text())["config"])
    else:
        raise ValueError(
            f"{ckpt}: cannot find the run's config (.hydra/config.yaml or run_info.json) beside checkpoints/"
        )
    try:
        lit = Classifier.load_from_checkpoint(str(ckpt), map_location="cpu", weights_only=True)
    except (KeyError, TypeError, RuntimeError) as exc:  # no/odd hyper_parameters, state mismatch
        reason = " ".join(str(exc).split())[:200]
        raise ValueError(
            f"{ckpt}: cannot rebuild the model from this checkpoint ({reason})"
        ) from None
    return lit.model, plan, cfg


__all__ = ["accuracy", "export_sleeping_pruned", "load_run", "run_prune_stage", "train_epochs"]
