"""``cdi-train``: the Hydra app (parse, call, exit code).

Examples::

    cdi-train data=mnist model=mlp init=zeros trainer.max_epochs=1
    cdi-train -m init=zeros,ones,he data=mnist,fashion_mnist
    cdi-train model=custom model._target_=mypkg.nets.TinyNet +model.width=64
    cdi-train trainer.max_epochs=5 hydra.run.dir=outputs/runs/a   # resumes a/checkpoints/last.ckpt

Before Hydra creates any output directory, every job's config is composed and checked
(:func:`~cdi_experiments.run.preflight.preflight`): a bad value, a typo, or a resume under
another seed or init is one ``cdi-train: error: ...`` line and exit status 2. Lightning is
imported only when training starts, so ``--help``, ``--cfg job`` and config errors are fast.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import hydra
from omegaconf import DictConfig

from cdi_experiments.run.preflight import CONFIG_MODULE, CONFIG_NAME, preflight
from cdi_experiments.run.schema import ConfigError

EXIT_CONFIG = 2


@hydra.main(version_base="1.3", config_path=f"pkg://{CONFIG_MODULE}", config_name=CONFIG_NAME)
def _hydra_main(cfg: DictConfig) -> float | None:
    # The one lazy import of the app: run.train imports Lightning (3.4 s here), which --help,
    # --cfg and config errors never need.
    from cdi_experiments.run.train import train

    try:
        metrics, _ = train(cfg)
    except ConfigError as exc:
        _fail(exc)
    return metrics.get("test/acc")  # what a sweeper optimises


def _fail(exc: Exception) -> None:
    print(f"cdi-train: error: {exc}", file=sys.stderr)
    sys.exit(EXIT_CONFIG)


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point: check the command line (one-line errors, exit 2), then run Hydra.

    Args:
        argv: The arguments without the program name; default ``sys.argv[1:]``.
    """
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    try:
        preflight(sys.argv[1:])
    except ConfigError as exc:
        _fail(exc)
    _hydra_main()


if __name__ == "__main__":
    main()

__all__ = ["main"]
