"""One training run: ``train(cfg) -> (metrics, objects)``, a plain function of the config.

Fit, test, prune and report one composed ``cdi-train`` config (the command line is
:mod:`cdi_experiments.cli.train`). The objects are built from the config's ``_target_`` s
(:mod:`cdi_experiments.run.build`); a run directory holding ``checkpoints/last.ckpt`` resumes
it after :func:`~cdi_experiments.run.resume.check_resume`. This module imports Lightning;
the command line imports it only when a run starts, so ``--help`` and config errors stay fast.

The run's lifecycle, in its directory:

* one writer: :func:`~cdi_experiments.run.lock.run_lock` (``.lock``) is held throughout;
* ``status.json`` (:mod:`cdi_experiments.run.status`) says ``running``, then ``finished``
  written last (after every result file and figure), or ``failed``/``interrupted`` with the
  reason;
* a non-finite loss stops the run at that step (:class:`RunFailedError`, exit status 1);
* SIGTERM (SLURM's preemption) and SIGINT stop it after the current step
  (:class:`RunInterruptedError`, exit status 143 = 128 + SIGTERM, 130 = 128 + SIGINT, the
  shell's convention). No checkpoint is written mid-epoch: resuming mid-epoch would not be
  exact (the epoch's metric sums and data position are not in Lightning's checkpoint), so the
  resume point is ``checkpoints/last.ckpt`` from the last epoch end, and rerunning the same
  command finishes bit-identical to an uninterrupted run. submitit requeues on its own signal
  (USR2) and ignores the exit status, so 143 is what a requeued SLURM job reports too;
* in a sweep (``-m``) a job that already finished with the same config is skipped, and one that
  finished with another config is an error (a reused sweep directory).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import platform
import signal
import sys
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig
from pytorch_lightning.utilities.exceptions import SIGTERMException

import cdi_experiments
from cdi_experiments.generator import bits as B
from cdi_experiments.lightning.callback import InitIdentityError
from cdi_experiments.lightning.classifier import NonFiniteLossError
from cdi_experiments.lightning.csv_logger import pending_row, saved_metrics
from cdi_experiments.paths import PRUNE_DIR, RunPaths, atomic_write_text, remove_stale_temps
from cdi_experiments.run import build
from cdi_experiments.run.ddp import ddp_ranks_per_job
from cdi_experiments.run.lock import is_rank_zero, run_lock
from cdi_experiments.run.prune_stage import run_prune_stage
from cdi_experiments.run.report import run_figures, summarize_run
from cdi_experiments.run.resume import callback_state, check_resume, epochs_done, identity_error
from cdi_experiments.run.schema import (
    ConfigError,
    check_config,
    model_name,
    one_line,
    plain,
    task_config,
)
from cdi_experiments.run.status import (
    config_fingerprint,
    read_status,
    record_sweep_failure,
    write_status,
)

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


class RunStoppedError(Exception):
    """The run stopped before finishing; ``exit_code`` is the command line's exit status and the
    message is one line (what happened and how to go on). The run directory's ``status.json``
    says the same."""

    exit_code = 1


class RunFailedError(RunStoppedError):
    """The run failed (e.g. a non-finite loss); exit status 1."""


class RunInterruptedError(RunStoppedError):
    """SIGTERM or SIGINT stopped the run; exit status ``128 + signal`` (143, 130)."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum


def in_multirun() -> bool:
    """Whether this is a job of a Hydra sweep (``cdi-train -m``)."""
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def sweep_objective(cfg: DictConfig, metrics: Mapping[str, float] | None) -> float | None:
    """What ``cdi-train`` returns to a sweeper: the run's last ``cfg.objective`` (``val/acc``
    by default: the last epoch's validation accuracy; the schema refuses test metrics).

    A failed job (``metrics`` is ``None``), or a run that did not log the objective, gets the
    worst value for the sweeper's ``direction`` (-inf to maximize, +inf to minimize), so an
    Optuna study records the trial as bad and goes on: a NaN or ``None`` would stop it.
    Hydra's basic sweeper has no direction and ignores the value: ``None``.
    """
    key = str(cfg.objective)
    if metrics and key in metrics:
        return float(metrics[key])
    direction = None
    if HydraConfig.initialized():
        direction = str(HydraConfig.get().sweeper.get("direction", "")).rsplit(".", 1)[-1]
    if direction not in ("maximize", "minimize"):
        return None
    if metrics:
        log.warning(
            "objective=%s was not logged by this run (it logged: %s); the sweeper gets the "
            "worst value",
            key,
            ", ".join(sorted(k for k in metrics if k.startswith(("train/", "val/", "test/")))),
        )
    return -math.inf if direction == "maximize" else math.inf


