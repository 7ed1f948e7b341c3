"""Resuming a run: is the checkpoint in its directory one this config can continue?

Resuming is exact: the data order is a function of ``(seed, epoch)``, the optimizer state is in
Lightning's checkpoint, and :class:`~cdi_experiments.lightning.rng.RngState` adds torch's
generator state (dropout), which Lightning does not save. The metrics CSV keeps the rows of the
epochs the checkpoint holds.

A ``trainer=fsdp2`` run may checkpoint into a DCP folder (``last.ckpt/``); it is checked here like
a file, read safely (:func:`~cdi_experiments.run.checkpoint.load_distributed_checkpoint`), before
Lightning loads it (whose DCP reader unpickles the folder's index without restriction). A DCP
save is a swap of folders (:mod:`cdi_experiments.lightning.checkpoint_io`); one a kill left half
done is finished or undone first (:func:`recover_checkpoints`), so a resume always finds the last
complete checkpoint as ``last.ckpt``.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from omegaconf import DictConfig

from cdi_experiments.paths import RunPaths
from cdi_experiments.run.checkpoint import init_state, load_checkpoint
from cdi_experiments.run.lock import is_rank_zero, run_lock
from cdi_experiments.run.schema import ConfigError

log = logging.getLogger(__name__)

# The init callback's identity fields -> the config keys that set them (configs/callbacks).
INIT_KEYS = {
    "seed": "seed",
    "mode": "init.mode",
    "scheme": "init.scheme",
    "params": "init.params",
    "overrides": "init.overrides",
    "layer_ids": "init.layer_ids",
    "biases": "init.biases",
    "zero_mean_conv": "init.zero_mean_conv",
}


def identity_error(exc: Exception) -> ConfigError:
    """An :class:`InitIdentityError` restated with the config keys (one line)."""
    # lazy: the callback module imports Lightning, which --help and config errors skip
    from cdi_experiments.lightning.callback import mismatch_message

    diff = getattr(exc, "diff", None)
    return ConfigError(mismatch_message(diff, INIT_KEYS) if diff else str(exc))


def callback_state(ckpt: dict[str, Any]) -> dict[str, Any]:
    """The :class:`DeterministicInitCallback`'s state in a checkpoint (``{}`` if none)."""
    return init_state(ckpt) or {}


def epochs_done(ckpt: dict[str, Any]) -> int:
    """Epochs whose training a checkpoint holds. (Its ``epoch`` is the epoch index when saved
    at an epoch end, but the count of epochs when saved as training ends.)"""
    try:
        return int(ckpt["loops"]["fit_loop"]["epoch_progress"]["current"]["processed"])
    except (KeyError, TypeError):
        return int(ckpt["epoch"]) + 1


def _diff(theirs: Any, ours: Any, prefix: str) -> str:
    theirs, ours = theirs or {}, ours or {}
    keys = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
    return "; ".join(
        f"{prefix}.{k}: checkpoint {theirs.get(k)!r} vs this run {ours.get(k)!r}" for k in keys
    )


def recover_checkpoints(paths: RunPaths) -> list[str]:
    """Finish or undo the DCP checkpoint swaps a killed ``trainer=fsdp2`` run left half done in
    ``paths.checkpoints``, so that ``last.ckpt`` is the last complete checkpoint
    (:func:`~cdi_experiments.lightning.checkpoint_io.recover_checkpoint_dir`).

    Only rank 0 does it, holding the run lock (ranks 1..N-1 start after it, when rank 0 already
    recovered); nothing is done, and Lightning not imported, unless the checkpoint directory
    holds a hidden entry.

    Returns:
        What was done, one entry per checkpoint (each logged).

    Raises:
        RunLockedError: Another process is writing the run directory (its swap is no leftover).
    """
    directory = paths.checkpoints
    if not is_rank_zero() or not directory.is_dir():
        return []
    if not any(p.name.startswith(".") for p in directory.iterdir()):
        return []
    from cdi_experiments.lightning.checkpoint_io import recover_checkpoint_dir  # lazy: Lightning

    with run_lock(paths.root, "cdi-train"):
        done = recover_checkpoint_dir(directory)
    for line in done:
        log.info("recovered an interrupted checkpoint save: %s", line)
    return done


def check_resume(cfg: DictConfig, run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The checkpoint ``run_dir`` would resume from, after checking it matches ``cfg``.

    Args:
        cfg: The task config (no ``hydra`` node).
        run_dir: The run directory.

    Returns:
        ``None`` for a fresh run (no ``checkpoints/last.ckpt`` or ``resume=false``), else the
        loaded checkpoint.

    Raises:
        CheckpointError: The checkpoint is truncated, unsafe (a pickle that would run code) or
            not a ``cdi-train`` checkpoint (:func:`~cdi_experiments.run.checkpoint.load_checkpoint`).
        ConfigError: The checkpoint's initial weights came from another seed or init config,
            or it holds another model, optimizer, scheduler or data stream (the message names
            each difference).
        RunLockedError: A half-done checkpoint swap is to be recovered while another process
            writes the run directory (:func:`recover_checkpoints`).
    """
    paths = RunPaths(run_dir)
    path = paths.last_ckpt
    if not cfg.resume:
        return None
    recover_checkpoints(paths)
    if not path.exists():
        return None
    # Lightning is imported only here, where a checkpoint exists (not for a fresh run's check).
    from cdi_experiments.lightning.callback import InitIdentityError
    from cdi_experiments.run import build

    ckpt = load_checkpoint(
        path,
        fix="move it away or delete it to start this run over, or pass a new hydra.run.dir",
    )
    # The callback's own check of the identity fields (the fingerprint needs the model, so the
    # callback compares it again when Lightning restores it).
    try:
        build.init_callback(build.build_callbacks(cfg, None)).load_state_dict(callback_state(ckpt))
    except InitIdentityError as exc:
        raise identity_error(exc) from None
    fix = f"resume with the checkpoint's config, or start over in a new run directory ({path})"
    hp = ckpt.get("hyper_parameters", {})
    dm = build.build_datamodule(cfg)
    ours = {
        "model_cfg": build.model_spec(cfg, dm),
        "optimizer": build.optimizer_spec(cfg),
        "scheduler": build.scheduler_spec(cfg),
    }
    for key, name in (
        ("model_cfg", "model"),
        ("optimizer", "optimizer"),
        ("scheduler", "scheduler"),
    ):
        if (hp.get(key) or None) != (ours[key] or None):
            raise ConfigError(f"cannot resume: {_diff(hp.get(key), ours[key], name)}; {fix}")
    dm_state = ckpt.get(type(dm).__qualname__)
    if dm_state is not None:
        try:
            dm.load_state_dict(dm_state)
        except ValueError as exc:
            raise ConfigError(f"cannot resume: {exc}") from None
    return ckpt


__all__ = [
    "INIT_KEYS",
    "callback_state",
    "check_resume",
    "epochs_done",
    "identity_error",
    "recover_checkpoints",
]
