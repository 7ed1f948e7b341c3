"""The run lifecycle without training: the run-directory lock, ``status.json``, the sweep's
failure list, atomic checkpoint saves, the non-finite loss check, the config a checkpoint
carries, and the output directory ``cdi-train`` pins before Hydra writes.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from cdi_experiments.lightning.checkpoint_io import AtomicCheckpointIO
from cdi_experiments.lightning.classifier import Classifier, NonFiniteLossError
from cdi_experiments.paths import RunPaths
from cdi_experiments.run.lock import RunLockedError, lock_holder, run_lock
from cdi_experiments.run.preflight import check_command_line
from cdi_experiments.run.schema import ConfigError
from cdi_experiments.run.status import (
    config_fingerprint,
    is_finished,
    read_status,
    record_sweep_failure,
    sweep_failures,
    write_status,
)


def _python(code: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


TRY_LOCK = """
    import sys
    from cdi_experiments.run.lock import run_lock, RunLockedError
    try:
        with run_lock(sys.argv[1] if len(sys.argv) > 1 else {dir!r}, "cdi-train"):
            print("locked")
    except RunLockedError as exc:
        print(exc)
        sys.exit(2)
"""


# ----------------------------------------------------------------------------- lock


def test_a_second_process_is_refused_with_the_holders_pid(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with run_lock(run, "cdi-train"):
        assert lock_holder(run) == os.getpid()
        lock = RunPaths(run).lock
        before = (lock.read_bytes(), lock.stat().st_mtime_ns, sorted(os.listdir(run)))
        proc = _python(TRY_LOCK.format(dir=str(run)))
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 2, err
        [line] = out.splitlines()
        assert line == (
            f"{run} is in use by process {os.getpid()} (lock {lock}); wait for it to finish, "
            "or stop it, then rerun cdi-train, or write to another directory"
        )
        # Trying wrote nothing: not the PID, not a file.
        assert (lock.read_bytes(), lock.stat().st_mtime_ns, sorted(os.listdir(run))) == before
    # Released: a new holder takes it (and writes its PID).
    os.truncate(lock, 0)
    with run_lock(run, "cdi-train"):
        assert lock_holder(run) == os.getpid()


def test_the_lock_is_reentrant_in_one_process_and_skipped_by_ddp_ranks(tmp_path: Path) -> None:
    with run_lock(tmp_path, "cdi-train"), run_lock(tmp_path, "cdi-train"):
        pass  # a nested take by the same process (cdi-train, then train()) does not deadlock
    with run_lock(tmp_path, "cdi-train"):
        # A DDP rank process of the same job (Lightning sets LOCAL_RANK) runs under rank 0's lock.
        proc = _python(TRY_LOCK.format(dir=str(tmp_path)), env={"LOCAL_RANK": "1"})
        assert proc.communicate(timeout=60)[0].strip() == "locked"


def test_a_killed_holder_leaves_no_stale_lock(tmp_path: Path) -> None:
    holder = _python(
        f"""
        import time
        from cdi_experiments.run.lock import run_lock
        with run_lock({str(tmp_path)!r}, "cdi-train"):
            print("holding", flush=True)
            time.sleep(120)
        """
    )
    assert holder.stdout.readline().strip() == "holding"
    with pytest.raises(RunLockedError, match=f"in use by process {holder.pid} "):
        with run_lock(tmp_path, "cdi-train"):
            pass
    holder.send_signal(signal.SIGKILL)
    holder.communicate(timeout=60)
    with run_lock(tmp_path, "cdi-train"):  # the OS released it with the process
        assert lock_holder(tmp_path) == os.getpid()


def test_run_locked_error_is_a_config_error() -> None:
    assert issubclass(RunLockedError, ConfigError)  # one line and exit 2 at every command line


# ----------------------------------------------------------------------------- status


def test_status_round_trip_and_fingerprint(tmp_path: Path) -> None:
    cfg = OmegaConf.create({"seed": 0, "lr": "${x}", "x": 0.5})
    fp = config_fingerprint(cfg)
    assert fp == config_fingerprint({"x": 0.5, "lr": 0.5, "seed": 0})  # resolved, key order free
    assert fp != config_fingerprint({"x": 0.5, "lr": 0.5, "seed": 1})
    assert read_status(tmp_path) is None and not is_finished(tmp_path)
    write_status(tmp_path, "running", fp)
    running = read_status(tmp_path)
    assert running["state"] == "running" and running["pid"] == os.getpid()
    assert running["config_sha256"] == fp and running["finished_at"] is None
    write_status(tmp_path, "failed", fp, "non-finite loss")
    failed = json.loads(RunPaths(tmp_path).status.read_text())
    assert failed["reason"] == "non-finite loss" and failed["started_at"] == running["started_at"]
    assert not is_finished(tmp_path)
    write_status(tmp_path, "finished", fp)
    assert is_finished(tmp_path) and read_status(tmp_path)["finished_at"]
    with pytest.raises(ValueError, match="state='done' is not one of running, finished"):
        write_status(tmp_path, "done", fp)
    RunPaths(tmp_path).status.write_text('{"state": "DONE"}')  # not ours: not trusted
    assert read_status(tmp_path) is None and not is_finished(tmp_path)


def test_sweep_failures_collect_lines_from_other_processes(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")  # job processes inherit the sweep's environment
    with sweep_failures(tmp_path) as failures:
        procs = [
            ctx.Process(target=record_sweep_failure, args=(f"job{i}", "non-finite loss:\n nan"))
            for i in range(3)
        ]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join(timeout=60)
            assert proc.exitcode == 0
    assert sorted(failures) == [f"job{i}: non-finite loss: nan" for i in range(3)]
    assert list(tmp_path.iterdir()) == []  # the list file is gone
    record_sweep_failure("job", "x")  # outside a sweep: nothing to record into
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- checkpoints


def test_atomic_checkpoint_io_saves_beside_the_target(tmp_path: Path, monkeypatch) -> None:
    io = AtomicCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"w": torch.arange(3)}, path)
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.arange(3))
    before = path.read_bytes()

    staged: list[str] = []
    real_replace = os.replace

    def failing_replace(src, dst):
        staged.append(str(src))
        raise OSError(5, "simulated I/O error")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="simulated"):
        io.save_checkpoint({"w": torch.arange(5)}, path)
    monkeypatch.setattr(os, "replace", real_replace)
    # Staged in the target's own directory (not $TMPDIR), and cleaned up; the old file intact.
    assert [Path(s).parent for s in staged] == [path.parent]
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]
    assert io.load_checkpoint(path, weights_only=True)["w"].tolist() == [0, 1, 2]


def test_a_checkpoint_carries_its_config_and_loads_weights_only(tmp_path: Path) -> None:
    lit = Classifier(model_cfg={"_target_": "torch.nn.Linear", "in_features": 2, "out_features": 2})
    checkpoint: dict = {}
    lit.on_save_checkpoint(checkpoint)
    assert "config" not in checkpoint["cdi"]  # a bare module knows no run config
    lit.run_config = {"seed": 3, "init": {"scheme": "he", "params": {}}, "lr": [1e-3]}
    lit.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, tmp_path / "c.ckpt")
    loaded = torch.load(tmp_path / "c.ckpt", weights_only=True)
    assert loaded["cdi"]["config"] == lit.run_config


def test_a_non_finite_loss_stops_the_step() -> None:
    lit = Classifier(model_cfg={"_target_": "torch.nn.Linear", "in_features": 2, "out_features": 3})
    x, y = torch.ones(4, 2), torch.tensor([0, 1, 2, 0])
    assert torch.isfinite(lit.training_step((x, y), 0))
    with torch.no_grad():
        lit.model.weight.fill_(float("inf"))
    with pytest.raises(
        NonFiniteLossError,
        match=r"^non-finite loss: train/loss=nan at epoch 0, batch 7 \(global step 0\); the run "
        r"stopped; lower optimizer.lr or change the init",
    ):
        lit.training_step((x, y), 7)
    with pytest.raises(NonFiniteLossError, match="test/loss=nan"):
        lit.test_step((x, y), 0)


# ----------------------------------------------------------------------------- pinned dirs


def test_the_output_dir_is_pinned_before_hydra_composes_again(tmp_path: Path) -> None:
    # The default run dir holds ${now:...}: pinned, so the directory locked is Hydra's.
    line = check_command_line(["experiment=quick"])
    assert line.jobs == 1 and not line.multirun
    assert "${" not in str(line.output_dir) and str(line.output_dir).startswith("outputs/runs/")
    assert line.argv == ["experiment=quick", f"hydra.run.dir='{line.output_dir}'"]
    # A literal directory is left as given.
    given = ["experiment=quick", f"hydra.run.dir={tmp_path}"]
    line = check_command_line(given)
    assert line.output_dir == tmp_path and line.argv == given
    # A sweep pins its sweep directory.
    line = check_command_line(["-m", "seed=0,1"])
    assert line.multirun and line.jobs == 2 and str(line.output_dir).startswith("outputs/multirun")
    assert line.argv == ["-m", "seed=0,1", f"hydra.sweep.dir='{line.output_dir}'"]
    # Other Hydra flags are Hydra's.
    assert check_command_line(["--cfg", "job"]).output_dir is None


def test_the_trainer_saves_checkpoints_atomically(tmp_path: Path) -> None:
    from cdi_experiments.run import build
    from cdi_experiments.run.preflight import compose_config

    cfg = compose_config(["trainer.enable_progress_bar=false"], hydra_node=False)
    trainer = build.build_trainer(cfg, RunPaths(tmp_path), [], [])
    assert type(trainer.strategy.checkpoint_io) is AtomicCheckpointIO
