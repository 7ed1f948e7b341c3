"""Shared fixtures: the REAL ``configs/`` composed with Hydra's compose API, shrunk for tests.

As in lightning-hydra-template: ``compose("train", overrides, return_hydra_config=True)``, then
a few images, one epoch, no progress bar, and ``tmp_path`` as the run directory (``run_dir``,
which ``train`` uses outside a Hydra job). ``run_cli`` runs the installed ``cdi-train`` in a
subprocess for what only the command line shows (Hydra's output dirs, exit codes, stderr).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
from omegaconf import DictConfig, OmegaConf, open_dict
from pytorch_lightning.callbacks import Callback

from cdi_experiments.run.preflight import compose_config

REPO = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO / "configs"
CDI_TRAIN = Path(sys.executable).parent / "cdi-train"
SMALL = 1000  # training images (and at most as many val/test images) in a short run

# A quick run: one epoch on SMALL images, one prune sparsity, no progress bar, logs to CSV.
SHRINK = [
    f"data.limit={SMALL}",
    "trainer.max_epochs=1",
    "trainer.enable_progress_bar=false",
    "++trainer.enable_model_summary=false",
    "prune.sparsities=[0.5]",
    "logger=csv",
]


def compose_cfg(overrides: Sequence[str] = (), hydra_node: bool = True) -> DictConfig:
    """The composed ``train`` config, exactly as ``cdi-train`` would compose it."""
    return compose_config(overrides, hydra_node=hydra_node)


def small_cfg(run_dir: Path, overrides: Sequence[str] = ()) -> DictConfig:
    """A shrunk config writing to ``run_dir``; ``overrides`` come after the shrinking ones."""
    cfg = compose_cfg([*SHRINK, *overrides])
    with open_dict(cfg):
        cfg.run_dir = str(run_dir)
    return cfg


def quick_cfg(run_dir: Path, *overrides: str) -> DictConfig:
    """``experiment=quick`` on SMALL images, no progress bar, writing to ``run_dir``; the
    config stays open (not struct) so tests may add keys."""
    cfg = compose_cfg(
        [
            "experiment=quick",
            f"data.limit={SMALL}",
            "trainer.enable_progress_bar=false",
            *overrides,
        ],
        hydra_node=False,
    )
    OmegaConf.set_struct(cfg, False)
    cfg.run_dir = str(run_dir)
    return cfg


@pytest.fixture
def cfg_train(tmp_path: Path) -> DictConfig:
    """The default config, shrunk, writing to ``tmp_path / "run"``."""
    return small_cfg(tmp_path / "run")


@pytest.fixture
def make_cfg(tmp_path: Path) -> Callable[..., DictConfig]:
    """``make_cfg(*overrides, name="run")``: a shrunk config writing to ``tmp_path / name``."""

    def make(*overrides: str, name: str = "run") -> DictConfig:
        return small_cfg(tmp_path / name, overrides)

    return make


def run_cli(
    args: Sequence[str],
    cwd: Path,
    *,
    module: bool = False,
    env: dict[str, str] | None = None,
    timeout: float = 300,
) -> subprocess.CompletedProcess[str]:
    """Run ``cdi-train *args`` (or ``python -m cdi_experiments.cli.train``) in ``cwd``.

    A single run goes to ``cwd/run`` unless ``args`` name a ``hydra.run.dir``; a sweep (``-m``)
    goes where ``hydra.sweep.dir`` says, by default under ``cwd/outputs``. ``env`` entries are
    added to ``os.environ``.
    """
    cmd = [sys.executable, "-m", "cdi_experiments.cli.train"] if module else [str(CDI_TRAIN)]
    if not any(a.startswith(("hydra.run.dir=", "-")) for a in args):
        args = [*args, f"hydra.run.dir={Path(cwd) / 'run'}"]
    full_env = {**os.environ, "HYDRA_FULL_ERROR": "0", **(env or {})}
    return subprocess.run(
        [*cmd, *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def cli_ok(proc: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    """``proc``, after asserting it exited 0 (its output tail in the failure message)."""
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )
    return proc


class CrashAfterFirstEpoch(Callback):
    """Test-only: raises at the end of the first epoch, before its checkpoint is written."""

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        raise RuntimeError("simulated crash after epoch 0")


def assert_awake_row(row, deltas, thresholds) -> None:
    """A logged metrics row holds, per parameter, the awake share at every threshold and the
    mean and max of ``|w - w0|`` that an independent recomputation (``deltas``) gives."""
    for name, d in deltas.items():
        for t in thresholds:
            count = int((d > t).sum())
            assert row[f"awake/{name}@{t:g}"] == pytest.approx(100 * count / d.size, rel=1e-9)
        assert row[f"delta_mean/{name}"] == pytest.approx(d.mean(), rel=1e-9)
        assert row[f"delta_max/{name}"] == d.max()
