"""Test-only fault hooks that run *inside* ``cdi-train`` (the library never imports this).

Injected from the command line as a Lightning callback, with ``tests/`` on ``PYTHONPATH``::

    cdi-train ... +callbacks.faults._target_=faults.hooks.FaultAt

The fault and its moment come from the environment, so the faulted run, its rerun and the
uninterrupted reference run share one command line (and so one config):

- ``CDI_FAULT=<action>@<moment>``: what to do, and when. Actions: ``kill`` (SIGKILL), ``term``
  (SIGTERM), ``int`` (SIGINT), ``hold`` (write ``$CDI_FAULT_DIR/ready`` holding the PID, then
  wait for ``$CDI_FAULT_DIR/release``), ``fill`` (fill the filesystem holding
  ``$CDI_FAULT_DIR`` with a ``ballast`` file), ``enospc`` (from then on, opening a file for
  writing under the run directory raises ``OSError(ENOSPC)``: the stand-in for ``fill`` where
  no tmpfs can be mounted). Moments: ``mid_epoch`` (after batch 2 of epoch
  1), ``after_checkpoint`` (right after the first checkpoint is written), ``test`` (after the
  first test batch), ``prune`` (at the prune stage's first log record) and ``figures`` (as the
  second figure is about to be saved, the first one written).
- ``CDI_FAULT_ONCE=<path>``: fire only while this file does not exist; it is created just
  before firing, so rerunning the same command runs clean.
- ``CDI_FAULT_WHERE=<text>``: fire only in a run whose output directory contains ``text``
  (one job of a sweep).

Without ``CDI_FAULT`` the callback does nothing and holds no state (nothing in checkpoints).
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import time
from pathlib import Path

from pytorch_lightning.callbacks import Callback

MOMENTS = ("mid_epoch", "after_checkpoint", "test", "prune", "figures")
ACTIONS = ("kill", "term", "int", "hold", "fill", "enospc")
MID_EPOCH = (1, 2)  # (epoch, batch index): inside the second of two epochs
HOLD_LIMIT_S = 600  # a held run gives up waiting (and continues) after this long


def _fault() -> tuple[str, str] | None:
    spec = os.environ.get("CDI_FAULT")
    if not spec:
        return None
    action, _, moment = spec.partition("@")
    if action not in ACTIONS or moment not in MOMENTS:
        raise ValueError(
            f"CDI_FAULT={spec!r}: expected <{'|'.join(ACTIONS)}>@<{'|'.join(MOMENTS)}>"
        )
    return action, moment


def _here(trainer) -> str:
    try:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            return str(HydraConfig.get().runtime.output_dir)
    except Exception:  # noqa: BLE001 - outside a Hydra job
        pass
    return str(getattr(trainer, "default_root_dir", ""))


def fill_filesystem(ballast: Path) -> int:
    """Write ``ballast`` until its filesystem is full; returns the bytes written."""
    written = 0
    with open(ballast, "wb", buffering=0) as f:
        for chunk in (1 << 20, 1 << 16, 1 << 12, 1):
            block = b"\0" * chunk
            while True:
                try:
                    n = f.write(block)
                except OSError as exc:
                    if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                        raise
                    break
                written += n or 0
    return written


def refuse_writes_under(root: Path) -> None:
    """Make every later open-for-writing of a file under ``root`` fail with ENOSPC (Python's
    ``open``/``io.open``/``os.open``: what the atomic writers, CSV logger and savefig use)."""
    import builtins
    import io

    root_text = str(root.absolute())
    real_open, real_os_open = builtins.open, os.open
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND

    def under(file) -> bool:
        return isinstance(file, (str, os.PathLike)) and str(
            Path(os.fspath(file)).absolute()
        ).startswith(root_text)

    def full(file):
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(file))

    def guarded_open(file, mode="r", *args, **kwargs):
        if under(file) and any(c in mode for c in "wax+"):
            raise full(file)
        return real_open(file, mode, *args, **kwargs)

    def guarded_os_open(path, flags, *args, **kwargs):
        if under(path) and flags & write_flags:
            raise full(path)
        return real_os_open(path, flags, *args, **kwargs)

    builtins.open = io.open = guarded_open
    os.open = guarded_os_open


class FaultAt(Callback):
    """Fire the fault named by ``$CDI_FAULT`` once, at its moment (see the module docstring)."""

    def __init__(self) -> None:
        self.fault = _fault()
        self.fired = False
        self.saves = 0
        self.figures = 0
        self.trainer = None

    # ---------------------------------------------------------------- firing
    def _armed(self, moment: str, trainer=None) -> bool:
        if self.fault is None or self.fired or self.fault[1] != moment:
            return False
        where = os.environ.get("CDI_FAULT_WHERE")
        if where and where not in _here(trainer):
            return False
        once = os.environ.get("CDI_FAULT_ONCE")
        if once:
            if Path(once).exists():
                return False
            Path(once).write_text(f"{self.fault[0]}@{moment} pid {os.getpid()}\n")
        return True

    def _fire(self) -> None:
        self.fired = True
        action = self.fault[0]
        directory = Path(os.environ.get("CDI_FAULT_DIR", "."))
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif action in ("term", "int"):
            os.kill(os.getpid(), signal.SIGTERM if action == "term" else signal.SIGINT)
        elif action == "hold":
            (directory / "ready").write_text(str(os.getpid()))
            deadline = time.monotonic() + HOLD_LIMIT_S
            while not (directory / "release").exists() and time.monotonic() < deadline:
                time.sleep(0.05)
        elif action == "fill":
            fill_filesystem(directory / "ballast")
        elif action == "enospc":
            refuse_writes_under(Path(_here(self.trainer)))

    def _maybe(self, moment: str, trainer=None) -> None:
        self.trainer = trainer
        if self._armed(moment, trainer):
            self._fire()

    # ---------------------------------------------------------------- moments
    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.fault is None or stage != "fit":
            return
        moment = self.fault[1]
        if moment == "after_checkpoint" and not getattr(trainer, "_faults_wrapped", False):
            save = trainer.save_checkpoint

            def save_then_fault(*args, **kwargs):
                out = save(*args, **kwargs)
                self._maybe("after_checkpoint", trainer)
                return out

            trainer.save_checkpoint = save_then_fault
            trainer._faults_wrapped = True
        elif moment == "prune":
            callback = self

            class _AtFirstRecord(logging.Handler):
                def emit(self, record: logging.LogRecord) -> None:
                    callback._maybe("prune", trainer)

            logging.getLogger("cdi_experiments.pruning").addHandler(_AtFirstRecord())
            logging.getLogger("cdi_experiments.run.prune_stage").addHandler(_AtFirstRecord())
        elif moment == "figures":
            import matplotlib.figure

            savefig = matplotlib.figure.Figure.savefig
            callback = self

            def savefig_with_fault(fig, *args, **kwargs):
                callback.figures += 1
                if callback.figures == 2:
                    callback._maybe("figures", trainer)
                return savefig(fig, *args, **kwargs)

            matplotlib.figure.Figure.savefig = savefig_with_fault

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if (trainer.current_epoch, batch_idx) == MID_EPOCH:
            self._maybe("mid_epoch", trainer)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self._maybe("test", trainer)
