"""``cdi-train``: the Hydra app. ``train(cfg)`` is a plain function; ``main`` wraps it.

Examples::

    cdi-train data=mnist model=mlp init=zeros trainer.max_epochs=1
    cdi-train -m init=zeros,ones,he data=mnist,fashion_mnist
    cdi-train experiment=mnist_demo logger=wandb
    cdi-train trainer.max_epochs=5 hydra.run.dir=outputs/runs/a   # resumes a/checkpoints/last.ckpt

Before Hydra creates any output directory, ``main`` composes every job's config and checks it
(:func:`preflight`): a bad value, a typo in a group option, or a resume under another seed or
init scheme is one ``cdi-train: error: ...`` line and exit status 2, and an existing run
directory is left as it was.

Resuming is exact: the data order is a function of ``(seed, epoch)``, the optimizer state is in
Lightning's checkpoint, and :class:`RngState` adds torch's generator state (dropout), which
Lightning does not save. The metrics CSV keeps the rows of the epochs the checkpoint holds.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
import platform
import sys
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from unittest import mock

import hydra
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter

import cdi_experiments
from cdi_experiments.generator import bits as B
from cdi_experiments.lightning.callback import (
    DeterministicInitCallback,
    InitIdentityError,
    tracked_module,
)
from cdi_experiments.modules import tensors_sha256
from cdi_experiments.paths import RunPaths, atomic_write_text
from cdi_experiments.run.schema import ConfigError, check_config, check_group_overrides

log = logging.getLogger(__name__)

CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "configs")
CONFIG_NAME = "train"
PREFLIGHT_MAX_JOBS = 256  # sweeps larger than this are checked job by job as they start


def plain(node: Any) -> Any:
    """An OmegaConf node as plain containers (checkpoints must not hold OmegaConf classes)."""
    if isinstance(node, DictConfig) or OmegaConf.is_config(node):
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


def run_dir_of(cfg: DictConfig) -> Path:
    """The run directory: Hydra's job output dir, else ``cfg.run_dir``, else the cwd."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    return Path(cfg.get("run_dir") or Path.cwd())


# ----------------------------------------------------------------------------- builders


def build_datamodule(cfg: DictConfig):
    from cdi_experiments.lightning.datamodule import ImageDataModule

    return ImageDataModule(**plain(cfg.data), seed=int(cfg.seed))


def build_lit_module(cfg: DictConfig):
    from cdi_experiments.lightning.classifier import Classifier

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


def build_extra_callbacks(cfg: DictConfig) -> list[Callback]:
    """``extra_callbacks: {name: {_target_: ..., **kwargs}}``, instantiated in name order."""
    specs = cfg.get("extra_callbacks") or {}
    return [hydra.utils.instantiate(specs[name]) for name in sorted(specs)]


def build_loggers(
    cfg: DictConfig,
    paths: RunPaths,
    callback: DeterministicInitCallback,
    resumed: dict,
    resume_epoch: int | None = None,
) -> list:
    """The loggers ``cfg.logger`` names. ``resume_epoch``: the checkpoint's epoch, whose rows
    (and earlier ones) the metrics CSV keeps."""
    from pytorch_lightning.loggers import TensorBoardLogger, WandbLogger

    lcfg = plain(cfg.logger) or {}
    loggers: list = []
    if "csv" in lcfg:
        loggers.append(ResumableCSVLogger(str(paths.root), keep_epochs_upto=resume_epoch))
    if "tensorboard" in lcfg:
        loggers.append(TensorBoardLogger(save_dir=str(paths.root), name="tensorboard", version=""))
    if "wandb" in lcfg:
        w = dict(lcfg["wandb"] or {})
        # Offline unless the user asks otherwise (WANDB_MODE or logger.wandb.mode). Passing mode
        # to wandb.init, not WandbLogger(offline=True), keeps WANDB_MODE out of os.environ, where
        # it would leak into later multirun jobs.
        mode = os.environ.get("WANDB_MODE") or w.pop("mode", "offline")
        w.pop("mode", None)
        # The run id lives in the checkpoint, so a resumed run continues the same W&B run.
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


