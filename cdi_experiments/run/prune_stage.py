"""The prune-and-evaluate stage: the end of ``cdi-train``, and ``cdi-prune`` on a checkpoint.

:func:`load_run` reloads a ``cdi-train`` checkpoint (the one safe loader,
:func:`~cdi_experiments.run.checkpoint.load_checkpoint`), takes the config stored in it, and
regenerates the initial weights from the identity stored in it (no copy of them is stored
anywhere); :func:`run_prune_stage` compares the pruning criteria. Fine-tuning uses the run's own
optimizer config (``cfg.optimizer``), and every accuracy comes from
:func:`cdi_experiments.modules.evaluate.evaluate`.

:func:`prune_checkpoint` is ``cdi-prune``: each invocation writes its own
``<run>/prune/<arguments>-<hash8>/`` (:func:`invocation_name`), never the training run's files,
and the same invocation again is skipped once its ``DONE`` marker is written.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from cdi_experiments.lightning.classifier import Classifier, optimizer_factory
from cdi_experiments.lightning.dashboards import log_prune_results
from cdi_experiments.modules import InitPlan
from cdi_experiments.modules.evaluate import evaluate
from cdi_experiments.paths import (
    CHECKPOINT_DIR,
    LAST_CKPT,
    PRUNE_CSV,
    PRUNE_DIR,
    PRUNE_DONE,
    PRUNE_INVOCATION,
    PRUNED_MODEL,
    RUN_INFO_JSON,
    RunPaths,
    atomic_torch_save,
    atomic_write_csv,
    atomic_write_text,
    is_dcp_folder,
    remove_stale_temps,
)
from cdi_experiments.pruning import (
    format_table,
    make_permanent,
    masked_copy,
    prune_and_evaluate,
    sleeping_mask,
)
from cdi_experiments.run.build import build_datamodule
from cdi_experiments.run.checkpoint import (
    CheckpointError,
    checkpoint_config,
    checkpoint_sha256,
    init_state,
    load_checkpoint,
    read_checkpoint_bytes,
)
from cdi_experiments.run.lock import run_lock
from cdi_experiments.run.schema import TrainConfig, check_config, one_line, plain

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
    log_prune_results(loggers, df)  # W&B table + summary, TensorBoard text
    print(format_table(df))
    return df


# ----------------------------------------------------------------------------- checkpoints

# The config keys a checkpoint and the run directory's .hydra/config.yaml must agree on.
IDENTITY_KEYS = ("model", "data", "init", "seed")
_CKPT_FIX = "pass a .ckpt that cdi-train wrote, from <run>/checkpoints/"


def run_root(ckpt: Path) -> Path:
    """The run directory of a checkpoint: ``<run>`` for ``<run>/checkpoints/x.ckpt``, else the
    checkpoint's own folder."""
    parent = Path(ckpt).absolute().parent
    return parent.parent if parent.name == CHECKPOINT_DIR else parent


def load_run(ckpt: Path, data: bytes | None = None) -> tuple[nn.Module, InitPlan, DictConfig]:
    """Model, init plan and config from a ``cdi-train`` checkpoint (weights-only load).

    The config is the one stored in the checkpoint (``cdi.config``). If the run directory also
    has a ``.hydra/config.yaml``, the two must agree on the model, data, init and seed: a
    checkpoint copied into another run's directory is refused, not evaluated on the wrong data.
    Older checkpoints without a stored config fall back to that file (or ``run_info.json``),
    with a warning.

    Args:
        ckpt: The checkpoint file, or DCP folder (``trainer=fsdp2``).
        data: A file's bytes, if already read.

    Raises:
        CheckpointError: The file is not a safe, readable ``cdi-train`` checkpoint, its initial
            weights cannot be regenerated, or its config disagrees with the run directory's.
    """
    ckpt = Path(ckpt)
    state = load_checkpoint(ckpt, fix=_CKPT_FIX, data=data)
    cb_state = init_state(state)
    plan = InitPlan.from_dict(cb_state["plan"])
    recorded = (cb_state.get("identity") or {}).get("fingerprint")
    if recorded and plan.fingerprint() != recorded:
        raise CheckpointError(
            f"{ckpt}: the initial weights regenerated here differ from the ones the run used "
            "(fingerprint mismatch); use the cdi-experiments version that wrote the checkpoint"
        )
    cfg = _run_config(ckpt, state)
    hp = state.get("hyper_parameters") or {}
    try:
        lit = Classifier(
            model_cfg=hp.get("model_cfg") or plain(cfg.model),
            optimizer=hp.get("optimizer"),
            scheduler=hp.get("scheduler"),
        )
        lit.load_state_dict(state["state_dict"])
    except Exception as exc:  # a model class that is gone, or weights of another shape
        raise CheckpointError(
            f"{ckpt}: cannot rebuild the model from this checkpoint ({one_line(exc)[:200]}); "
            "use the code version that wrote it"
        ) from None
    return lit.model, plan, cfg