def train(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    """Fit, test and prune one configuration. Returns ``(metrics, objects)``.

    In a sweep job, a run directory whose ``status.json`` says ``finished`` with this config's
    fingerprint is skipped (``objects`` is ``{"paths": ..., "skipped": True}``).

    Raises:
        ConfigError: A config value that cannot work, or a checkpoint in the run directory
            that this config cannot resume (another seed, init, model, optimizer or data).
        RunLockedError: Another process is writing the run directory (a ConfigError).
        RunFailedError: A non-finite loss stopped the run (``status.json``: failed).
        RunInterruptedError: SIGTERM or SIGINT stopped it (``status.json``: interrupted).
    """
    cfg = task_config(cfg)
    check_config(cfg)
    paths = RunPaths(run_dir_of(cfg))
    fingerprint = config_fingerprint(cfg)
    if in_multirun():
        skipped = _finished_job(paths, fingerprint)
        if skipped is not None:
            return skipped, {"paths": paths, "skipped": True}
    ckpt = check_resume(cfg, paths.root)  # before anything is written to the run directory
    with run_lock(paths.root, "cdi-train"):
        # a killed run's half-written files; only the lock's holder looks (other ranks may be
        # writing), and not in prune/ (cdi-prune's, under its own lock)
        if is_rank_zero():
            for stale in remove_stale_temps(paths.root, exclude=(PRUNE_DIR,)):
                log.info("removed %s, left by an interrupted write", stale)
        return _train_locked(cfg, paths, ckpt, fingerprint)


def train_job(cfg: DictConfig) -> dict[str, float] | None:
    """:func:`train` as one job of a sweep: a failure is recorded (in the job's ``status.json``
    where it got that far, and in the sweep's failure list), logged, and the sweep goes on
    (returns ``None``). An interruption (SIGTERM, SIGINT) still stops the sweep.
    """
    try:
        return train(cfg)[0]
    except RunInterruptedError:
        raise
    except Exception as exc:
        expected = isinstance(exc, (ConfigError, RunStoppedError))
        reason = one_line(exc) if expected else f"{type(exc).__name__}: {one_line(exc)}"
        job_dir = run_dir_of(task_config(cfg))
        log.error("job %s failed: %s", job_dir, reason, exc_info=not expected)
        record_sweep_failure(job_dir, reason.removeprefix(f"{job_dir}: "))
        return None


def _finished_job(paths: RunPaths, fingerprint: str) -> dict[str, float] | None:
    """A sweep job's directory that holds a finished run: its final metrics if the config is
    the same (the job is skipped), an error if not; ``None`` if it did not finish."""
    status = read_status(paths.root)
    if not status or status["state"] != "finished":
        return None
    if status.get("config_sha256") != fingerprint:
        raise ConfigError(
            f"{paths.root} holds a finished run of another config (config sha256 "
            f"{str(status.get('config_sha256'))[:12]} vs this job's {fingerprint[:12]}); "
            "relaunch with another hydra.sweep.dir"
        )
    log.info("skipping finished job %s (status finished, same config)", paths.root)
    try:
        return dict(json.loads(paths.run_info.read_text()).get("final_metrics") or {})
    except (OSError, ValueError):
        return {}


def _train_locked(
    cfg: DictConfig, paths: RunPaths, ckpt: dict[str, Any] | None, fingerprint: str
) -> tuple[dict[str, float], dict[str, Any]]:
    pl.seed_everything(lightning_seed(int(cfg.seed)), workers=True, verbose=False)
    dm = build.build_datamodule(cfg)
    lit = build.build_lit_module(cfg, dm)
    callbacks = build.build_callbacks(cfg, paths)
    callback = build.init_callback(callbacks)
    paths.root.mkdir(parents=True, exist_ok=True)
    write_status(paths.root, "running", fingerprint)
    loggers: list = []
    ok = False
    metrics: dict[str, float] = {}
    prune_df = None
    trainer = None
    signals = _StopSignals()
    try:
        with signals:
            loggers = build.build_loggers(
                cfg,
                paths,
                callback,
                callback_state(ckpt) if ckpt else {},
                resume_epoch=epochs_done(ckpt) - 1 if ckpt else None,
                epoch_end_row=pending_row(ckpt),
            )
            resumed_metrics = saved_metrics(ckpt)
            del ckpt
            trainer = build.build_trainer(cfg, paths, loggers, [*callbacks, signals.callback()])
            ckpt_path = str(paths.last_ckpt) if cfg.resume and paths.last_ckpt.exists() else None
            if ckpt_path:
                log.info("resuming from %s", ckpt_path)
            with ddp_ranks_per_job(), signals.in_lightning():
                try:
                    trainer.fit(lit, datamodule=dm, ckpt_path=ckpt_path)
                except InitIdentityError as exc:  # the fingerprint, checked as Lightning restores
                    raise identity_error(exc) from None
                # The last epoch's train/val metrics (the sweep objective, val/acc, is one):
                # trainer.test() replaces callback_metrics with its own.
                # (A fit resumed past its last epoch logs nothing: the checkpoint's values.)
                metrics = {
                    **resumed_metrics,
                    **{k: float(v) for k, v in trainer.callback_metrics.items()},
                }
                if cfg.test_after_fit:
                    trainer.test(lit, datamodule=dm, verbose=False)
            metrics.update({k: float(v) for k, v in trainer.callback_metrics.items()})
            if trainer.is_global_zero and cfg.prune.enabled:
                if trainer.world_size > 1:
                    # Rank 0 prunes alone: it must see the whole test set, not its DDP shard
                    # (setup() would take the shard back from the trainer, so detach it).
                    dm.trainer, dm.num_replicas, dm.rank = None, 1, 0
                prune_df = run_prune_stage(lit.model, callback.plan, dm, cfg, paths, loggers)
            if trainer.is_global_zero:
                info = run_info(cfg, callback.identity(), {"final_metrics": metrics})
                atomic_write_text(paths.run_info, json.dumps(info, indent=2, default=str))
                run_figures(paths.root, float(cfg.prune.threshold))  # named from run_info.json
                print(summarize_run(paths.root, metrics, callback, prune_df))
            # Last: the marker that every result file is written.
            write_status(paths.root, "finished", fingerprint)
        ok = True
    except NonFiniteLossError as exc:
        _record(paths, "failed", fingerprint, str(exc))
        raise RunFailedError(f"{paths.root}: {exc}") from None
    except (SIGTERMException, KeyboardInterrupt, _Interrupted, SystemExit) as exc:
        signum = signals.received
        if not signum and isinstance(exc, (KeyboardInterrupt, SIGTERMException)):
            signum = signal.SIGINT if isinstance(exc, KeyboardInterrupt) else signal.SIGTERM
        if not signum:  # a SystemExit of somebody else's (e.g. a scheduler's requeue)
            _record(paths, "interrupted", fingerprint, f"exited: {one_line(exc)}")
            raise
        reason = _interrupted_reason(signal.Signals(signum).name, paths, bool(cfg.resume))
        _record(paths, "interrupted", fingerprint, reason)
        raise RunInterruptedError(f"{paths.root}: {reason}", signum) from None
    except BaseException as exc:
        _record(paths, "failed", fingerprint, f"{type(exc).__name__}: {one_line(exc)}")
        raise
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


def _record(paths: RunPaths, state: str, fingerprint: str, reason: str) -> None:
    """:func:`write_status` while an error is on its way out: a status that cannot be written
    (a full disk) is logged, and the error that stopped the run is the one reported."""
    try:
        write_status(paths.root, state, fingerprint, reason)
    except OSError as exc:
        log.warning("could not record status %s in %s: %s", state, paths.root, one_line(exc))


def _interrupted_reason(name: str, paths: RunPaths, resume: bool) -> str:
    if not resume:
        return f"interrupted by {name}; rerunning the same command starts over (resume=false)"
    if paths.last_ckpt.exists():
        where = f"from {paths.last_ckpt} (the last epoch end; what came after it is redone)"
    else:
        where = "from the start (no epoch had finished)"
    return f"interrupted by {name}; rerun the same command to resume {where}"


class _Interrupted(BaseException):
    """SIGTERM outside Lightning's loops (pruning, figures), or during a loop's last step."""


class _StopSignals:
    """SIGTERM and SIGINT for the duration of a run: remembers which arrived.

    Inside Lightning's loops (:meth:`in_lightning`), Lightning's own SIGTERM handler (which
    calls this one after its own) stops the loop after the current step, and Ctrl-C raises
    ``KeyboardInterrupt`` as usual; outside them, SIGTERM raises at once. Only the main thread
    can install handlers; elsewhere this does nothing.
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self._lightning = False
        self._saved: dict[int, Any] = {}

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._saved[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._saved.items():
            signal.signal(signum, handler)
        self._saved = {}

    @contextlib.contextmanager
    def in_lightning(self) -> Iterator[None]:
        self._lightning = True
        try:
            yield
        finally:
            self._lightning = False
        if self.received:  # arrived in a loop's last step, which Lightning lets finish: stop now
            raise _Interrupted

    def callback(self) -> pl.Callback:
        """A callback that stops the run where Lightning's loops start: a signal that came
        while ``fit`` or ``test`` was still setting up (data, init, restoring a checkpoint),
        before Lightning's own handler was installed, would otherwise go unseen by Lightning
        (it resets its flag when it installs the handler) until the whole fit had run."""
        signals = self

        class StopIfSignalled(pl.Callback):
            def _check(self, *args: Any) -> None:
                if signals.received:
                    raise _Interrupted

            on_train_start = on_train_epoch_start = on_test_start = _check

        return StopIfSignalled()

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = self.received or signum
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        if not self._lightning:
            raise _Interrupted


def _finish_wandb(loggers: list, ok: bool) -> None:
    """Close the W&B run between multirun jobs; a crash is marked as failed, not finished."""
    if not any(type(lg).__name__ == "WandbLogger" for lg in loggers):
        return
    import wandb

    if wandb.run is not None:
        wandb.finish(exit_code=0 if ok else 1)


__all__ = [
    "RunFailedError",
    "RunInterruptedError",
    "RunStoppedError",
    "in_multirun",
    "lightning_seed",
    "run_dir_of",
    "run_info",
    "sweep_objective",
    "train",
    "train_job",
]
