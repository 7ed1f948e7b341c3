"""Compose and check every job's config, as Hydra will, before Hydra writes anything.

For a single run and for every job of a sweep (the command line's ``a=1,2`` and ``range(...)``
sweeps and those in ``hydra.sweeper.params``), the config is composed with Hydra's public
compose API and checked (:func:`~cdi_experiments.run.schema.check_config`); a single run into an
existing run directory is also checked against its checkpoint
(:func:`~cdi_experiments.run.resume.check_resume`). Any failure is one :class:`ConfigError`
line, so a bad job ``n`` stops the sweep before job 0 trains.

:func:`check_command_line` also resolves the output directory (the run's, or the sweep's for
``-m``) and pins it on the command line when it holds an interpolation such as ``${now:...}``,
so that the directory ``cdi-train`` locks before Hydra writes is the one Hydra uses.
"""

from __future__ import annotations

import difflib
import itertools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.errors import HydraException, MissingConfigException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from cdi_experiments.run.resume import check_resume
from cdi_experiments.run.schema import (
    ConfigError,
    check_config,
    one_line,
    sweep_values,
    target_signature,
    task_config,
)

CONFIG_MODULE = "cdi_experiments.configs"
CONFIG_NAME = "train"
MAX_JOBS = 256  # larger sweeps are checked job by job as they start
_MULTIRUN = ("-m", "--multirun")
_UNKNOWN_KEY = re.compile(r"Could not override '([^']+)'|Key '([^']+)' not in '[^']+'")


def compose_config(overrides: Sequence[str] = (), hydra_node: bool = True) -> DictConfig:
    """The ``train`` config composed from the shipped configs, as ``cdi-train`` composes it."""
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        return compose(CONFIG_NAME, overrides=list(overrides), return_hydra_config=hydra_node)


def sweep_jobs(overrides: Sequence[str], sweeper_params: Mapping[str, str] | None = None):
    """Every job's override list, in the order Hydra's basic sweeper runs them.

    Args:
        overrides: The command line's overrides (sweeps like ``seed=0,1`` included).
        sweeper_params: ``hydra.sweeper.params`` (``{key: "a,b"}``); the command line wins for
            a key both set.

    Returns:
        A list of override lists, one per job.
    """
    params = [f"{k}={v}" for k, v in (sweeper_params or {}).items()]
    parser = OverridesParser.create(config_loader=GlobalHydra.instance().config_loader())
    parsed: dict[tuple[str, str | None], Override] = {}
    for o in parser.parse_overrides([*params, *overrides]):
        parsed.pop((o.key_or_group, o.package), None)
        parsed[(o.key_or_group, o.package)] = o
    axes = []
    for o in parsed.values():
        key = o.get_key_element()
        if o.is_sweep_override():
            axes.append([f"{key}={v}" for v in sweep_values(o)])
        else:
            axes.append([o.input_line or f"{key}={o.get_value_element_as_str()}"])
    return [list(job) for job in itertools.product(*axes)]


@dataclass(frozen=True)
class CommandLine:
    """A checked ``cdi-train`` command line.

    Attributes:
        jobs: The number of jobs the sweep runs (an Optuna sweep: its ``n_trials``, whose
            search space's ends were checked), or 1 (0: a command line left to Hydra).
        multirun: Whether it is a sweep (``-m``).
        output_dir: The run directory, or for a sweep the sweep directory, as resolved now
            (``None`` when left to Hydra).
        argv: The command line to run: ``argv`` with ``hydra.run.dir`` (``hydra.sweep.dir``)
            pinned to ``output_dir`` where it held an interpolation.
    """

    jobs: int
    multirun: bool
    output_dir: Path | None
    argv: list[str]


def preflight(argv: Sequence[str]) -> int:
    """Check the command line ``argv`` (without the program name).

    Command lines with Hydra flags other than ``-m`` (``--help``, ``--cfg job``, ``-cn``...)
    are left to Hydra.

    Returns:
        The number of job configs checked (0: left to Hydra).

    Raises:
        ConfigError: One line naming the key, the value and what is allowed.
    """
    return check_command_line(argv).jobs


def check_command_line(argv: Sequence[str]) -> CommandLine:
    """:func:`preflight`, returning the resolved output directory and the pinned command line.

    Raises:
        ConfigError: One line naming the key, the value and what is allowed.
    """
    argv = list(argv)
    flags = [a for a in argv if a.startswith("-")]
    if any(f not in _MULTIRUN for f in flags):
        return CommandLine(0, False, None, argv)
    overrides = [a for a in argv if not a.startswith("-")]
    multirun = bool(flags)
    if not multirun:
        jobs = [overrides]
    else:
        try:
            base = [a for a in overrides if "," not in a and "(" not in a]
            cfg = _compose(base)
            output_dir = Path(str(cfg.hydra.sweep.dir))
            sweeper = OmegaConf.to_container(cfg.hydra.sweeper, resolve=False)
            params = sweeper.get("params") or {}
            GlobalHydra.instance().clear()
            with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
                jobs = sweep_jobs(overrides, {k: str(v) for k, v in params.items()})
        except (HydraException, OmegaConfBaseException) as exc:
            raise ConfigError(one_line(exc)) from None
    for job in jobs[:MAX_JOBS]:
        cfg = _compose(job)
        if multirun:
            _check_job_dirname(job, cfg)
        task = task_config(cfg)
        check_config(task)
        if not multirun:  # a sweep job's directory is known only once Hydra runs it
            output_dir = Path(str(cfg.hydra.run.dir))
            check_resume(task, output_dir)
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    count = len(jobs)
    if multirun and isinstance(sweeper.get("n_trials"), int):  # Optuna: one job per trial
        count = sweeper["n_trials"]
    return CommandLine(count, multirun, output_dir, _pinned(argv, key, output_dir))


