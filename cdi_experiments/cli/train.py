"""``cdi-train``: the Hydra app (parse, call, exit code).

Examples::

    cdi-train data=mnist model=mlp init=zeros trainer.max_epochs=1
    cdi-train -m init=zeros,ones,he data=mnist,fashion_mnist
    cdi-train model=custom model._target_=mypkg.nets.TinyNet +model.width=64
    cdi-train trainer.max_epochs=5 hydra.run.dir=outputs/runs/a   # resumes a/checkpoints/last.ckpt
    cdi-train -m seed=0,1,2 hydra.sweep.dir=outputs/sweeps/s  # relaunch: skips finished jobs

Before Hydra creates any output directory, every job's config is composed and checked
(:func:`~cdi_experiments.run.preflight.check_command_line`): a bad value, a typo, or a resume
under another seed or init is one ``cdi-train: error: ...`` line and exit status 2. A single
run then locks its run directory (:func:`~cdi_experiments.run.lock.run_lock`) before Hydra
writes ``.hydra/``; a directory another process is writing is one line naming its PID, exit
status 2, and nothing written. Lightning is imported only when training starts, so ``--help``,
``--cfg job`` and config errors are fast.

Exit status: 0 finished; 1 failed (a non-finite loss, a full disk, a bad data file; for a sweep: any job failed, each
listed on one line at the end, after the other jobs ran); 2 a config error or a locked run
directory; 143 (128 + SIGTERM) or 130 (128 + SIGINT) interrupted, resumable by rerunning the
same command (see :mod:`cdi_experiments.run.train`).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Sequence

import hydra
from omegaconf import DictConfig

from cdi_experiments.datasets import DatasetError
from cdi_experiments.paths import DiskFullError
from cdi_experiments.run.lock import run_lock
from cdi_experiments.run.preflight import CONFIG_MODULE, CONFIG_NAME, check_command_line
from cdi_experiments.run.schema import ConfigError
from cdi_experiments.run.status import sweep_failures

EXIT_FAILED = 1
EXIT_CONFIG = 2


@hydra.main(version_base="1.3", config_path=f"pkg://{CONFIG_MODULE}", config_name=CONFIG_NAME)
def _hydra_main(cfg: DictConfig) -> float | None:
    # The one lazy import of the app: run.train imports Lightning (3.4 s here), which --help,
    # --cfg and config errors never need.
    from cdi_experiments.run.train import (
        RunStoppedError,
        in_multirun,
        sweep_objective,
        train,
        train_job,
    )

    try:
        metrics = train_job(cfg) if in_multirun() else train(cfg)[0]
    except RunStoppedError as exc:
        _fail(exc, exc.exit_code)
    except ConfigError as exc:
        _fail(exc, EXIT_CONFIG)
    except DiskFullError as exc:  # the run's status.json says failed, and why
        _fail(f"{exc}: the run resumes from its last checkpoint", EXIT_FAILED)
    except DatasetError as exc:
        _fail(exc, EXIT_FAILED)
    return sweep_objective(cfg, metrics)  # what a sweeper optimises: cfg.objective, never test


def _fail(exc: Exception | str, code: int) -> None:
    print(f"cdi-train: error: {exc}", file=sys.stderr)
    sys.exit(code)


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point: check the command line (one-line errors, exit 2), lock the run
    directory, then run Hydra; a sweep with failed jobs exits 1 after listing them.

    Args:
        argv: The arguments without the program name; default ``sys.argv[1:]``.
    """
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    try:
        line = check_command_line(sys.argv[1:])
    except ConfigError as exc:
        _fail(exc, EXIT_CONFIG)
    sys.argv = [sys.argv[0], *line.argv]
    failures: list[str] = []
    with contextlib.ExitStack() as stack:
        if line.output_dir is not None and not line.multirun:
            try:
                stack.enter_context(run_lock(line.output_dir, "cdi-train"))
            except ConfigError as exc:
                _fail(exc, EXIT_CONFIG)
        if line.output_dir is not None and line.multirun:
            failures = stack.enter_context(sweep_failures(line.output_dir))
        _hydra_main()
    if failures:
        listed = "\n".join(failures)
        _fail(f"{len(failures)} of {line.jobs} sweep jobs failed:\n{listed}", EXIT_FAILED)


if __name__ == "__main__":
    main()

__all__ = ["main"]