class _KeepingWriter(ExperimentWriter):
    """Lightning's CSV writer deletes an existing ``metrics.csv`` when it starts. On resume this
    one keeps the rows of epochs ``<= keep_epochs_upto`` (those the checkpoint holds) and drops
    later ones (a test row, or an epoch the interruption cut short), which the run logs again."""

    def __init__(self, log_dir: str, keep_epochs_upto: int | None) -> None:
        self._keep_upto = keep_epochs_upto
        super().__init__(log_dir=log_dir)

    def _check_log_dir_exists(self) -> None:
        path = Path(self.metrics_file_path)
        if not path.is_file():
            return
        if self._keep_upto is None:  # a fresh run: Lightning's warning, and a fresh file
            super()._check_log_dir_exists()
            return
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            header = list(reader.fieldnames or [])
            rows = [r for r in reader if r.get("epoch") and int(r["epoch"]) <= self._keep_upto]
        self.metrics_keys = sorted(header)
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.metrics_keys)
            writer.writeheader()
            writer.writerows(rows)


class ResumableCSVLogger(CSVLogger):
    """``<run_dir>/metrics.csv`` (no version subfolders) that survives a resume.

    Args:
        save_dir: The run directory.
        keep_epochs_upto: On resume, the checkpoint's epoch: earlier rows are kept. ``None``
            starts a fresh file.
    """

    def __init__(self, save_dir: str, keep_epochs_upto: int | None = None) -> None:
        super().__init__(save_dir=save_dir, name="", version="")
        self._keep_upto = keep_epochs_upto

    @property
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            from lightning_fabric.utilities.rank_zero import rank_zero_only

            if rank_zero_only.rank != 0:  # Lightning's rank_zero_experiment: a no-op elsewhere
                return super().experiment
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _KeepingWriter(self.log_dir, self._keep_upto)
        return self._experiment


class RngState(Callback):
    """Checkpoints torch's CPU (and CUDA) generator state, which Lightning leaves out.

    Without it, a run resumed from an epoch-end checkpoint draws other dropout masks than the
    uninterrupted run (which the checkpoint was cut from) and the two diverge. Every rank is
    seeded alike, so rank 0's state, which the checkpoint holds, is every rank's.
    """

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        torch.set_rng_state(state_dict["torch"])
        if "cuda" in state_dict and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state_dict["cuda"])


def weights_fingerprint(module: torch.nn.Module, names: Sequence[str]) -> str:
    """sha256 over the names, shapes and float32 bytes of ``module``'s parameters ``names``.

    Hashed like :meth:`cdi_experiments.modules.InitPlan.fingerprint` (one function,
    :func:`~cdi_experiments.modules.tensors_sha256`), so right after init the two are equal.
    """
    params = dict(module.named_parameters())
    return tensors_sha256((name, params[name]) for name in names)


class RankInitFingerprint(Callback):
    """Debug: each rank writes the fingerprint of its own freshly initialized weights.

    Runs in ``setup``, after :class:`DeterministicInitCallback` has initialized the model and
    before the strategy wraps it (DDP broadcasts rank 0's weights when it wraps), so equal files
    show that every rank generated the same weights by itself. Writes
    ``<run_dir>/rank<k>_init.sha256``. Enable with
    ``+extra_callbacks.fingerprint._target_=cdi_experiments.run.train.RankInitFingerprint``.
    """

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        init = next(
            (c for c in trainer.callbacks if isinstance(c, DeterministicInitCallback)), None
        )
        if stage != "fit" or init is None or init.plan is None:
            return
        digest = weights_fingerprint(tracked_module(pl_module), list(init.plan.blocks))
        out = Path(trainer.default_root_dir) / f"rank{trainer.global_rank}_init.sha256"
        atomic_write_text(out, digest + "\n")


# ----------------------------------------------------------------------------- resume


def _callback_state(ckpt: dict[str, Any]) -> dict[str, Any]:
    for key, state in ckpt.get("callbacks", {}).items():
        if key.startswith("DeterministicInitCallback"):
            return state
    return {}


def _epochs_done(ckpt: dict[str, Any]) -> int:
    """Epochs whose training a checkpoint holds. (Its ``epoch`` is the epoch index when saved
    at an epoch end, but the count of epochs when saved as training ends.)"""
    try:
        return int(ckpt["loops"]["fit_loop"]["epoch_progress"]["current"]["processed"])
    except (KeyError, TypeError):
        return int(ckpt["epoch"]) + 1


def _diff(theirs: dict[str, Any], ours: dict[str, Any], prefix: str) -> str:
    keys = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
    return "; ".join(
        f"{prefix}.{k}: checkpoint {theirs.get(k)!r} vs this run {ours.get(k)!r}" for k in keys
    )


