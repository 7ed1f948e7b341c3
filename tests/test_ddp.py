"""DDP on CPU (2 processes, gloo) through ``cdi-train``: every rank generates the same initial
weights by itself (nothing broadcast), the datamodule shards the batches, Lightning's rank
processes write into the parent's run directory, and under ``-m`` each job starts its own ranks.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import SHRINK, SMALL, cli_ok, run_cli, small_cfg

from cdi_experiments.run import train as T

FINGERPRINT = (
    "+callbacks.fingerprint._target_=cdi_experiments.lightning.fingerprint.RankInitFingerprint"
)
BATCH = 64  # configs/data/mnist.yaml

pytestmark = pytest.mark.integration


def rank_fingerprints(run: Path) -> list[str]:
    return [(run / f"rank{k}_init.sha256").read_text().strip() for k in range(2)]


def test_ddp_ranks_start_identical_without_broadcast(tmp_path: Path) -> None:
    # Single process: the fingerprint of the module's weights right after init equals the
    # fingerprint of the regenerated initial weights (the callback's).
    ref = tmp_path / "single"
    _, objects = T.train(small_cfg(ref, [FINGERPRINT, "prune=off"]))
    [single] = [(ref / "rank0_init.sha256").read_text().strip()]
    assert single == objects["callback"].fingerprint
    assert not (ref / "rank1_init.sha256").exists()

    run = tmp_path / "run"
    proc = cli_ok(
        run_cli([*SHRINK, "trainer=ddp", FINGERPRINT, f"hydra.run.dir={run}"], cwd=tmp_path)
    )
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in proc.stdout + proc.stderr
    # Written in each rank's setup(), before DDP wraps the model (and broadcasts rank 0's).
    assert rank_fingerprints(run) == [single, single]

    # Lightning re-ran the command line for rank 1 pinned to the same run dir: no other
    # directory appeared, and rank 1 left only its log there.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "single"]
    assert (run / "train_ddp_process_1.log").is_file()
    assert sorted(p.name for p in (run / ".hydra").iterdir()) == [
        "config.yaml", "hydra.yaml", "overrides.yaml",
    ]  # fmt: skip

    # The datamodule sharded the batches: each rank ran half the steps of one process.
    ckpt = torch.load(run / "checkpoints/last.ckpt", weights_only=True)
    assert ckpt["global_step"] == math.ceil(SMALL // 2 / BATCH)
    # test/acc is reduced over both ranks' shards; the prune stage (rank 0 alone) sees the
    # whole test set too, so its accuracy before pruning is the same number.
    metrics = pd.read_csv(run / "metrics.csv")
    test_acc = metrics["test/acc"].dropna().item()
    prune = pd.read_csv(run / "prune_results.csv")
    assert prune["acc_before"].tolist() == pytest.approx([test_acc] * len(prune))
    info = json.loads((run / "run_info.json").read_text())
    assert info["generator"]["fingerprint"] == single


def test_ddp_in_a_sweep_starts_ranks_per_job(tmp_path: Path) -> None:
    args = [
        "-m",
        *SHRINK,
        "data.limit=500",
        "prune=off",
        "trainer=ddp",
        "init=zeros,he",
        FINGERPRINT,
    ]
    proc = cli_ok(run_cli(args, cwd=tmp_path))  # the default, ${now:}-named sweep dir
    assert (proc.stdout + proc.stderr).count("Launching 2 jobs") == 1  # rank 1 ran no sweep
    [day] = (tmp_path / "outputs/multirun").iterdir()
    [sweep] = day.iterdir()  # one sweep dir: the rank processes made none of their own
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [j.name.split("_")[0] for j in jobs] == ["0", "1"]
    prints = [rank_fingerprints(j) for j in jobs]
    assert all(a == b for a, b in prints)  # within a job, both ranks alike
    assert prints[0][0] != prints[1][0]  # job 1's rank 1 ran init=he, not job 0 again
    for job, scheme in zip(jobs, ("zeros", "he"), strict=True):
        info = json.loads((job / "run_info.json").read_text())
        assert info["config"]["init"]["scheme"] == scheme
        assert info["generator"]["fingerprint"] == rank_fingerprints(job)[0]
        assert (job / "train_ddp_process_1.log").read_text().count("deterministic init") == 1
