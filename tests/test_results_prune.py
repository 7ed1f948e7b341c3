"""``cdi-prune`` never overwrites results, skips what it has done, and prunes a checkpoint with
the config stored in it (not whatever config lies next to it)."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
import yaml
from conftest import quick_cfg
from omegaconf import OmegaConf

from cdi_experiments.cli import prune as prune_cli
from cdi_experiments.run import prune_stage
from cdi_experiments.run import train as train_mod
from cdi_experiments.run.schema import task_config

pytestmark = pytest.mark.integration  # trains a model, runs cdi-prune

RESULTS = ("prune_results.csv", "pruned_sleeping.pt")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One epoch of the MLP on 1000 MNIST images; the stage prunes at 0.5."""
    run_dir = tmp_path_factory.mktemp("results_run")
    cfg = quick_cfg(run_dir, "trainer.max_epochs=1", "prune.sparsities=[0.5]")
    metrics, _ = train_mod.train(cfg)
    config = OmegaConf.to_container(task_config(cfg), resolve=True)
    return SimpleNamespace(
        dir=run_dir,
        ckpt=run_dir / "checkpoints" / "last.ckpt",
        config=config,
        test_acc=metrics["test/acc"],
        table=pd.read_csv(run_dir / "prune_results.csv"),
    )


