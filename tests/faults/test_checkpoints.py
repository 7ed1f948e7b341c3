"""Truncated, corrupt, malicious and foreign checkpoints, given to ``cdi-train`` (as the run
directory's last.ckpt, which it would resume) and to ``cdi-prune``: one line naming the file,
no torch hint to load with ``weights_only=False``, a non-zero exit, nothing written, and the
malicious pickle's payload never runs."""

from __future__ import annotations

import os
import pickle
import random
import shutil
from pathlib import Path

import pytest
import torch

from faults.common import (
    changed,
    error_line,
    one_line_problems,
    short,
    snapshot,
    tool,
    train,
)

pytestmark = pytest.mark.faults

KINDS = ["truncated", "corrupt", "malicious", "malicious_raw", "foreign"]


class Payload:
    """Unpickling this runs ``os.system("touch <marker>")``: what a hostile checkpoint does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def write_bad(kind: str, path: Path, good: Path, marker: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "truncated":
        data = good.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "corrupt":
        path.write_bytes(random.Random(7).randbytes(64 * 1024))
    elif kind == "malicious":  # torch's zip format, the payload inside data.pkl
        torch.save({"state_dict": {}, "epoch": 0, "payload": Payload(marker)}, path)
    elif kind == "malicious_raw":  # a bare pickle (torch's legacy, non-zip path)
        path.write_bytes(pickle.dumps({"state_dict": {}, "payload": Payload(marker)}, protocol=2))
    else:  # foreign: a fine torch file, just not a cdi-train checkpoint
        torch.save({"weight": torch.zeros(4, 3), "bias": torch.zeros(4)}, path)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("cli", ["cdi-train", "cdi-prune"])
def test_bad_checkpoint_refused_in_one_line(cli, kind, ref_run: Path, tmp_path: Path, case):
    case.expect(
        f"{cli}: {kind} ckpt",
        "exit!=0, one line naming the file, no weights_only hint, payload never runs, "
        "nothing written",
    )
    marker = tmp_path / "pwned"
    run = tmp_path / "run"
    if cli == "cdi-prune":
        shutil.copytree(ref_run, run)
    ckpt = run / "checkpoints" / "last.ckpt"
    write_bad(kind, ckpt, ref_run / "checkpoints" / "last.ckpt", marker)
    before = snapshot(run)
    if cli == "cdi-train":
        proc = train(run)
    else:
        proc = tool("cdi-prune", [ckpt, "--sparsities", "0.5"], tmp_path)
    written = [
        f for f in changed(before, snapshot(run)) if not f.startswith((".hydra/", "train.log"))
    ]
    problems = one_line_problems(proc, ckpt.name)
    case.observe(
        f"exit {proc.returncode}, {short(error_line(proc), 80)!r}"
        + (", payload RAN" if marker.exists() else "")
        + (f", wrote {short(', '.join(written), 40)}" if written else "")
    )
    assert not marker.exists(), "the malicious checkpoint's payload ran"
    assert problems == [], problems
    assert written == [], written
