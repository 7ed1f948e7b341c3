"""The one config schema of ``cdi-train``, checked once, before anything is written.

Two kinds of groups:

* **fixed-shape** groups (``init``, ``tracking``, ``prune``) and the top-level keys are
  structured configs (the dataclasses below, registered in Hydra's ConfigStore as
  ``train_schema``): Hydra refuses an unknown key or a value of the wrong type while it composes,
  and the dataclasses hold the defaults, so the YAML files hold only differences;
* **open** groups (``data``, ``model``, ``optimizer``, ``scheduler``, ``trainer``, ``logger``,
  ``callbacks``) name a ``_target_`` and their keys are its constructor's arguments: they are
  checked against its signature (:func:`target_signature`, which reads a module's source with
  ``ast`` rather than importing it, so that checking a ``pytorch_lightning`` class does not cost
  Lightning's import time), with a did-you-mean.

:func:`check_config` then checks ranges and cross-field rules, with the allowed values taken
from the live registries (:func:`cdi_experiments.generator.schemes.names`,
:func:`cdi_experiments.pruning.criterion_names`). Every failure is a :class:`ConfigError` whose
message is one line naming the key, the value and what is allowed.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib
import importlib.util
import inspect
import math
import numbers
import os
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.types import IntervalSweep, Override
from omegaconf import MISSING, DictConfig, OmegaConf, open_dict

from cdi_experiments.generator import schemes

# The groups of configs/ (every option is a file there).
GROUPS = (
    "data",
    "model",
    "optimizer",
    "scheduler",
    "init",
    "tracking",
    "prune",
    "trainer",
    "logger",
    "callbacks",
    "launcher",
    "experiment",
)
SEED_LIMIT = 2**64  # the generator's seeds: 0 <= seed < 2**64
LAYER_ID_MODES = ("name", "index")
INIT_MODES = ("generate", "record")
LOG_PER = ("parameter", "type", "total", "auto")
# Lightning's accelerators that this package's environments can run (tpu/hpu need plugins).
ACCELERATORS = ("auto", "cpu", "cuda", "gpu", "mps")
# MNIST and FashionMNIST: images in the training file (ImageDataModule checks the same bound).
TRAIN_IMAGES = 60000
IMAGE_DATAMODULE = "cdi_experiments.lightning.datamodule.ImageDataModule"
TRAINER = "pytorch_lightning.Trainer"
MODEL_PARALLEL = "pytorch_lightning.strategies.ModelParallelStrategy"


class ConfigError(ValueError):
    """A config value that cannot work; raised before training starts."""


# ----------------------------------------------------------------------------- structured configs


@dataclass
class InitConfig:
    """``init``: how the initial weights are made (the callback's init arguments)."""

    scheme: str = "he"
    params: dict[str, Any] = field(default_factory=dict)
    overrides: dict[str, Any] = field(default_factory=dict)  # per layer, e.g. {fc1: zeros}
    layer_ids: str = "name"  # name: stable ids from parameter names; index: 0, 1, 2, ...
    biases: bool = True  # zeros unless the scheme draws its own (torch_default)
    zero_mean_conv: bool = False
    lsuv_batch_size: int = 256
    mode: str = "generate"  # generate: replace the model's init; record: keep and record it


@dataclass
class TrackingConfig:
    """``tracking``: which weights moved from their initial values, per epoch."""

    thresholds: list[float] = field(
        default_factory=lambda: [0.0, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2]  # 0 = exactly unchanged
    )
    track_biases: bool = True
    every_n_epochs: int = 1
    quantiles: list[float] = field(default_factory=lambda: [0.1, 0.25, 0.5, 0.75, 0.9, 0.99])
    histograms: bool = True
    log_per: str = "auto"  # parameter | type | total | auto


@dataclass
class PruneConfig:
    """``prune``: the pruning comparison after training."""

    enabled: bool = True
    threshold: float = 1e-5  # sleeping = |w - w0| <= threshold
    criteria: list[str] = field(
        default_factory=lambda: [
            "sleeping",
            "magnitude",
            "movement",
            "magnitude_increase",
            "random",
        ]
    )
    sparsities: list[float] = field(default_factory=lambda: [0.5, 0.8, 0.9])
    finetune_epochs: int = 0  # > 0: fine-tune each pruned copy (masks kept)
    rewind: bool = False  # lottery-ticket rewind of survivors to w0, then retrain
    retrain_epochs: int = 1


@dataclass
class TrainConfig:
    """The whole ``cdi-train`` config. Open groups are ``Any``: their ``_target_`` decides."""

    seed: int = MISSING
    run_name: str = MISSING
    resume: bool = MISSING
    test_after_fit: bool = MISSING
    run_dir: str | None = None
    # The metric a sweeper optimises (cdi-train returns its last value): a validation metric,
    # never a test one. Optuna's direction is hydra.sweeper.direction (maximize for val/acc).
    objective: str = "val/acc"
    data: Any = MISSING
    model: Any = MISSING
    optimizer: Any = MISSING
    scheduler: Any = None
    init: InitConfig = field(default_factory=InitConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    trainer: Any = MISSING
    logger: Any = None
    callbacks: Any = None


def register() -> None:
    """Register :class:`TrainConfig` as ``train_schema`` (``configs/train.yaml`` starts from it)
    and the ``cdi.model_name`` resolver. Idempotent; done when this module is imported."""
    ConfigStore.instance().store(name="train_schema", node=TrainConfig)
    if not OmegaConf.has_resolver("cdi.model_name"):
        OmegaConf.register_new_resolver("cdi.model_name", model_name)


def short_name(target: Any) -> str:
    """``"cdi_experiments.models.MLP" -> "mlp"``: a class path's last part, lower case (run names).

    >>> short_name("mypkg.nets.TinyNet")
    'tinynet'
    """
    return str(target).rsplit(".", 1)[-1].lower()


def model_name(target: Any) -> str:
    """A run's model label: the ``model`` group option it was composed with (``mlp``,
    ``mlp_dropout``...), else (``model=custom``, or no Hydra job) :func:`short_name` of its
    ``_target_``. Used in run names and in ``run_info.json``."""
    if HydraConfig.initialized():
        choice = HydraConfig.get().runtime.choices.get("model")
        if choice and choice != "custom":
            return str(choice)
    return short_name(target)


register()


# ----------------------------------------------------------------------------- signatures


@dataclass(frozen=True)
class Signature:
    """A constructor's keyword arguments, and whether it takes any (``**kwargs``)."""

    target: str
    names: tuple[str, ...]
    var_keyword: bool

    def takes(self, name: str) -> bool:
        return self.var_keyword or name in self.names


def _module_file(module: str) -> Path | None:
    """The source file of ``module`` found without importing it (nor its parent packages)."""
    top, *rest = module.split(".")
    spec = importlib.util.find_spec(top) if top not in sys.modules else None
    if spec is None:
        mod = sys.modules.get(top)
        locations = list(getattr(mod, "__path__", []) or [])
        origin = getattr(mod, "__file__", None)
    else:
        locations = list(spec.submodule_search_locations or [])
        origin = spec.origin
    if not rest:
        return Path(origin) if origin and str(origin).endswith(".py") else None
    for base in locations:
        path = Path(base, *rest)
        for candidate in (path.with_suffix(".py"), path / "__init__.py"):
            if candidate.is_file():
                return candidate
    return None


def _ast_signature(module: str, name: str, depth: int = 0) -> Signature | None:
    """``module.name``'s ``__init__`` arguments read from source; follows re-exports
    (``from .x import name``) and a base class defined in the same file. None: not found."""
    path = _module_file(module) if module else None
    if path is None or depth > 6:
        return None
    tree = ast.parse(path.read_text(encoding="utf-8"))
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
    if name in classes:
        cls = classes[name]
        while True:
            init = next(
                (n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "__init__"),
                None,
            )
            if init is not None:
                a = init.args
                names = [x.arg for x in [*a.posonlyargs, *a.args, *a.kwonlyargs]][1:]
                return Signature(f"{module}.{name}", tuple(names), a.kwarg is not None)
            bases = [b.id for b in cls.bases if isinstance(b, ast.Name)]
            if not cls.bases:
                return Signature(f"{module}.{name}", (), False)  # object's: no arguments
            if not bases:
                return None  # a base we cannot follow (e.g. a.B): import to know
            if bases[0] not in classes:  # imported from another module: read that one
                return _ast_signature(*_imported_from(tree, module, path, bases[0]), depth + 1)
            cls = classes[bases[0]]
    source, original = _imported_from(tree, module, path, name)
    return _ast_signature(source, original, depth + 1) if source else None


def _imported_from(tree: ast.Module, module: str, path: Path, name: str) -> tuple[str, str]:
    """``(module, name)`` that ``from module import name [as alias]`` in ``tree`` binds to
    ``name``; ``("", name)`` if none does."""
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and any(
            (a.asname or a.name) == name for a in node.names
        ):
            original = next(a.name for a in node.names if (a.asname or a.name) == name)
            if node.level:
                package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
                for _ in range(node.level - 1):
                    package = package.rsplit(".", 1)[0]
                return (f"{package}.{node.module}" if node.module else package), original
            return node.module or "", original
    return "", name


@cache
def target_signature(target: str) -> Signature:
    """The keyword arguments ``target`` (``module.Class`` or ``module.function``) takes.

    Modules that are not imported yet are read with ``ast`` (Lightning's classes, without
    Lightning's import time); anything else is imported and inspected.

    Raises:
        ConfigError: ``target`` cannot be found or imported.
    """
    module, _, name = target.rpartition(".")
    if not module:
        raise ConfigError(
            f"{target!r} is not a dotted path; use module.Class, e.g. torch.optim.Adam"
        )
    if module not in sys.modules:
        try:
            found = _ast_signature(module, name)
        except (OSError, SyntaxError, ValueError, ImportError):
            found = None
        if found is not None:
            return found
    try:
        obj = getattr(importlib.import_module(module), name)
    except ModuleNotFoundError as exc:
        raise ConfigError(
            f"cannot import {target!r}: no module named {exc.name!r}; give a module.Class "
            "that Python can import (installed, or its folder on PYTHONPATH)"
        ) from None
    except AttributeError:
        raise ConfigError(f"cannot import {target!r}: module {module!r} has no {name!r}") from None
    try:
        params = inspect.signature(obj).parameters.values()
    except (TypeError, ValueError):
        return Signature(target, (), True)
    names = tuple(p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD))
    return Signature(target, names, any(p.kind == p.VAR_KEYWORD for p in params))


def check_arguments(key: str, spec: Mapping[str, Any], example: str = "") -> Signature:
    """Check a ``{_target_: ..., **kwargs}`` node: the target exists and takes every key.

    Args:
        key: The node's config key (``model``, ``logger.wandb``) for the messages.
        spec: The node.
        example: A target to suggest when ``_target_`` is missing.
    """
    target = spec.get("_target_")
    if not isinstance(target, str) or not target:
        hint = f", e.g. {key}._target_={example}" if example else ""
        raise ConfigError(f"{key}._target_={target!r} is not allowed; give a module.Class{hint}")
    sig = target_signature(target)
    for name in spec:
        if name.startswith("_") and name.endswith("_"):
            continue
        if not sig.takes(name):
            close = difflib.get_close_matches(name, sig.names, n=1)
            mean = f"did you mean {key}.{close[0]}? " if close else ""
            raise ConfigError(
                f"{key}.{name}={spec[name]!r} is not allowed: {target} takes no argument "
                f"{name!r}; {mean}its arguments are: {', '.join(sig.names)}"
            )
    return sig


# ----------------------------------------------------------------------------- value checks


def _fail(key: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"{key}={_show(value)} is not allowed; {allowed}")


def _show(value: Any) -> str:
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else str(value)
    return repr(value)


def _choice(key: str, value: Any, allowed: Iterable[str]) -> None:
    allowed = tuple(allowed)
    if value not in allowed:
        close = difflib.get_close_matches(str(value), allowed, n=1)
        mean = f" (did you mean {close[0]}?)" if close else ""
        _fail(key, value, f"choose one of: {', '.join(allowed)}{mean}")


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _int(key: str, value: Any, low: int, high: int | None = None, none: bool = False) -> None:
    if value is None and none:
        return
    if not _is_int(value) or value < low or (high is not None and value >= high):
        upper = f" and < {high}" if high is not None else ""
        _fail(key, value, f"use an integer >= {low}{upper}" + (" or null" if none else ""))


def _real(key: str, value: Any, low: float, *, strict: bool = False, high: float | None = None):
    ok = _is_real(value) and (value > low if strict else value >= low)
    if ok and high is not None:
        ok = value <= high
    if not ok:
        lo = f"> {low:g}" if strict else f">= {low:g}"
        hi = f" and <= {high:g}" if high is not None else ""
        _fail(key, value, f"use a finite number {lo}{hi}")


def _scheme(key: str, value: Any) -> None:
    if value != "lsuv" and str(value).lower() not in schemes.names():
        _choice(key, value, [*schemes.names(), "lsuv"])


def _init_params(key: str, scheme: str, params: Mapping[str, Any]) -> None:
    """The scheme's own rules (the live registry's), on a stand-in 16 x 16 tensor."""
    for name, value in params.items():
        if value is not None and not _is_real(value):
            _fail(f"{key}.{name}", value, f"init scheme {scheme!r} needs a finite number")
    if scheme == "lsuv":
        return
    try:
        schemes.resolve(scheme, 16, 16, params)
    except ValueError as exc:
        raise ConfigError(f"{key}={dict(params)} is not allowed; {exc}") from None


def check_config(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` (one line) on the first value that cannot work.

    Args:
        cfg: The composed task config (no ``hydra`` node needed).
    """
    # lazy: pruning pulls in pandas, which a config error or --help should not wait for
    from cdi_experiments.pruning import criterion_names

    for group, example in (("model", "mypkg.nets.TinyNet"), ("optimizer", "torch.optim.RMSprop")):
        if (
            group in cfg
            and OmegaConf.is_dict(cfg[group])
            and OmegaConf.is_missing(cfg[group], "_target_")
        ):
            _fail(
                f"{group}._target_",
                "???",
                f"{group}=custom needs the class to build, e.g. {group}._target_={example}",
            )
    try:
        c = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except Exception as exc:  # an interpolation or a ??? left unset
        raise ConfigError(one_line(exc)) from None
    _known_keys("", c, TrainConfig, skip=("hydra",))
    for group, schema in (
        ("init", InitConfig),
        ("tracking", TrackingConfig),
        ("prune", PruneConfig),
    ):
        _known_keys(f"{group}.", c[group], schema)
    seed = c.get("seed")
    if not _is_int(seed) or not 0 <= seed < SEED_LIMIT:
        _fail("seed", seed, "use an integer with 0 <= seed < 2**64 (0 is a seed)")
    run_dir = c.get("run_dir")
    if run_dir is not None and not str(run_dir):
        _fail("run_dir", run_dir, "use a directory path or null (null: Hydra's run directory)")
    _check_run_name(c.get("run_name"))
    _check_objective(c.get("objective"))

    i = c["init"]
    _scheme("init.scheme", i["scheme"])
    _init_params("init.params", i["scheme"], i["params"])
    for layer, ov in i["overrides"].items():
        name = ov.get("scheme") if isinstance(ov, dict) else ov
        _scheme(f"init.overrides.{layer}", name)
        if isinstance(ov, dict):
            _init_params(f"init.overrides.{layer}.params", name, ov.get("params") or {})
    _choice("init.layer_ids", i["layer_ids"], LAYER_ID_MODES)
    _choice("init.mode", i["mode"], INIT_MODES)
    _int("init.lsuv_batch_size", i["lsuv_batch_size"], 1)

    t = c["tracking"]
    if not t["thresholds"]:
        _fail(
            "tracking.thresholds", t["thresholds"], "list at least one number >= 0, e.g. [0, 1e-5]"
        )
    for k, th in enumerate(t["thresholds"]):
        _real(f"tracking.thresholds[{k}]", th, 0.0)
    for k, q in enumerate(t["quantiles"]):
        _real(f"tracking.quantiles[{k}]", q, 0.0, high=1.0)
    _int("tracking.every_n_epochs", t["every_n_epochs"], 1)
    _choice("tracking.log_per", t["log_per"], LOG_PER)

    p = c["prune"]
    _real("prune.threshold", p["threshold"], 0.0)
    for k, crit in enumerate(p["criteria"]):
        _choice(f"prune.criteria[{k}]", crit, criterion_names())
    for k, s in enumerate(p["sparsities"]):
        if not _is_real(s) or not 0.0 < s < 1.0:
            _fail(f"prune.sparsities[{k}]", s, "use fractions in (0, 1), e.g. [0.5, 0.9]")
    _int("prune.finetune_epochs", p["finetune_epochs"], 0)
    _int("prune.retrain_epochs", p["retrain_epochs"], 0)

    _check_data(c["data"])
    model = c["model"]
    if not isinstance(model, dict):
        _fail("model", model, "choose a model group option, e.g. model=mlp or model=custom")
    check_arguments("model", model, example="mypkg.nets.TinyNet")
    _check_optimizer("optimizer", c["optimizer"])
    sched = c.get("scheduler") or {}
    if sched:
        check_arguments("scheduler", sched, example="torch.optim.lr_scheduler.CosineAnnealingLR")
    _check_trainer(c["trainer"])
    _check_model_parallel(c)
    for group in ("logger", "callbacks"):
        nodes = c.get(group) or {}
        if not isinstance(nodes, dict):
            _fail(group, nodes, "use a mapping {name: {_target_: module.Class, ...}}")
        for name, spec in nodes.items():
            if spec is None:  # ~callbacks.x or callbacks.x=null switches one off
                continue
            if not isinstance(spec, dict):
                _fail(f"{group}.{name}", spec, "use {_target_: module.Class, ...}")
            sig = check_arguments(f"{group}.{name}", spec, example="module.Class")
            _check_package(f"{group}.{name}", sig.target)
            if group == "callbacks":
                _check_monitor(f"{group}.{name}", spec)


def _check_run_name(name: Any) -> None:
    """``run_name`` is one folder name inside the output root (``hydra.run.dir`` ends with it):
    a ``/``, ``\\`` or ``..`` would put the run's files elsewhere (``../../etc``, ``/tmp/x``)."""
    text = str(name) if name is not None else ""
    if not text.strip() or text in (".", "..") or any(c in text for c in "/\\\0"):
        _fail(
            "run_name",
            name,
            "a run name is one folder name inside the output root, without '/', '\\' or "
            "'..' (e.g. run_name=mlp-mnist-he-s0); to write elsewhere set hydra.run.dir",
        )


# Metric namespaces measured on the test set (test_epoch/...: every epoch, with
# data.test_each_epoch; prune/...: the pruned copies' test accuracy).
TEST_METRICS = ("test/", "test_epoch/", "prune/")


def _check_objective(name: Any) -> None:
    """A sweep tunes on validation metrics: one measured on the test set is refused."""
    if not isinstance(name, str) or not name.strip():
        _fail("objective", name, "name a logged validation metric, e.g. objective=val/acc")
    if name.startswith(TEST_METRICS):
        _fail(
            "objective",
            name,
            "it is measured on the test set, and tuning on it leaks the test set into the "
            "model choice; use a validation metric, e.g. objective=val/acc (or val/loss with "
            "hydra.sweeper.direction=minimize)",
        )


def _check_monitor(key: str, spec: Mapping[str, Any]) -> None:
    """A callback that selects or stops on a metric (``ModelCheckpoint``, ``EarlyStopping``:
    their ``monitor``) must not watch the test set either."""
    monitor = spec.get("monitor")
    if isinstance(monitor, str) and monitor.startswith(TEST_METRICS):
        _fail(
            f"{key}.monitor",
            monitor,
            "it is measured on the test set, and choosing a checkpoint or stopping on it leaks "
            f"the test set into the model choice; use a validation metric, e.g. {key}.monitor="
            "val/loss",
        )


def sweep_values(override: Override) -> list[str]:
    """The values of a sweep override whose jobs are checked before the sweep starts.

    What Hydra's basic sweeper enumerates (``a,b``, ``choice(...)``, ``range(...)``); for the
    Optuna sweeper's ``interval(low, high)`` (also as ``tag(log, interval(...))`` or
    ``int(interval(...))``), its two ends: the extremes a trial can draw.
    """
    value = override.value()
    if isinstance(value, IntervalSweep):
        return [str(value.start), str(value.end)]
    return list(override.sweep_string_iterator())


# Lightning loggers whose backend is an optional package: (module to import, pip install name).
LOGGER_PACKAGES = {
    "MLFlowLogger": ("mlflow", "'cdi-experiments[mlflow]' (or mlflow-skinny)"),
    "WandbLogger": ("wandb", "wandb"),
    "CometLogger": ("comet_ml", "comet-ml"),
}


def _check_package(key: str, target: str) -> None:
    module, pip_name = LOGGER_PACKAGES.get(target.rsplit(".", 1)[-1], (None, None))
    if module is not None and importlib.util.find_spec(module) is None:
        raise ConfigError(
            f"{key}._target_={target!r} needs the package {module!r}, which is not installed; "
            f"pip install {pip_name}"
        )


def _known_keys(prefix: str, node: Mapping[str, Any], schema: type, skip: tuple = ()) -> None:
    """Keys added with ``+`` bypass the structured config's own check: refuse them here."""
    known = [f.name for f in dataclasses.fields(schema)]
    for key in node:
        if key not in known and key not in skip:
            close = difflib.get_close_matches(key, known, n=1)
            mean = f"did you mean {prefix}{close[0]}? " if close else ""
            raise ConfigError(
                f"{prefix}{key}={_show(node[key])} is not allowed: no such key; {mean}"
                f"the keys are: {', '.join(known)}"
            )


def _check_data(d: Any) -> None:
    if not isinstance(d, dict):
        _fail("data", d, "choose a data group option, e.g. data=mnist")
    check_arguments("data", d, example=IMAGE_DATAMODULE)
    if d["_target_"] != IMAGE_DATAMODULE:
        return
    _choice("data.name", d.get("name"), ("mnist", "fashion_mnist"))
    _int("data.batch_size", d.get("batch_size", 64), 1)
    _int("data.eval_batch_size", d.get("eval_batch_size", 1000), 1)
    val = d.get("val_size", 5000)
    if not _is_int(val) or not 0 <= val < TRAIN_IMAGES:
        _fail(
            "data.val_size",
            val,
            f"use an integer >= 0 and < {TRAIN_IMAGES} (the training file's images; "
            "the rest are trained on)",
        )
    _int("data.limit", d.get("limit"), 1, none=True)
    _int("data.num_workers", d.get("num_workers", 0), 0)
    _int("data.split_seed", d.get("split_seed", 0), 0, SEED_LIMIT)
    each = d.get("test_each_epoch", False)
    if not isinstance(each, bool):
        _fail(
            "data.test_each_epoch",
            each,
            "use true (also log test_epoch/{loss,acc} every epoch, for learning curves) or false",
        )


def _check_optimizer(key: str, o: Any) -> None:
    if not isinstance(o, dict):
        _fail(key, o, "choose an optimizer group option, e.g. optimizer=adam")
    check_arguments(key, o, example="torch.optim.RMSprop")
    if "lr" in o:
        _real(f"{key}.lr", o["lr"], 0.0, strict=True)
    for name in ("weight_decay", "momentum", "eps"):
        if name in o and o[name] is not None:
            _real(f"{key}.{name}", o[name], 0.0)
    betas = o.get("betas")
    if betas is not None:
        if not isinstance(betas, list) or len(betas) != 2:
            _fail(f"{key}.betas", betas, "use two numbers in [0, 1), e.g. [0.9, 0.999]")
        for k, b in enumerate(betas):
            if not _is_real(b) or not 0.0 <= b < 1.0:
                _fail(f"{key}.betas[{k}]", b, "use a number in [0, 1), e.g. [0.9, 0.999]")


def _check_trainer(tr: Any) -> None:
    if not isinstance(tr, dict):
        _fail("trainer", tr, "choose a trainer group option, e.g. trainer=cpu")
    check_arguments("trainer", tr, example=TRAINER)
    if "max_epochs" in tr:
        _int("trainer.max_epochs", tr["max_epochs"], 1)
    acc = tr.get("accelerator", "auto")
    if isinstance(acc, str):
        _choice("trainer.accelerator", acc, ACCELERATORS)
    dev = tr.get("devices", "auto")
    ok = dev == "auto" or dev == -1 or (_is_int(dev) and dev >= 1)
    ok = ok or (isinstance(dev, list) and dev and all(_is_int(d) and d >= 0 for d in dev))
    ok = ok or (isinstance(dev, str) and dev.strip() not in ("", "0"))
    if not ok:
        _fail("trainer.devices", dev, "use an integer >= 1, a list of device indices, -1 or 'auto'")
    det = tr.get("deterministic")
    if det not in (None, True, False, "warn"):
        _fail("trainer.deterministic", det, "use true, false or warn")
    if str(tr.get("strategy", "")).startswith("fsdp") and acc == "cpu":
        _fail(
            "trainer.accelerator",
            acc,
            "Lightning runs strategy 'fsdp' on GPUs only: use trainer.accelerator=gpu, "
            "or trainer=ddp on CPU, or trainer=fsdp2 (FSDP2, on CPU or GPUs)",
        )


def is_model_parallel(trainer: Any) -> bool:
    """Whether a (plain) trainer config uses Lightning's ``ModelParallelStrategy`` (or a subclass
    named ``...ModelParallelStrategy``), which builds the model on the meta device and shards it
    in ``configure_model`` (``trainer=fsdp2``)."""
    strategy = trainer.get("strategy") if isinstance(trainer, Mapping) else None
    target = strategy.get("_target_") if isinstance(strategy, Mapping) else None
    return isinstance(target, str) and target.endswith("ModelParallelStrategy")


def _check_model_parallel(c: Mapping[str, Any]) -> None:
    """``trainer=fsdp2``: FSDP2 over every device, a backend the accelerator has, and an init
    that can be made shard by shard."""
    tr = c["trainer"]
    strategy = tr.get("strategy")
    if isinstance(strategy, dict):
        check_arguments("trainer.strategy", strategy, example=MODEL_PARALLEL)
    if not is_model_parallel(tr):
        return
    dev = tr.get("devices", "auto")
    if not _is_int(dev) or dev < 1:
        _fail("trainer.devices", dev, "trainer=fsdp2 needs a number of devices, e.g. 2")
    nodes = tr.get("num_nodes", 1)
    _int("trainer.num_nodes", nodes, 1)
    tp = strategy.get("tensor_parallel_size", "auto")
    if tp != 1:
        _fail(
            "trainer.strategy.tensor_parallel_size",
            tp,
            "the Classifier shards with FSDP2 only (no tensor parallelism): use 1",
        )
    dp = strategy.get("data_parallel_size", "auto")
    if dp != dev * nodes:
        _fail(
            "trainer.strategy.data_parallel_size",
            dp,
            f"FSDP2 shards over every device: use trainer.devices x trainer.num_nodes "
            f"= {dev * nodes} (trainer=fsdp2 sets it to ${{trainer.devices}})",
        )
    backend = strategy.get("process_group_backend")
    _choice(
        "trainer.strategy.process_group_backend",
        "null" if backend is None else backend,
        ("null", "gloo", "nccl"),
    )
    if backend == "nccl" and tr.get("accelerator", "auto") == "cpu":
        _fail(
            "trainer.strategy.process_group_backend",
            backend,
            "nccl needs GPUs: on trainer.accelerator=cpu use gloo, or null (gloo on CPU, "
            "nccl on GPUs)",
        )
    if c["init"]["mode"] != "generate":
        _fail(
            "init.mode",
            c["init"]["mode"],
            "trainer=fsdp2 builds the model on the meta device, so it has no init of its own "
            "to record: use init.mode=generate",
        )
    if not c["init"]["biases"]:
        _fail(
            "init.biases",
            False,
            "trainer=fsdp2 builds the model on the meta device, where only the init gives "
            "the biases values: use init.biases=true",
        )
    if c["init"]["scheme"] == "lsuv":
        _fail(
            "init.scheme",
            "lsuv",
            "LSUV fits each layer's scale with forward passes over the whole model; with "
            "trainer=fsdp2 use another scheme, or trainer=ddp for LSUV",
        )


def plain(node: Any) -> Any:
    """An OmegaConf node as plain containers, resolved (checkpoints must not hold OmegaConf)."""
    if OmegaConf.is_config(node):
        return OmegaConf.to_container(node, resolve=True)
    return node


def task_config(cfg: DictConfig) -> DictConfig:
    """``cfg`` without the ``hydra`` node that ``compose(..., return_hydra_config=True)`` adds
    (its interpolations need a running Hydra job to resolve)."""
    if "hydra" not in cfg:
        return cfg
    cfg = cfg.copy()
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def one_line(exc: BaseException) -> str:
    """An exception's message on one line (Hydra's and OmegaConf's span several), with its
    cause's (Hydra's "Error merging override" says what was wrong only there)."""
    text = str(exc).strip() or type(exc).__name__
    cause = exc.__cause__
    if cause is not None and str(cause).strip() and str(cause).strip() not in text:
        text += ": " + str(cause).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    # OmegaConf appends "full_key: ...", "object_type=..." detail lines: keep the first ones.
    keep = [ln for ln in lines if not ln.startswith(("object_type=", "reference_type="))]
    return " ".join(keep)


def config_dir() -> str:
    """The folder of the shipped configs (``cdi_experiments.configs``, the repo's ``configs/``)."""
    spec = importlib.util.find_spec("cdi_experiments.configs")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("the package's configs are missing; reinstall cdi-experiments")
    return os.fspath(next(iter(spec.submodule_search_locations)))


__all__ = [
    "GROUPS",
    "ConfigError",
    "InitConfig",
    "PruneConfig",
    "Signature",
    "TrackingConfig",
    "TrainConfig",
    "check_arguments",
    "check_config",
    "config_dir",
    "is_model_parallel",
    "one_line",
    "plain",
    "task_config",
    "model_name",
    "register",
    "short_name",
    "sweep_values",
    "target_signature",
]
