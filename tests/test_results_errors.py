"""One-line errors for bad checkpoints and full disks, without training anything.

Every path that reads a checkpoint goes through :func:`load_checkpoint`: a truncated, malicious
or foreign file is one line naming the file and the fix, and torch's advice to retry with
``weights_only=False`` is never passed on. A full disk while writing a result is one line
naming the file and the filesystem, and leaves the old file as it was.
"""

from __future__ import annotations

import errno
import io
import os
import pickle
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import compose_cfg

from cdi_experiments import paths
from cdi_experiments.cli import prune as prune_cli
from cdi_experiments.run.checkpoint import CheckpointError, load_checkpoint
from cdi_experiments.run.resume import check_resume
from cdi_experiments.run.schema import ConfigError, task_config

FIX = "delete it"


class _RunsCode:
    """Unpickling this calls os.system: what a malicious checkpoint would do."""

    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def _lightning_like(**extra) -> dict:
    return {"epoch": 0, "global_step": 1, "state_dict": {"w": torch.zeros(2)}, **extra}


@pytest.fixture
def bad_files(tmp_path: Path) -> dict[str, Path]:
    files = {}

    def save(name: str, obj) -> None:
        files[name] = tmp_path / f"{name}.ckpt"
        torch.save(obj, files[name])

    save("malicious", _lightning_like(callbacks={"x": _RunsCode()}))
    save("state_dict", {"fc.weight": torch.zeros(2, 2), "fc.bias": torch.zeros(2)})
    save("lightning", _lightning_like(callbacks={"ModelCheckpoint{}": {}}))
    whole = (tmp_path / "lightning.ckpt").read_bytes()
    files["truncated"] = tmp_path / "truncated.ckpt"
    files["truncated"].write_bytes(whole[: len(whole) // 2])
    files["empty"] = tmp_path / "empty.ckpt"
    files["empty"].write_bytes(b"")
    files["text"] = tmp_path / "text.ckpt"
    files["text"].write_text("epoch: 3\n")
    files["pickle"] = tmp_path / "pickle.ckpt"
    files["pickle"].write_bytes(pickle.dumps({"a": 1}, protocol=4))
    return files


EXPECTED = {
    "malicious": "is not a safe checkpoint: it would call posix.system, which a weights-only "
    "load refuses (not written by cdi-train; do not load it otherwise); delete it",
    "state_dict": "is not a cdi-train checkpoint: it holds a plain state dict "
    "(torch.save(model.state_dict())); delete it",
    "lightning": "is not a cdi-train checkpoint: it has no DeterministicInitCallback state "
    "(a Lightning checkpoint from another program?); delete it",
    "truncated": "is truncated or not a torch checkpoint (",
    "empty": "is truncated or not a torch checkpoint (the file is empty); delete it",
    "text": "is truncated or not a torch checkpoint (9 bytes of something else); delete it",
    "pickle": "is not a safe checkpoint: it holds objects beyond tensors",
}


@pytest.mark.parametrize("kind", list(EXPECTED))
def test_bad_checkpoint_is_one_line_naming_file_and_fix(bad_files, kind, capfd):
    path = bad_files[kind]
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, fix=FIX)
    message = str(info.value)
    assert message.startswith(f"{path} {EXPECTED[kind]}"), message
    assert message.endswith(FIX) and "\n" not in message
    assert "weights_only" not in message and "will likely succeed" not in message
    assert capfd.readouterr().err == ""  # torch's pickle-protocol warning is not shown either


def test_truncated_checkpoint_says_the_end_is_missing(bad_files):
    size = bad_files["truncated"].stat().st_size
    with pytest.raises(CheckpointError, match=rf"\({size} bytes, the end of the file is missing\)"):
        load_checkpoint(bad_files["truncated"], fix=FIX)


def test_malicious_checkpoint_never_runs(bad_files, tmp_path, monkeypatch):
    ran = []
    monkeypatch.setattr(os, "system", lambda cmd: ran.append(cmd))
    with pytest.raises(CheckpointError):
        load_checkpoint(bad_files["malicious"], fix=FIX)
    assert ran == []


@pytest.mark.parametrize("kind", ["malicious", "truncated", "state_dict", "text"])
def test_resume_refuses_a_bad_last_ckpt_in_one_line(bad_files, tmp_path, kind):
    """What cdi-train's preflight calls before Hydra writes anything."""
    run_dir = tmp_path / "run"
    last = run_dir / "checkpoints" / "last.ckpt"
    last.parent.mkdir(parents=True)
    last.write_bytes(bad_files[kind].read_bytes())
    cfg = task_config(compose_cfg(["data.limit=100"]))
    with pytest.raises(ConfigError) as info:
        check_resume(cfg, run_dir)
    message = str(info.value)
    assert message.startswith(f"{last} ") and "\n" not in message
    assert message.endswith(
        "move it away or delete it to start this run over, or pass a new hydra.run.dir"
    )
    assert "will likely succeed" not in message
    assert sorted(p.name for p in run_dir.rglob("*")) == ["checkpoints", "last.ckpt"]


def test_cdi_prune_on_a_directory_suggests_its_last_ckpt(tmp_path, capsys):
    out = tmp_path / "out"
    assert prune_cli.main([str(tmp_path), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"cdi-prune: error: {tmp_path} is a directory, not a checkpoint file; pass "
        f"{tmp_path / 'checkpoints' / 'last.ckpt'}\n"
    )
    assert not out.exists()


@pytest.mark.parametrize("kind", ["malicious", "truncated", "state_dict"])
def test_cdi_prune_refuses_a_bad_checkpoint_in_one_line(bad_files, tmp_path, capsys, kind):
    run_dir = tmp_path / "run"
    last = run_dir / "checkpoints" / "last.ckpt"
    last.parent.mkdir(parents=True)
    last.write_bytes(bad_files[kind].read_bytes())
    assert prune_cli.main([str(last)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"cdi-prune: error: {last} ") and err.count("\n") == 1, err
    assert "will likely succeed" not in err
    assert sorted(p.name for p in run_dir.rglob("*")) == ["checkpoints", "last.ckpt"]


# ----------------------------------------------------------------------------- full disk


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_full_disk_is_one_line_naming_file_and_filesystem(tmp_path):
    target = tmp_path / "metrics.csv"
    target.write_text("epoch\n0\n")

    def fill(tmp: Path) -> None:
        tmp.write_text("epoch\n0\n1")
        _disk_full()

    with pytest.raises(paths.DiskFullError) as info:
        paths.atomic_write(target, fill)
    fs = paths.mount_point(tmp_path)
    assert str(info.value) == (
        f"cannot write {target}: no space left on {fs} (No space left on device); "
        f"free space on {fs} and rerun"
    )
    assert info.value.path == target and isinstance(info.value, OSError)
    assert target.read_text() == "epoch\n0\n"  # the old file, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.csv"]  # no temp file left


def test_a_used_up_quota_is_named_as_such(tmp_path):
    def over_quota(tmp: Path) -> None:
        raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))

    with pytest.raises(paths.DiskFullError) as info:
        paths.atomic_write(tmp_path / "metrics.csv", over_quota)
    fs = paths.mount_point(tmp_path)
    assert str(info.value) == (
        f"cannot write {tmp_path / 'metrics.csv'}: your disk quota is used up on {fs} "
        f"({os.strerror(errno.EDQUOT)}); free space or raise the quota on {fs} and rerun"
    )
    assert info.value.errno == errno.EDQUOT


def test_full_disk_for_csv_and_torch_writers(tmp_path, monkeypatch):
    """The CSV and torch writers (torch's own file writer would say a bare RuntimeError)."""
    # the torch writer syncs its temporary file before the rename: a full disk (or quota)
    # surfaces there at the latest, with the bytes written so far on disk
    monkeypatch.setattr(paths.os, "fsync", _disk_full)
    with pytest.raises(paths.DiskFullError, match=r"cannot write .*pruned_sleeping\.pt: no space"):
        paths.atomic_torch_save(tmp_path / "pruned_sleeping.pt", {"w": torch.zeros(3)})
    monkeypatch.undo()
    real_write_text = Path.write_text

    def full_write_text(self, text, *args, **kwargs):
        real_write_text(self, text[:3])
        _disk_full()

    monkeypatch.setattr(Path, "write_text", full_write_text)
    with pytest.raises(paths.DiskFullError, match=r"cannot write .*prune_results\.csv: no space"):
        paths.atomic_write_csv(tmp_path / "prune_results.csv", pd.DataFrame({"a": [1]}))
    assert list(tmp_path.iterdir()) == []


def test_other_os_errors_pass_through_unchanged(tmp_path):
    def denied(tmp: Path) -> None:
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp))

    with pytest.raises(PermissionError) as info:
        paths.atomic_write(tmp_path / "x.csv", denied)
    assert not isinstance(info.value, paths.DiskFullError)


