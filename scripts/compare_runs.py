"""Compare every file of two run directories: the proof that a refactor changed nothing.

    python scripts/compare_runs.py BEFORE_RUN_DIR AFTER_RUN_DIR

Per file, one line: ``same`` (bytes equal), ``same tensors`` (checkpoints and saved models
whose tensors are bit-identical; their pickled containers may differ), ``same except ...``
(JSON that differs only in keys the run itself varies: pid, host, argv, the config's
layout; keys the after side adds are listed), or ``DIFFERENT`` with the first difference.
Files only the after side has are listed as new. Exit status 1 if any file that carries
results (CSV, figures, tensors, fingerprints) differs or is missing on the after side.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch

# Keys that describe how a run was launched, not what it computed.
VOLATILE_JSON_KEYS = {
    "argv",
    "host",
    "pid",
    "config",
    "versions",
    "started_at",
    "updated_at",
    "finished_at",
    "sweep_launch",
}
# Files whose text records the launch (timestamps, the config's shape), not results.
LAUNCH_FILES = {
    ".lock",  # the writer's PID
    "train.log",
    "hparams.yaml",
    ".hydra/config.yaml",
    ".hydra/overrides.yaml",
    ".hydra/hydra.yaml",
}


def _tensors(obj: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor inside a nested checkpoint, by its path."""
    out: dict[str, torch.Tensor] = {}
    if isinstance(obj, torch.Tensor):
        out[prefix] = obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            out.update(_tensors(v, f"{prefix}/{k}"))
    elif isinstance(obj, (list, tuple)):
        for k, v in enumerate(obj):
            out.update(_tensors(v, f"{prefix}/{k}"))
    return out


def compare_tensors(a: Path, b: Path) -> str | None:
    ta = _tensors(torch.load(a, map_location="cpu", weights_only=True))
    tb = _tensors(torch.load(b, map_location="cpu", weights_only=True))
    if set(ta) != set(tb):
        return f"tensor keys differ: {sorted(set(ta) ^ set(tb))[:4]}"
    for k in sorted(ta):
        x, y = ta[k], tb[k]
        if x.dtype != y.dtype or x.shape != y.shape or not torch.equal(x, y):
            return f"tensor {k} differs"
    return None


def compare_json(a: Path, b: Path) -> tuple[str | None, list[str]]:
    """(the first difference in keys both sides have, or None; keys only the after side has)."""
    ja, jb = json.loads(a.read_text()), json.loads(b.read_text())
    keys = (set(ja) & set(jb)) - VOLATILE_JSON_KEYS
    diff = sorted(k for k in keys if ja[k] != jb[k])
    dropped = sorted(set(ja) - set(jb) - VOLATILE_JSON_KEYS)
    if dropped:
        diff.append(f"dropped {dropped}")
    return (f"keys differ: {diff}" if diff else None), sorted(set(jb) - set(ja))


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    before, after = (Path(p) for p in argv)
    files = sorted(
        {p.relative_to(before).as_posix() for p in before.rglob("*") if p.is_file()}
        | {p.relative_to(after).as_posix() for p in after.rglob("*") if p.is_file()}
    )
    bad = 0
    for rel in files:
        a, b = before / rel, after / rel
        if not b.exists():  # a file the before side wrote is lost
            status = "only in before: LOST"
            bad += rel not in LAUNCH_FILES
        elif not a.exists():  # a new file changes no old result
            status = "new in after"
        elif a.read_bytes() == b.read_bytes():
            status = "same"
        elif rel.endswith((".pt", ".ckpt")):
            why = compare_tensors(a, b)
            status = "same tensors" if why is None else f"DIFFERENT: {why}"
            bad += why is not None
        elif rel.endswith(".json"):
            why, added = compare_json(a, b)
            status = "same except launch keys" if why is None else f"DIFFERENT: {why}"
            if why is None and added:
                status += f", plus new keys {added}"
            bad += why is not None
        elif rel in LAUNCH_FILES:
            status = "differs (launch record, not a result)"
        else:
            status = "DIFFERENT"
            bad += 1
        print(f"{rel:60s} {status}")
    print(f"{len(files) - bad}/{len(files)} files agree")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
