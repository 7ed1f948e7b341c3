"""DDP (and FSDP2: ``trainer=fsdp2``'s ModelParallelStrategy starts its ranks the same way)
inside a Hydra multirun: each job starts its own ranks, running that job only.

Lightning's subprocess launcher re-runs ``sys.argv`` for ranks 1..N-1, ``-m`` and all, so inside
a multirun every rank-1 process would run the whole sweep (in a sweep directory of its own when
``hydra.sweep.dir`` holds a ``${now:}``), pairing with the parent's jobs only by luck, and not at
all under joblib. There is no public hook for the rank command yet (upstream:
https://github.com/hydra-ecosystem/hydra/issues/2070 and
https://github.com/Lightning-AI/pytorch-lightning/pull/18175), so this module patches Lightning's
private ``_hydra_subprocess_cmd``, and is the only place that does.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from typing import Any
from unittest import mock

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import get_original_cwd
from pytorch_lightning.strategies.launchers import subprocess_script

_DDP_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")


def ddp_rank_command(local_rank: int) -> tuple[list[str], str]:
    """The command DDP rank ``local_rank`` starts with inside a Hydra multirun job: this job's
    own overrides as a single run into this job's directory."""
    hc = HydraConfig.get()
    command = [sys.executable, "-m", "cdi_experiments.cli.train", *hc.overrides.task]
    command += [
        f'hydra.run.dir="{hc.runtime.output_dir}"',
        f"hydra.job.name=train_ddp_process_{local_rank}",
        "hydra.output_subdir=null",
    ]
    return command, get_original_cwd()


@contextlib.contextmanager
def ddp_ranks_per_job() -> Iterator[None]:
    """Let each Hydra multirun job start its own DDP ranks, running that job only.

    Inside a multirun, :func:`ddp_rank_command` replaces Lightning's rank command. Afterwards
    the process group is destroyed and the DDP variables Lightning put into ``os.environ``
    (``LOCAL_RANK`` among them, which tells Lightning that the ranks exist already) are
    restored, so the next job starts its own ranks.
    """
    saved = {k: os.environ.get(k) for k in _DDP_ENV}
    dist = torch.distributed
    had_group = dist.is_available() and dist.is_initialized()
    patch: Any = contextlib.nullcontext()
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        patch = mock.patch.object(subprocess_script, "_hydra_subprocess_cmd", ddp_rank_command)
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


__all__ = ["ddp_rank_command", "ddp_ranks_per_job"]