def snapshot(directory: Path) -> dict[str, tuple[bytes, int]]:
    """Every file below ``directory``: its bytes and mtime."""
    return {
        str(p.relative_to(directory)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def copy_run(run, dst: Path, *, config: dict | None = None, drop_config: bool = False) -> Path:
    """``dst/checkpoints/last.ckpt``: the run's checkpoint, with ``cdi.config`` set or dropped."""
    ckpt = torch.load(run.ckpt, weights_only=True)
    ckpt.setdefault("cdi", {})
    if drop_config:
        ckpt["cdi"].pop("config", None)
    else:
        ckpt["cdi"]["config"] = config if config is not None else run.config
    path = dst / "checkpoints" / "last.ckpt"
    path.parent.mkdir(parents=True)
    torch.save(ckpt, path)
    return path


def prune(capsys, *argv: str) -> SimpleNamespace:
    code = prune_cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return SimpleNamespace(code=code, out=out, err=err)


# ----------------------------------------------------------------------------- never overwritten


def test_each_invocation_writes_its_own_directory(run, tmp_path, capsys):
    ckpt = copy_run(run, tmp_path / "r")
    (tmp_path / "r" / "prune_results.csv").write_bytes(b"the training run's table\n")
    (tmp_path / "r" / "pruned_sleeping.pt").write_bytes(b"the training run's model")
    before = snapshot(tmp_path / "r")

    first = prune(capsys, ckpt, "--sparsities", "0.5")
    assert first.code == 0, first.err
    second = prune(capsys, ckpt, "--sparsities", "0.8", "--criteria", "magnitude,random")
    assert second.code == 0, second.err

    after = snapshot(tmp_path / "r")
    assert {k: v for k, v in after.items() if k in before} == before  # nothing replaced
    names = sorted(p.name for p in (tmp_path / "r" / "prune").iterdir())
    assert len(names) == 2
    assert re.fullmatch(r"sparsities=0\.5-[0-9a-f]{8}", names[1]), names
    assert re.fullmatch(r"criteria=magnitude\+random,sparsities=0\.8-[0-9a-f]{8}", names[0])
    for name, line in ((names[1], first.out), (names[0], second.out)):
        out = tmp_path / "r" / "prune" / name
        assert {p.name for p in out.iterdir()} >= {*RESULTS, "invocation.json", "DONE"}
        assert f"prune table: {out / 'prune_results.csv'}" in line
    table = pd.read_csv(tmp_path / "r" / "prune" / names[0] / "prune_results.csv")
    assert set(table["criterion"]) == {"magnitude", "random"}
    assert set(table["target"]) == {"matched@1e-05", "0.8"}
    # the first invocation's table equals the stage's own (same checkpoint, same arguments)
    pd.testing.assert_frame_equal(
        pd.read_csv(tmp_path / "r" / "prune" / names[1] / "prune_results.csv"), run.table
    )


def test_the_same_invocation_again_is_skipped(run, tmp_path, capsys, monkeypatch):
    ckpt = copy_run(run, tmp_path / "r")
    assert prune(capsys, ckpt, "--sparsities", "0.5").code == 0
    [out] = (tmp_path / "r" / "prune").iterdir()
    before = snapshot(out)

    def must_not_run(*args, **kwargs):
        raise AssertionError("a finished invocation was computed again")

    monkeypatch.setattr(prune_stage, "run_prune_stage", must_not_run)
    again = prune(capsys, ckpt, "--sparsities", "0.5")
    assert again.code == 0, again.err
    assert again.out.splitlines() == [
        f"already done: {out / 'prune_results.csv'} (this checkpoint with these arguments); "
        f"delete {out} to compute it again"
    ]
    assert snapshot(out) == before


def test_a_half_written_directory_is_redone(run, tmp_path, capsys):
    ckpt = copy_run(run, tmp_path / "r")
    assert prune(capsys, ckpt, "--sparsities", "0.5").code == 0
    [out] = (tmp_path / "r" / "prune").iterdir()
    whole = (out / "prune_results.csv").read_bytes()
    (out / "DONE").unlink()  # killed before the end: results half-written
    (out / "prune_results.csv").write_bytes(whole[: len(whole) // 3])
    redo = prune(capsys, ckpt, "--sparsities", "0.5")
    assert redo.code == 0, redo.err
    assert "prune table:" in redo.out
    assert (out / "prune_results.csv").read_bytes() == whole
    assert (out / "DONE").is_file()


def test_a_retrained_checkpoint_gets_a_new_directory(run, tmp_path, capsys):
    ckpt = copy_run(run, tmp_path / "r")
    assert prune(capsys, ckpt, "--sparsities", "0.5").code == 0
    state = torch.load(ckpt, weights_only=True)
    state["global_step"] += 1  # as if training went on: another last.ckpt
    torch.save(state, ckpt)
    assert prune(capsys, ckpt, "--sparsities", "0.5").code == 0
    names = [p.name for p in (tmp_path / "r" / "prune").iterdir()]
    assert len(names) == 2 and all(n.startswith("sparsities=0.5-") for n in names)
    other = ckpt.with_name("epoch=0-step=16.ckpt")
    other.write_bytes(ckpt.read_bytes())
    assert prune(capsys, other).code == 0
    assert any(
        re.fullmatch(r"ckpt=epoch=0-step=16-[0-9a-f]{8}", p.name)
        for p in (tmp_path / "r" / "prune").iterdir()
    )


def test_out_holding_other_results_is_refused(run, tmp_path, capsys):
    before = snapshot(run.dir)
    bad = prune(capsys, run.ckpt, "--sparsities", "0.5", "--out", run.dir)
    assert bad.code == 2
    assert bad.err == (
        f"cdi-prune: error: --out {run.dir} already holds prune_results.csv, pruned_sleeping.pt "
        "that cdi-prune did not write there (a training run's?); results are never "
        "overwritten: pass an empty or new --out, or leave --out out (results go to "
        "<run>/prune/<name>/)\n"
    )
    assert snapshot(run.dir) == before
    # an --out holding another invocation's results
    out = tmp_path / "out"
    assert prune(capsys, run.ckpt, "--sparsities", "0.5", "--out", out).code == 0
    other = prune(capsys, run.ckpt, "--sparsities", "0.8", "--out", out)
    assert other.code == 2
    assert other.err.startswith(f"cdi-prune: error: --out {out} holds the results of another ")
    assert json.loads((out / "invocation.json").read_text())["arguments"] == {"sparsities": [0.5]}


def test_a_second_process_on_the_same_directory_gets_one_line(run, tmp_path, capsys):
    ckpt = copy_run(run, tmp_path / "r")
    key = prune_stage.invocation_key(
        hashlib.sha256(ckpt.read_bytes()).hexdigest(), {"sparsities": [0.5]}
    )
    out = tmp_path / "r" / "prune" / prune_stage.invocation_name(ckpt, {"sparsities": [0.5]}, key)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from cdi_experiments.run.lock import run_lock\n"
            f"with run_lock({str(out)!r}, 'cdi-prune'):\n"
            "    print('locked', flush=True); time.sleep(120)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        busy = prune(capsys, ckpt, "--sparsities", "0.5")
    finally:
        holder.kill()
        holder.wait()
    assert busy.code == 2
    assert busy.err.startswith(f"cdi-prune: error: {out} is in use by process {holder.pid} ")
    assert busy.err.count("\n") == 1
    assert sorted(p.name for p in out.iterdir()) == [".lock"]  # nothing written
    # the lock died with its holder: the next run proceeds
    assert prune(capsys, ckpt, "--sparsities", "0.5").code == 0


# ----------------------------------------------------------------------------- the checkpoint's config


def test_the_checkpoints_own_config_is_used(run, tmp_path, capsys):
    """Beside it, a run_info.json of a FashionMNIST run: the checkpoint says MNIST, and wins."""
    ckpt = copy_run(run, tmp_path / "r")
    fashion = json.loads(json.dumps(run.config))
    fashion["data"]["name"] = "fashion_mnist"
    (tmp_path / "r" / "run_info.json").write_text(json.dumps({"config": fashion}))
    result = prune(capsys, ckpt)
    assert result.code == 0, result.err
    [out] = (tmp_path / "r" / "prune").iterdir()
    table = pd.read_csv(out / "prune_results.csv")
    assert table["acc_before"].iloc[0] == pytest.approx(run.test_acc, abs=1e-6)


def write_neighbour_config(run_dir: Path, config: dict) -> Path:
    """``<run_dir>/.hydra/config.yaml`` holding ``config``, as Hydra writes it."""
    path = run_dir / ".hydra" / "config.yaml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump(config))
    return path


def test_a_checkpoint_copied_into_another_run_is_refused(run, tmp_path, capsys):
    ckpt = copy_run(run, tmp_path / "r")
    other = json.loads(json.dumps(run.config))
    other["data"]["name"] = "fashion_mnist"
    other["seed"] = 3
    hydra_cfg = write_neighbour_config(tmp_path / "r", other)
    bad = prune(capsys, ckpt)
    assert bad.code == 2
    assert bad.err == (
        f"cdi-prune: error: {ckpt} was trained with another config than {hydra_cfg}: "
        "data.name: 'mnist' vs 'fashion_mnist'; seed: 0 vs 3 (checkpoint vs file); put the "
        "checkpoint back in its own run directory, or copy it to a folder of its own\n"
    )
    assert not (tmp_path / "r" / "prune").exists()


def test_an_older_checkpoint_falls_back_to_its_neighbour_with_a_warning(run, tmp_path):
    ckpt = copy_run(run, tmp_path / "r", drop_config=True)
    hydra_cfg = write_neighbour_config(tmp_path / "r", run.config)
    result = subprocess.run(
        [str(Path(sys.executable).parent / "cdi-prune"), str(ckpt), "--sparsities", "0.5"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    warnings = [ln for ln in result.stderr.splitlines() if ln.startswith("WARNING")]
    assert warnings == [
        f"WARNING: {ckpt} holds no config (written before checkpoints carried one); "
        f"using {hydra_cfg} beside it"
    ]
    [out] = (tmp_path / "r" / "prune").iterdir()
    pd.testing.assert_frame_equal(pd.read_csv(out / "prune_results.csv"), run.table)


def test_an_older_checkpoint_is_still_checked_against_its_neighbour(run, tmp_path, capsys):
    """No stored config: its model and data states still tell an MLP on MNIST."""
    ckpt = copy_run(run, tmp_path / "r", drop_config=True)
    other = json.loads(json.dumps(run.config))
    other["data"]["name"] = "fashion_mnist"
    other["model"] = {"_target_": "cdi_experiments.models.CNN", "channels": [8, 16]}
    hydra_cfg = write_neighbour_config(tmp_path / "r", other)
    bad = prune(capsys, ckpt)
    assert bad.code == 2
    assert bad.err == (
        f"cdi-prune: error: {ckpt} was trained with another config than {hydra_cfg}: "
        "model._target_: 'cdi_experiments.models.MLP' vs 'cdi_experiments.models.CNN'; "
        "data.name: 'mnist' vs 'fashion_mnist' (checkpoint vs file); put the checkpoint back "
        "in its own run directory, or copy it to a folder of its own\n"
    )