def check_resume(cfg: DictConfig, run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The checkpoint ``run_dir`` would resume from, after checking it matches ``cfg``.

    Args:
        cfg: The task config (no ``hydra`` node).
        run_dir: The run directory.

    Returns:
        ``None`` for a fresh run (no ``checkpoints/last.ckpt`` or ``resume=false``), else the
        loaded checkpoint.

    Raises:
        InitIdentityError: The checkpoint's initial weights came from another seed or init
            config (its message names each difference).
        ConfigError: Another model, optimizer or data stream than the checkpoint's.
    """
    path = RunPaths(run_dir).last_ckpt
    if not cfg.resume or not path.exists():
        return None
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    # The callback's own check (identity fields; the fingerprint needs the model, so the
    # callback compares it again when Lightning restores it).
    build_callback(cfg, None).load_state_dict(_callback_state(ckpt))
    fix = f"resume with the checkpoint's config, or start over in a new run directory ({path})"
    hp = ckpt.get("hyper_parameters", {})
    lit = build_lit_module(cfg)
    for key in ("model_cfg", "optimizer"):
        theirs, ours = hp.get(key) or {}, dict(lit.hparams[key])
        if theirs != ours:
            name = "model" if key == "model_cfg" else key
            raise ConfigError(f"cannot resume: {_diff(theirs, ours, name)}; {fix}")
    dm = build_datamodule(cfg)
    dm_state = ckpt.get(type(dm).__qualname__)
    if dm_state is not None:
        try:
            dm.load_state_dict(dm_state)
        except ValueError as exc:
            raise ConfigError(f"cannot resume: {exc}") from None
    return ckpt


# ----------------------------------------------------------------------------- DDP ranks

_DDP_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")


def _ddp_rank_command(local_rank: int) -> tuple[list[str], str]:
    """The command Lightning starts DDP rank ``local_rank`` with, inside a Hydra multirun job:
    this job's own overrides as a single run into this job's directory.

    Lightning's own command re-runs ``sys.argv``, ``-m`` and all, so every rank-1 process would
    run the whole sweep (in a sweep directory of its own when ``hydra.sweep.dir`` holds a
    ``${now:}``), pairing with the parent's jobs only by luck, and not at all under joblib.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import get_original_cwd

    hc = HydraConfig.get()
    command = [sys.executable, "-m", "cdi_experiments.run.train", *hc.overrides.task]
    command += [
        f'hydra.run.dir="{hc.runtime.output_dir}"',
        f"hydra.job.name=train_ddp_process_{local_rank}",
        "hydra.output_subdir=null",
    ]
    return command, get_original_cwd()


@contextlib.contextmanager
def _ddp_ranks_per_job():
    """Let each Hydra multirun job start its own DDP ranks, running that job only.

    Inside a multirun, :func:`_ddp_rank_command` replaces Lightning's rank command. Afterwards
    the process group is destroyed and the DDP variables Lightning put into ``os.environ``
    (``LOCAL_RANK`` among them, which tells Lightning that the ranks exist already) are
    restored, so the next job starts its own ranks.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    saved = {k: os.environ.get(k) for k in _DDP_ENV}
    dist = torch.distributed
    had_group = dist.is_available() and dist.is_initialized()
    patch: Any = contextlib.nullcontext()
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        from pytorch_lightning.strategies.launchers import subprocess_script

        patch = mock.patch.object(subprocess_script, "_hydra_subprocess_cmd", _ddp_rank_command)
    try:
        with patch:
            yield
    finally:
        if not had_group and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()  # Lightning keeps it; the next job's ranks need theirs
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# ----------------------------------------------------------------------------- train


def run_info(
    cfg: DictConfig, callback: DeterministicInitCallback, extra: dict | None = None
) -> dict[str, Any]:
    """Config, versions and fingerprints saved with every run."""
    return {
        "config": plain(cfg),
        "generator": {"version": B.GENERATOR_VERSION, **callback.identity()},
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
            that this config cannot resume (another model, optimizer or data stream).
        InitIdentityError: The checkpoint's initial weights came from another seed or init.
    """
    cfg = task_config(cfg)
    check_config(cfg)
    paths = RunPaths(run_dir_of(cfg))
    ckpt = check_resume(cfg, paths.root)  # before anything is written to the run directory
    paths.root.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
    torch.use_deterministic_algorithms(bool(cfg.deterministic))

    dm = build_datamodule(cfg)
    lit = build_lit_module(cfg)
    callback = build_callback(cfg, paths.root)
    loggers = build_loggers(
        cfg,
        paths,
        callback,
        _callback_state(ckpt) if ckpt else {},
        resume_epoch=_epochs_done(ckpt) - 1 if ckpt else None,
    )
    del ckpt
    from pytorch_lightning.callbacks import ModelCheckpoint

    # One file, rewritten at every epoch end. (save_top_k=0 with save_last=True saves only when
    # training ends: an interrupted run would have nothing to resume from.)
    ckpt_cb = ModelCheckpoint(
        dirpath=str(paths.checkpoints),
        filename=paths.last_ckpt.stem,
        save_top_k=1,
        every_n_epochs=1,
        enable_version_counter=False,
    )
    trainer = pl.Trainer(
        **plain(cfg.trainer),
        logger=loggers or False,
        callbacks=[callback, RngState(), *build_extra_callbacks(cfg), ckpt_cb],
        default_root_dir=str(paths.root),
    )
    ckpt_path = str(paths.last_ckpt) if cfg.resume and paths.last_ckpt.exists() else None
    if ckpt_path:
        log.info("resuming from %s", ckpt_path)
    ok = False
    metrics: dict[str, float] = {}
    prune_df = None
    try:
        with _ddp_ranks_per_job():
            trainer.fit(lit, datamodule=dm, ckpt_path=ckpt_path)
            if cfg.test_after_fit:
                trainer.test(lit, datamodule=dm, verbose=False)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        if trainer.is_global_zero and cfg.prune.enabled:
            from cdi_experiments.run.prune_stage import run_prune_stage

            if trainer.world_size > 1:
                # Rank 0 prunes alone: it must see the whole test set, not its DDP shard
                # (setup() would take the shard back from the trainer, so detach it).
                dm.trainer, dm.num_replicas, dm.rank = None, 1, 0

            prune_df = run_prune_stage(lit.model, callback.plan, dm, cfg, paths, loggers)
        if trainer.is_global_zero:
            atomic_write_text(
                paths.run_info,
                json.dumps(
                    run_info(cfg, callback, {"final_metrics": metrics}), indent=2, default=str
                ),
            )
            from cdi_experiments.run.report import run_figures, summarize_run

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


# ----------------------------------------------------------------------------- command line

_HYDRA_FLAGS_WE_CHECK = ("-m", "--multirun")


def preflight(argv: Sequence[str], config_dir: str = CONFIG_DIR) -> int:
    """Compose and check every job's config as Hydra will, before Hydra writes anything.

    Checks the group options, every value (:func:`check_config`) and, for a single run into an
    existing run directory, that its checkpoint can be resumed (:func:`check_resume`). Command
    lines with other Hydra flags (``--cfg``, ``--help``, ``-cn`` ...) are left to Hydra.

    Returns:
        The number of job configs checked (0: left to Hydra).

    Raises:
        ConfigError: One line naming the problem (Hydra's composition errors included).
        InitIdentityError: As :func:`check_resume`.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    check_group_overrides(argv, config_dir)
    flags = [a for a in argv if a.startswith("-")]
    if any(f not in _HYDRA_FLAGS_WE_CHECK for f in flags):
        return 0
    overrides = [a for a in argv if not a.startswith("-")]
    multirun = bool(flags)
    try:
        with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
            if multirun:
                from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

                parser = OverridesParser.create(
                    config_loader=GlobalHydra.instance().config_loader()
                )
                jobs = BasicSweeper.split_arguments(parser.parse_overrides(overrides), None)[0]
            else:
                jobs = [overrides]
            for job in jobs[:PREFLIGHT_MAX_JOBS]:
                cfg = compose(CONFIG_NAME, overrides=job, return_hydra_config=True)
                task = task_config(cfg)
                check_config(task)
                if not multirun:  # a sweep job's directory is known only once Hydra runs it
                    check_resume(task, Path(str(cfg.hydra.run.dir)))
    except (HydraException, OmegaConfBaseException) as exc:
        raise ConfigError(" ".join(str(exc).split())) from None
    return len(jobs)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name=CONFIG_NAME)
def _hydra_main(cfg: DictConfig) -> float | None:
    try:
        metrics, _ = train(cfg)
    except (ConfigError, InitIdentityError) as exc:
        _fail(exc)
    return metrics.get("test/acc")


def _fail(exc: Exception) -> None:
    print(f"cdi-train: error: {exc}", file=sys.stderr)
    sys.exit(2)


def main() -> None:
    """Console entry point: check the command line (one-line errors), then run Hydra."""
    try:
        preflight(sys.argv[1:])
    except (ConfigError, InitIdentityError) as exc:
        _fail(exc)
    _hydra_main()


if __name__ == "__main__":
    main()

__all__ = [
    "RankInitFingerprint",
    "ResumableCSVLogger",
    "RngState",
    "check_resume",
    "main",
    "preflight",
    "train",
    "weights_fingerprint",
]