def _check_job_dirname(job: list[str], cfg: DictConfig) -> None:
    """A sweep job's directory is named after its overrides (``hydra.job.override_dirname``):
    a ``..`` path segment in one would put the job's files outside the sweep directory."""
    excluded = set(cfg.hydra.job.config.override_dirname.exclude_keys or ())
    for override in job:
        key = override.lstrip("+~").split("=", 1)[0]
        if key in excluded or key.startswith("hydra."):
            continue
        if ".." in re.split(r"[/\\]", override):
            raise ConfigError(
                f"{override}: a sweep job's directory is named after its overrides, and this "
                "'..' would put the job's files outside the sweep directory; drop the '..' "
                "(give the path without it) or add the key to "
                "hydra.job.config.override_dirname.exclude_keys"
            )


def _pinned(argv: list[str], key: str, value: Path) -> list[str]:
    """``argv`` with ``key=value`` where the directory it gives (or the default) holds an
    interpolation that could resolve differently when Hydra composes again (``${now:...}``)."""
    given = [a for a in argv if a.startswith(f"{key}=")]
    if given and "${" not in given[-1]:
        return argv
    if "'" in str(value) or "\\" in str(value):
        return argv  # left as it is: Hydra's quoting of these is not worth the risk
    return [a for a in argv if not a.startswith(f"{key}=")] + [f"{key}='{value}'"]


def _compose(overrides: list[str]) -> DictConfig:
    """:func:`compose_config`, with Hydra's errors as one :class:`ConfigError` line."""
    try:
        return compose_config(overrides)
    except MissingConfigException as exc:
        raise ConfigError(_missing_option(exc, overrides)) from None
    except (HydraException, OmegaConfBaseException) as exc:
        raise ConfigError(_unknown_key(exc, overrides) or one_line(exc)) from None


def _missing_option(exc: MissingConfigException, overrides: list[str]) -> str:
    group, _, option = str(exc.missing_cfg_file or "").rpartition("/")
    if group and exc.options:
        return (
            f"{group}={option!r} is not a config option; choose one of: "
            f"{', '.join(sorted(exc.options))}"
        )
    return one_line(exc)


def _unknown_key(exc: Exception, overrides: list[str]) -> str | None:
    """For ``a.b.typo=1``: the closest key of ``a.b`` (its own and its target's arguments)."""
    text = str(exc)
    m = _UNKNOWN_KEY.search(text)
    full = re.search(r"full_key: (\S+)", text)
    key = (m and (m.group(1) or m.group(2))) or (full.group(1) if full else None)
    if not key:
        return None
    given = next((o for o in overrides if o.lstrip("+~").split("=", 1)[0] == key), None)
    value = given.split("=", 1)[1] if given and "=" in given else "?"
    parent = key.rpartition(".")[0]
    if given is not None and not given.startswith("+"):
        # Would the key work if added? Then report what is wrong with its value, if anything.
        try:
            check_config(task_config(compose_config(_plus(overrides, given))))
        except ConfigError as exc:
            if str(exc).startswith((key, f"{parent}=")):  # about this value, not a half-made node
                return str(exc)
        except (HydraException, OmegaConfBaseException):
            pass
    try:
        cfg = compose_config([o for o in overrides if o != given], hydra_node=False)
    except (HydraException, OmegaConfBaseException):
        return None
    # The deepest node that exists, and the first key below it that does not.
    parts = key.split(".")
    depth = 0
    node = cfg
    while depth < len(parts) - 1 and OmegaConf.is_dict(node) and parts[depth] in node:
        node = node[parts[depth]]
        depth += 1
    if not OmegaConf.is_dict(node):
        return None
    where, leaf = ".".join(parts[:depth]), parts[depth]
    names = [str(k) for k in node.keys()]
    target = node.get("_target_") if "_target_" in node else None
    if isinstance(target, str):
        try:
            names += list(target_signature(target).names)
        except ConfigError:
            pass
    close = difflib.get_close_matches(leaf, names, n=1)
    hint = (
        f"did you mean {where + '.' if where else ''}{close[0]}?"
        if close
        else f"add a new argument with +{key}={value}"
    )
    return f"{key}={value} is not allowed: {where or 'the config'} has no key {leaf!r}; {hint}"


def _plus(overrides: list[str], given: str) -> list[str]:
    return [f"+{o}" if o == given else o for o in overrides]


__all__ = [
    "CONFIG_MODULE",
    "CONFIG_NAME",
    "CommandLine",
    "check_command_line",
    "compose_config",
    "preflight",
    "sweep_jobs",
]
