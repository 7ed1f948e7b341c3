"""Validation of the composed config before any training starts.

Every message names the key, the bad value and the allowed values, in one line.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from cdi_experiments.generator import schemes

OPTIMIZERS = ("adam", "adamw", "sgd")
LOGGERS = ("csv", "tensorboard", "wandb")
WANDB_MODES = ("offline", "online", "disabled")
LAYER_ID_MODES = ("name", "index")
MODELS = ("mlp", "mlp_dropout", "cnn", "attention")
DATASETS = ("mnist", "fashion_mnist")
PRUNE_CRITERIA = ("sleeping", "magnitude", "movement", "magnitude_increase", "random")
GROUPS = (
    "data",
    "model",
    "init",
    "tracking",
    "prune",
    "optimizer",
    "trainer",
    "logger",
    "launcher",
    "experiment",
)


class ConfigError(ValueError):
    """A config value that cannot work; raised before training starts."""


def _fail(key: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"{key}={value!r} is not allowed; {allowed}")


def _choice(key: str, value: Any, allowed: Iterable[str]) -> None:
    allowed = tuple(allowed)
    if value not in allowed:
        _fail(key, value, f"choose one of: {', '.join(allowed)}")


def _int(key: str, value: Any, minimum: int, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        _fail(key, value, f"use an integer >= {minimum}" + (" or null" if allow_none else ""))


def _number(
    key: str, value: Any, low: float, high: float | None = None, *, open_low: bool = False
) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        ok = (value > low if open_low else value >= low) and (high is None or value <= high)
        ok = ok and value == value  # not NaN
    if not ok:
        lo = f"> {low}" if open_low else f">= {low}"
        _fail(key, value, f"use a number {lo}" + (f" and <= {high}" if high is not None else ""))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value


def _bool(key: str, value: Any) -> None:
    if not isinstance(value, bool):
        _fail(key, value, "use true or false")


def _scheme(key: str, value: Any) -> None:
    if value != "lsuv":
        try:
            schemes.get(value)
        except ValueError:
            _fail(key, value, f"choose one of: {', '.join(schemes.names())}, lsuv")


def check_config(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` on the first value that cannot work."""
    c = OmegaConf.to_container(cfg, resolve=True)
    _int("seed", c.get("seed"), 0)
    for key in ("resume", "test_after_fit", "deterministic"):
        _bool(key, c.get(key))
    run_dir = c.get("run_dir")
    if run_dir is not None and (not isinstance(run_dir, (str, os.PathLike)) or not str(run_dir)):
        _fail("run_dir", run_dir, "use a directory path or null (null: Hydra's run directory)")
    extra = c.get("extra_callbacks") or {}
    if not isinstance(extra, dict):
        _fail("extra_callbacks", extra, "use a mapping {name: {_target_: module.Class}}")
    for name, spec in extra.items():
        if not isinstance(spec, dict) or not isinstance(spec.get("_target_"), str):
            _fail(
                f"extra_callbacks.{name}",
                spec,
                f"use {{_target_: module.Class, ...}}, e.g. +extra_callbacks.{name}._target_="
                "cdi_experiments.run.train.RankInitFingerprint",
            )
    d = c["data"]
    _choice("data.name", d.get("name"), DATASETS)
    _int("data.batch_size", d.get("batch_size"), 1)
    _int("data.eval_batch_size", d.get("eval_batch_size"), 1)
    _int("data.val_size", d.get("val_size"), 0)
    _int("data.limit", d.get("limit"), 1, allow_none=True)
    _choice("model.name", c["model"].get("name"), MODELS)
    i = c["init"]
    _scheme("init.scheme", i.get("scheme"))
    _choice("init.layer_ids", i.get("layer_ids", "name"), LAYER_ID_MODES)
    for layer, ov in (i.get("overrides") or {}).items():
        _scheme(f"init.overrides.{layer}", ov["scheme"] if isinstance(ov, dict) else ov)
    t = c["tracking"]
    ths = t.get("thresholds")
    if not isinstance(ths, list) or not ths:
        _fail("tracking.thresholds", ths, "use a non-empty list of numbers >= 0, e.g. [0, 1e-5]")
    for k, th in enumerate(ths):
        _number(f"tracking.thresholds[{k}]", th, 0.0)
    _int("tracking.every_n_epochs", t.get("every_n_epochs", 1), 1)
    p = c["prune"]
    _number("prune.threshold", p.get("threshold"), 0.0)
    for k, crit in enumerate(p.get("criteria") or []):
        _choice(f"prune.criteria[{k}]", crit, PRUNE_CRITERIA)
    for k, s in enumerate(p.get("sparsities") or []):
        if not _is_number(s) or not 0.0 < s < 1.0:
            _fail(f"prune.sparsities[{k}]", s, "use fractions in (0, 1), e.g. [0.5, 0.9]")
    _int("prune.finetune_epochs", p.get("finetune_epochs", 0), 0)
    _int("prune.retrain_epochs", p.get("retrain_epochs", 0), 0)
    o = c["optimizer"]
    _choice("optimizer.name", o.get("name"), OPTIMIZERS)
    _number("optimizer.lr", o.get("lr"), 0.0, open_low=True)
    _number("optimizer.weight_decay", o.get("weight_decay", 0.0), 0.0)
    tr = c["trainer"]
    _int("trainer.max_epochs", tr.get("max_epochs"), 1)
    if str(tr.get("strategy", "")).startswith("fsdp") and tr.get("accelerator") == "cpu":
        _fail(
            "trainer.accelerator",
            "cpu",
            "Lightning runs strategy 'fsdp' on GPUs only: use trainer.accelerator=gpu, "
            "or trainer=ddp on CPU",
        )
    lg = c.get("logger") or {}
    for name in lg:
        _choice("logger", name, LOGGERS)
    if "wandb" in lg:
        _choice("logger.wandb.mode", (lg["wandb"] or {}).get("mode", "offline"), WANDB_MODES)


_GROUP_ARG = re.compile(r"^(?P<prefix>[+~]{0,2})(?P<group>[a-z_]+)=(?P<value>.*)$")


def check_group_overrides(argv: Sequence[str], config_dir: str) -> None:
    """Check ``group=option`` command-line overrides against the files in ``configs/``.

    Hydra's own message for a typo spans many lines; this one names the group and its options.
    Sweep values (``init=zeros,ones``) are checked one by one; sweep functions are left to Hydra.
    """
    root = Path(config_dir)
    for arg in argv:
        m = _GROUP_ARG.match(arg)
        if not m or m["group"] not in GROUPS or m["prefix"].startswith("~"):
            continue
        value = m["value"]
        if "(" in value or value in ("null", ""):
            continue
        options = sorted(p.stem for p in (root / m["group"]).glob("*.yaml"))
        for v in value.split(","):
            if v not in options:
                raise ConfigError(
                    f"{m['group']}={v!r} is not a config option; choose one of: {', '.join(options)}"
                )
