"""The prune-and-evaluate stage (end of ``cdi-train``) and the standalone ``cdi-prune``.

``cdi-prune CKPT`` reloads a ``cdi-train`` checkpoint, regenerates the initial weights from
the identity stored in it (no copy of them is stored anywhere) and runs the same comparison.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from cdi_experiments.modules import InitPlan
from cdi_experiments.paths import (
    OneLineArgumentParser,
    RunPaths,
    atomic_torch_save,
    atomic_write_csv,
)

log = logging.getLogger(__name__)


def make_optimizer(params, cfg: dict[str, Any]) -> torch.optim.Optimizer:
    """The optimizer a config names (same mapping as the LightningModule's)."""
    from cdi_experiments.lightning.classifier import build_optimizer

    return build_optimizer(params, cfg)


@torch.no_grad()
def accuracy(model: nn.Module, loader) -> float:
    """Top-1 accuracy of ``model`` over ``loader`` (eval mode, exact count)."""
    was = model.training
    model.eval()
    correct = total = 0
    for x, y in loader:
        correct += int((model(x).argmax(dim=1) == y).sum())
        total += int(y.numel())
    model.train(was)
    return correct / max(1, total)


def train_epochs(
    model: nn.Module, dm, optimizer_cfg: dict[str, Any], epochs: int, seed: int
) -> None:
    """Plain training loop (used for fine-tuning pruned copies and lottery-ticket retraining).

    The data order is the datamodule's (a function of seed and epoch), so it is reproducible.
    """
    if epochs <= 0:
        return
    torch.manual_seed(seed)
    opt = make_optimizer(model.parameters(), optimizer_cfg)
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
    from cdi_experiments.pruning import make_permanent, masked_copy, sleeping_mask

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
    from cdi_experiments.pruning import format_table, prune_and_evaluate

    p = OmegaConf.to_container(cfg.prune, resolve=True)
    opt_cfg = OmegaConf.to_container(cfg.optimizer, resolve=True)
    seed = int(cfg.seed)
    if hasattr(dm, "setup"):  # idempotent: the data is decoded once
        dm.setup("fit")
        dm.setup("test")
    test_loader = dm.test_dataloader()

    def evaluate(m: nn.Module) -> float:
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
        evaluate,
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


# ----------------------------------------------------------------------------- cdi-prune


def load_run(ckpt: Path) -> tuple[nn.Module, InitPlan, DictConfig]:
    """Model, init plan and config from a ``cdi-train`` checkpoint (weights_only load)."""
    from cdi_experiments.lightning.classifier import Classifier

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


def _parse_list(text: str, what: str) -> list[str]:
    items = [t.strip() for t in text.split(",")]
    if not all(items):
        raise ValueError(f"--{what} {text!r} has an empty item; write e.g. --{what} a,b")
    return items


def _check_args(args: argparse.Namespace) -> dict[str, Any]:
    """Validate the command line before anything is loaded; return the prune overrides."""
    from cdi_experiments.pruning import criterion_names

    overrides: dict[str, Any] = {}
    if args.threshold is not None:
        if not (math.isfinite(args.threshold) and args.threshold >= 0):
            raise ValueError(f"--threshold {args.threshold} must be a finite number >= 0")
        overrides["threshold"] = args.threshold
    if args.criteria is not None:
        crits = _parse_list(args.criteria, "criteria")
        unknown = [c for c in crits if c not in criterion_names()]
        if unknown:
            raise ValueError(
                f"--criteria: unknown criterion {', '.join(map(repr, unknown))}; "
                f"choose from {', '.join(criterion_names())}"
            )
        overrides["criteria"] = crits
    if args.sparsities is not None:
        fractions = []
        for text in _parse_list(args.sparsities, "sparsities"):
            try:
                f = float(text)
            except ValueError:
                f = math.nan
            if not 0 < f < 1:
                raise ValueError(
                    f"--sparsities: {text!r} is not a fraction in (0, 1); write e.g. 0.5,0.9"
                )
            fractions.append(f)
        overrides["sparsities"] = fractions
    for key in ("finetune_epochs", "retrain_epochs"):
        value = getattr(args, key)
        if value is not None:
            if value < 0:
                raise ValueError(f"--{key.replace('_', '-')} must be >= 0, got {value}")
            overrides[key] = value
    if args.rewind:
        overrides["rewind"] = True
    if not args.checkpoint.is_file():
        raise ValueError(
            f"checkpoint {args.checkpoint} does not exist; pass a .ckpt from <run>/checkpoints/"
        )
    if args.out is not None and args.out.exists() and not args.out.is_dir():
        raise ValueError(f"--out {args.out} is a file; pass a directory")
    return overrides


def main(argv: list[str] | None = None) -> int:
    """``cdi-prune CKPT [--criteria ...] [--sparsities ...] [--out DIR]``; returns the exit code.

    Writes ``prune_results.csv`` to the run directory (or ``--out``) and prints the table.
    Bad input gives one ``cdi-prune: error: ...`` line on stderr and exit code 2, and writes
    nothing.
    """
    parser = OneLineArgumentParser(
        prog="cdi-prune",
        description="Prune a cdi-train checkpoint and compare criteria. Defaults come from the "
        "run's own config; the initial weights are regenerated from the checkpoint's identity.",
    )
    parser.add_argument("checkpoint", type=Path, help="a cdi-train checkpoint (.ckpt)")
    parser.add_argument(
        "--threshold", type=float, default=None, help="sleeping threshold (default: the run's)"
    )
    parser.add_argument(
        "--criteria", default=None, help="comma-separated criteria (default: the run's)"
    )
    parser.add_argument(
        "--sparsities", default=None, help="comma-separated target sparsities in (0, 1)"
    )
    parser.add_argument(
        "--finetune-epochs", type=int, default=None, help="fine-tune each pruned copy (masks kept)"
    )
    parser.add_argument(
        "--rewind", action="store_true", help="also rewind survivors to w0 and retrain"
    )
    parser.add_argument(
        "--retrain-epochs", type=int, default=None, help="epochs of lottery-ticket retraining"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="output directory (default: the run directory)"
    )
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # usage errors (one line, exit 2) and --help (exit 0)
        return int(exc.code or 0)
    try:
        overrides = _check_args(args)
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        model, plan, cfg = load_run(args.checkpoint)
        cfg = OmegaConf.merge(cfg, {"prune": {**overrides, "enabled": True}})
        from cdi_experiments.run.schema import check_config
        from cdi_experiments.run.train import build_datamodule

        check_config(cfg)
        out = RunPaths(args.out or args.checkpoint.resolve().parent.parent)
        out.root.mkdir(parents=True, exist_ok=True)
        dm = build_datamodule(cfg)
        run_prune_stage(model, plan, dm, cfg, out)
        print(f"prune table: {out.prune}")
    except ValueError as exc:
        message = " ".join(str(exc).split())  # one line, whatever the exception said
        print(f"cdi-prune: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