def _run_config(ckpt: Path, state: dict[str, Any]) -> DictConfig:
    stored = checkpoint_config(state)
    root = run_root(ckpt)
    neighbour = root / ".hydra" / "config.yaml"
    if neighbour.is_file():
        _check_neighbour(ckpt, _checkpoint_facts(state, stored), neighbour, complete=bool(stored))
    if stored is not None:
        return OmegaConf.create(stored)
    if neighbour.is_file():
        log.warning(
            "%s holds no config (written before checkpoints carried one); using %s beside it",
            ckpt,
            neighbour,
        )
        return _load_yaml(neighbour)
    info = root / RUN_INFO_JSON
    if info.is_file():
        log.warning(
            "%s holds no config (written before checkpoints carried one); using the one in %s",
            ckpt,
            info,
        )
        try:
            return OmegaConf.create(json.loads(info.read_text())["config"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{info} is unreadable ({one_line(exc)[:120]})") from None
    raise CheckpointError(
        f"{ckpt} holds no config and there is no .hydra/config.yaml or {RUN_INFO_JSON} in "
        f"{root}; {_CKPT_FIX}"
    )


def _load_yaml(path: Path) -> DictConfig:
    try:
        return OmegaConf.load(path)
    except Exception as exc:  # yaml errors, unreadable file
        raise CheckpointError(
            f"{path} is unreadable ({one_line(exc)[:120]}); restore or remove it"
        ) from None


def _flat(node: Any, prefix: str) -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for k, v in node.items():
            out.update(_flat(v, f"{prefix}.{k}"))
        return out or {prefix: {}}
    return {prefix: node}


def _plain_key(cfg: DictConfig, key: str) -> Any:
    node = cfg.get(key)
    if not OmegaConf.is_config(node):
        return node
    try:
        return OmegaConf.to_container(node, resolve=True)
    except Exception:  # an interpolation that needs a running Hydra job: compare it raw
        return OmegaConf.to_container(node, resolve=False)


def _checkpoint_facts(state: dict[str, Any], stored: dict[str, Any] | None) -> dict[str, Any]:
    """The checkpoint's model, data, init and seed as flat ``key: value``: all of them from its
    stored config, else (older checkpoints) what its model and data states record."""
    if stored is not None:
        facts: dict[str, Any] = {}
        for key in IDENTITY_KEYS:
            facts.update(_flat(stored.get(key), key))
        return facts
    facts = {}
    target = ((state.get("hyper_parameters") or {}).get("model_cfg") or {}).get("_target_")
    if target:
        facts["model._target_"] = target
    dm_state = state.get("ImageDataModule")
    if isinstance(dm_state, dict):
        for key in ("name", "limit", "val_size", "split_seed"):
            if key in dm_state:
                facts[f"data.{key}"] = dm_state[key]
        if "seed" in dm_state:
            facts["seed"] = dm_state["seed"]
    return facts


def _check_neighbour(ckpt: Path, facts: dict[str, Any], neighbour: Path, complete: bool) -> None:
    """Refuse a checkpoint whose model, data, init or seed differ from ``neighbour``'s.

    The message shows the first differing key of each of model, data, init and seed
    (``_target_`` and ``name`` first: what tells the runs apart), then how many more differ.
    """
    theirs: dict[str, Any] = {}
    loaded = _load_yaml(neighbour)
    for key in IDENTITY_KEYS:
        theirs.update(_flat(_plain_key(loaded, key), key))
    keys = set(facts) | set(theirs) if complete else set(facts)
    differ = [k for k in keys if facts.get(k) != theirs.get(k)]
    if not differ:
        return

    def order(k: str) -> tuple:
        group = k.split(".")[0]
        leaf = k.rsplit(".", 1)[-1]
        return (IDENTITY_KEYS.index(group), leaf not in ("_target_", "name"), k)

    shown: dict[str, str] = {}
    for k in sorted(differ, key=order):
        shown.setdefault(k.split(".")[0], f"{k}: {facts.get(k)!r} vs {theirs.get(k)!r}")
    more = len(differ) - len(shown)
    raise CheckpointError(
        f"{ckpt} was trained with another config than {neighbour}: "
        f"{'; '.join(shown.values())}{f' (+{more} more)' if more else ''} (checkpoint vs "
        "file); put the checkpoint back in its own run directory, or copy it to a folder of "
        "its own"
    )


# ----------------------------------------------------------------------------- cdi-prune

# The order of the arguments in a prune directory's name.
PRUNE_ARGS = ("threshold", "criteria", "sparsities", "finetune_epochs", "rewind", "retrain_epochs")
_NAME_CHARS = re.compile(r"[^A-Za-z0-9_.=+,-]+")
_MAX_NAME = 80


@dataclass
class PruneOutcome:
    """Where one ``cdi-prune`` invocation's results are, and whether they were already there."""

    out: Path
    skipped: bool  # True: the same invocation had finished before; nothing was recomputed
    table: pd.DataFrame | None = None

    @property
    def results(self) -> Path:
        return RunPaths(self.out).prune


def invocation_key(checkpoint_sha256: str, overrides: dict[str, Any]) -> str:
    """The sha256 that identifies an invocation: the checkpoint's bytes and the arguments."""
    text = json.dumps({"checkpoint_sha256": checkpoint_sha256, "prune": overrides}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def invocation_name(ckpt: Path, overrides: dict[str, Any], key: str) -> str:
    """``<args>-<hash8>``: a ``prune/`` subdirectory name readable from the arguments.

    The arguments given on the command line, in :data:`PRUNE_ARGS` order (``defaults`` if none;
    lists joined with ``+``; ``ckpt=<stem>`` first for another checkpoint than ``last.ckpt``),
    then the first 8 hex digits of :func:`invocation_key`, which also covers the checkpoint's
    bytes: pruning ``last.ckpt`` again after more training gets a new directory.

    >>> invocation_name(Path("last.ckpt"), {"sparsities": [0.5], "rewind": True}, "1a2b3c4d99")
    'sparsities=0.5,rewind=true-1a2b3c4d'
    """

    def show(value: Any) -> str:
        if isinstance(value, bool):
            return str(value).lower()
        if isinstance(value, (list, tuple)):
            return "+".join(show(v) for v in value)
        if isinstance(value, float):
            return f"{value:g}"
        return str(value)

    parts = [] if Path(ckpt).name == LAST_CKPT else [f"ckpt={Path(ckpt).stem}"]
    parts += [f"{k}={show(overrides[k])}" for k in PRUNE_ARGS if k in overrides]
    readable = _NAME_CHARS.sub("_", ",".join(parts) or "defaults")[:_MAX_NAME]
    return f"{readable}-{key[:8]}"


def _invocation(out: Path) -> dict[str, Any] | None:
    try:
        return json.loads((out / PRUNE_INVOCATION).read_text())
    except (OSError, ValueError):
        return None


def _is_done(out: Path, key: str) -> bool:
    """``out`` holds the finished results of the invocation ``key``."""
    record = _invocation(out)
    return (out / PRUNE_DONE).is_file() and record is not None and record.get("key") == key


def _check_out(out: Path, key: str, explicit: bool) -> None:
    """Refuse an output directory holding results this invocation did not write."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; pass a directory")
    if not out.is_dir():
        return
    record = _invocation(out)
    flag = "--out " if explicit else ""
    if record is not None and record.get("key") != key:
        raise ValueError(
            f"{flag}{out} holds the results of another cdi-prune invocation "
            f"({record.get('checkpoint')} {record.get('arguments')}); results are never "
            "overwritten: pass another --out"
        )
    if record is None:
        theirs = [n for n in (PRUNE_CSV, PRUNED_MODEL) if (out / n).exists()]
        if theirs:
            raise ValueError(
                f"{flag}{out} already holds {', '.join(theirs)} that cdi-prune did not write "
                "there (a training run's?); results are never overwritten: pass an empty or "
                "new --out, or leave --out out (results go to <run>/prune/<name>/)"
            )


def prune_checkpoint(
    ckpt: Path, overrides: dict[str, Any], out: Path | None = None
) -> PruneOutcome:
    """``cdi-prune``'s work: prune a checkpoint into a directory of its own, once.

    Every invocation writes its own directory, ``<run>/prune/<name>/``
    (:func:`invocation_name`), or ``out``: ``invocation.json`` first (which checkpoint and
    arguments), then ``prune_results.csv`` and ``pruned_sleeping.pt``, then ``DONE``. Nothing
    is ever overwritten: the same invocation again finds ``DONE`` and returns at once
    (``skipped``); one killed half-way (no ``DONE``) is redone; an ``out`` that holds other
    results is refused. The output directory is locked while it is written (a second process
    gets one line naming the first one's PID). The run directory itself is not locked:
    checkpoints are written atomically, so a ``cdi-train`` still training the same run cannot
    show a half-written one; this reads whichever complete ``last.ckpt`` is there.

    Args:
        ckpt: A ``cdi-train`` checkpoint: a file, or the DCP folder ``trainer=fsdp2`` writes
            with ``save_distributed_checkpoint=true``.
        overrides: ``prune.*`` values from the command line (the rest: the run's config).
        out: The output directory; ``None``: ``<run>/prune/<name>/``.

    Raises:
        CheckpointError: The checkpoint is a directory, missing, unsafe, truncated, foreign,
            or disagrees with its run directory's config.
        ValueError: ``out`` holds other results or is a file; a config value that cannot work.
    """
    ckpt = Path(ckpt)
    # a file is read once (hashed, then loaded); a DCP folder (trainer=fsdp2) file by file
    data = None if is_dcp_folder(ckpt) else read_checkpoint_bytes(ckpt)
    digest = hashlib.sha256(data).hexdigest() if data is not None else checkpoint_sha256(ckpt)
    key = invocation_key(digest, overrides)
    explicit = out is not None
    out = (
        Path(out)
        if explicit
        else run_root(ckpt) / PRUNE_DIR / invocation_name(ckpt, overrides, key)
    )
    if _is_done(out, key):
        return PruneOutcome(out, skipped=True)
    _check_out(out, key, explicit)
    model, plan, cfg = load_run(ckpt, data)
    cfg = OmegaConf.merge(
        OmegaConf.structured(TrainConfig), cfg, {"prune": {**overrides, "enabled": True}}
    )
    check_config(cfg)
    dm = build_datamodule(cfg)
    with run_lock(out, "cdi-prune"):
        if _is_done(out, key):  # another process finished it while this one loaded
            return PruneOutcome(out, skipped=True)
        for stale in remove_stale_temps(out):  # a killed cdi-prune's half-written file
            log.info("removed %s, left by an interrupted write", stale)
        _check_out(out, key, explicit)
        dm.setup("fit")  # the data is checked (and decoded) before anything is written
        dm.setup("test")
        record = {
            "command": "cdi-prune",
            "key": key,
            "checkpoint": str(ckpt.absolute()),
            "arguments": overrides,
            "argv": sys.argv,
        }
        atomic_write_text(out / PRUNE_INVOCATION, json.dumps(record, indent=2) + "\n")
        (out / PRUNE_DONE).unlink(missing_ok=True)
        table = run_prune_stage(model, plan, dm, cfg, RunPaths(out))
        atomic_write_text(out / PRUNE_DONE, f"{key}\n")  # last: the results are complete
    return PruneOutcome(out, skipped=False, table=table)


__all__ = [
    "IDENTITY_KEYS",
    "PRUNE_ARGS",
    "PruneOutcome",
    "accuracy",
    "export_sleeping_pruned",
    "invocation_key",
    "invocation_name",
    "load_run",
    "prune_checkpoint",
    "run_prune_stage",
    "run_root",
    "train_epochs",
]