def test_mount_point_of_a_missing_path_is_its_filesystems(tmp_path):
    assert paths.mount_point(tmp_path / "not" / "yet") == paths.mount_point(tmp_path)
    assert os.path.ismount(paths.mount_point(tmp_path))


def test_in_memory_torch_save_loads_back(tmp_path):
    paths.atomic_torch_save(tmp_path / "m.pt", {"w": torch.arange(3)})
    loaded = torch.load(io.BytesIO((tmp_path / "m.pt").read_bytes()), weights_only=True)
    assert torch.equal(loaded["w"], torch.arange(3))


def test_stale_temp_files_are_removed_and_results_kept(tmp_path):
    """A kill inside atomic_write leaves ``.<name>.<random>.tmp``; the next holder of the run's
    lock removes exactly those, and never a finished result."""
    (tmp_path / "figures").mkdir()
    stale = tmp_path / "figures" / ".prune_accuracy.png.k3j2.tmp"
    stale.write_bytes(b"half a png")
    kept = [tmp_path / "metrics.csv", tmp_path / ".hydra.tmpdir", tmp_path / "figures" / "a.png"]
    for p in kept:
        p.write_text("x")
    paths.atomic_write_text(tmp_path / "run_info.json", "{}")
    assert paths.remove_stale_temps(tmp_path) == [stale]
    assert not stale.exists() and all(p.exists() for p in kept)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(paths.TEMP_SUFFIX)) == []
    # another program's folder (cdi-prune's, under its own lock) is left alone
    (tmp_path / "prune" / "p1").mkdir(parents=True)
    theirs = tmp_path / "prune" / "p1" / ".prune_results.csv.x1.tmp"
    theirs.write_text("being written")
    stale.write_bytes(b"half a png")
    assert paths.remove_stale_temps(tmp_path, exclude=("prune",)) == [stale]
    assert theirs.exists()
