"""Helpers of the fault tier: run the real command-line tools, compare run directories.

Every run here is the same tiny command (``TINY``: ``experiment=quick`` on 300 images, two
epochs, the :class:`faults.hooks.FaultAt` callback loaded), so one uninterrupted reference run
serves every comparison. Directories are compared with ``scripts/compare_runs.py``'s own
functions: bytes, or tensors for checkpoints, or JSON less the launch keys.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import json
import os
import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
TESTS = REPO / "tests"
BIN = Path(sys.executable).parent

HOOK = "+callbacks.faults._target_=faults.hooks.FaultAt"
TINY = [
    "experiment=quick",
    "data.limit=300",
    "trainer.max_epochs=2",
    "trainer.enable_progress_bar=false",
    HOOK,
]
TIMEOUT_S = 300
STATUS_FILES = ("status.json", "STATUS.json", "status")  # where a run's state may live
TORCH_HINT = ("weights_only=False", "will likely succeed")

_spec = importlib.util.spec_from_file_location("compare_runs", REPO / "scripts" / "compare_runs.py")
compare_runs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(compare_runs)


# ------------------------------------------------------------------ running the tools
def env(**extra: str) -> dict[str, str]:
    """The environment of a tool run: ours, less any fault, ``tests/`` on PYTHONPATH."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("CDI_FAULT")}
    base["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))
    base["HYDRA_FULL_ERROR"] = "0"
    base.update({k: str(v) for k, v in extra.items()})
    return base


def tool(
    name: str,
    args: Sequence[str],
    cwd: Path,
    extra_env: dict[str, str] | None = None,
    new_session: bool = False,
) -> subprocess.CompletedProcess[str]:
    """Run console script ``name`` (``cdi-train``, ``cdi-prune``...) to completion; with
    ``new_session``, in a process group of its own (which a fault may kill whole)."""
    return subprocess.run(
        [str(BIN / name), *map(str, args)],
        cwd=cwd,
        env=env(**(extra_env or {})),
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        start_new_session=new_session,
    )


def train(
    run_dir: Path, *extra: str, fault: str | None = None, once: Path | None = None, **fenv: str
) -> subprocess.CompletedProcess[str]:
    """``cdi-train TINY *extra hydra.run.dir=run_dir``, with ``fault`` (``kill@mid_epoch``)."""
    e = dict(fenv)
    if fault:
        e["CDI_FAULT"] = fault
        e["CDI_FAULT_ONCE"] = str(once or run_dir.parent / f".{run_dir.name}.fired")
    return tool("cdi-train", [*TINY, *extra, f"hydra.run.dir={run_dir}"], run_dir.parent, e)


def popen_train(run_dir: Path, *extra: str, **fenv: str) -> subprocess.Popen[str]:
    """:func:`train` without waiting (output to files beside ``run_dir``)."""
    out = open(run_dir.parent / f"{run_dir.name}.stdout", "w")  # noqa: SIM115 - child owns it
    err = open(run_dir.parent / f"{run_dir.name}.stderr", "w")  # noqa: SIM115
    return subprocess.Popen(
        [str(BIN / "cdi-train"), *TINY, *extra, f"hydra.run.dir={run_dir}"],
        cwd=run_dir.parent,
        env=env(**fenv),
        stdout=out,
        stderr=err,
        text=True,
    )


def tail(proc: subprocess.CompletedProcess[str], n: int = 1500) -> str:
    return f"exit {proc.returncode}\n--stdout--\n{proc.stdout[-n:]}\n--stderr--\n{proc.stderr[-n:]}"


# ------------------------------------------------------------------ messages
def without_logging_errors(text: str) -> str:
    """``text`` less Python's ``--- Logging error ---`` blocks (a log handler on a full disk)."""
    return re.sub(
        r"--- Logging error ---\n(?:.*\n)*?(?:Message: .*\n)(?:Arguments: .*\n)?", "", text
    )


def error_line(proc: subprocess.CompletedProcess[str]) -> str:
    """The last non-empty stderr line: where a one-line error must be."""
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def one_line_problems(proc: subprocess.CompletedProcess[str], *names: str) -> list[str]:
    """What keeps ``proc`` from being a one-line refusal naming each of ``names``."""
    problems = []
    if proc.returncode == 0:
        problems.append("exit 0")
    elif proc.returncode < 0:
        problems.append(f"died of signal {-proc.returncode}")
    both = without_logging_errors(proc.stdout + proc.stderr)
    if "Traceback" in both:
        problems.append("traceback in the output")
    if any(h in proc.stdout + proc.stderr for h in TORCH_HINT):
        problems.append("passes on torch's weights_only=False hint")
    line = error_line(proc)
    for name in names:
        if name not in line:
            problems.append(f"last stderr line does not name {name!r}")
    return problems


def short(text: str, n: int = 110) -> str:
    """``text`` on one line, absolute paths cut to their last two parts, at most ``n`` chars."""
    text = " ".join(text.split())
    text = re.sub(r"/(?:[^/\s'\"]+/)+([^/\s'\"]+/[^/\s'\"]+)", r"…/\1", text)
    return text if len(text) <= n else text[: n - 1] + "…"


# ------------------------------------------------------------------ run directories
def status_of(run_dir: Path) -> str | None:
    """The run's machine-readable state (``running``/``finished``/``failed``/...), or None."""
    for name in STATUS_FILES:
        p = run_dir / name
        if p.is_file():
            text = p.read_text()
            try:
                data = json.loads(text)
            except ValueError:
                return text.strip().split()[0] if text.strip() else "(empty)"
            if isinstance(data, dict):
                return str(data.get("state", data.get("status")))
            return str(data)
    return None


def status_record(run_dir: Path) -> dict:
    for name in STATUS_FILES:
        p = run_dir / name
        if p.is_file():
            try:
                data = json.loads(p.read_text())
            except ValueError:
                return {"state": p.read_text().strip()}
            return data if isinstance(data, dict) else {"state": data}
    return {}


def _ignored(rel: str) -> bool:
    """Files that record a launch, not a result: Hydra's, the log, the lock."""
    name = rel.rsplit("/", 1)[-1]
    return (
        rel in compare_runs.LAUNCH_FILES
        or rel.startswith(".hydra/")
        or name == "multirun.yaml"
        or "lock" in name.lower()
        or name.endswith((".stdout", ".stderr", ".fired"))
    )


def differences(before: Path, after: Path) -> list[str]:
    """Every result file of two run directories that differs, as ``"<file>: <why>"``.

    As ``scripts/compare_runs.py`` judges them (bytes; tensors for .ckpt/.pt; JSON less the
    launch keys), with the launch record (Hydra's files, train.log, the lock) left out and the
    status file compared by its state only.
    """
    files = sorted(
        {p.relative_to(before).as_posix() for p in before.rglob("*") if p.is_file()}
        | {p.relative_to(after).as_posix() for p in after.rglob("*") if p.is_file()}
    )
    out = []
    for rel in files:
        if _ignored(rel):
            continue
        a, b = before / rel, after / rel
        if not a.exists() or not b.exists():
            out.append(f"{rel}: only in {'resumed' if b.exists() else 'reference'}")
        elif rel.rsplit("/", 1)[-1] in STATUS_FILES:
            if status_of(before) != status_of(after):
                out.append(f"{rel}: state {status_of(before)} vs {status_of(after)}")
        elif a.read_bytes() == b.read_bytes():
            continue
        elif rel.endswith((".pt", ".ckpt")):
            why = compare_runs.compare_tensors(a, b)
            if why:
                out.append(f"{rel}: {why}")
        elif rel.endswith(".json"):
            why, _ = compare_runs.compare_json(a, b)
            if why:
                out.append(f"{rel}: {why}")
        else:
            out.append(f"{rel}: bytes differ")
    return out


def snapshot(root: Path, mtimes: bool = False) -> dict[str, tuple]:
    """Every file under ``root``: its sha256 (and mtime_ns), by relative path."""
    snap = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            digest = hashlib.sha256(p.read_bytes()).hexdigest()
            snap[p.relative_to(root).as_posix()] = (
                (digest, p.stat().st_mtime_ns) if mtimes else (digest,)
            )
    return snap


def changed(before: dict[str, tuple], after: dict[str, tuple]) -> list[str]:
    keys = sorted(set(before) | set(after))
    return [
        f"{k} ({'new' if k not in before else 'gone' if k not in after else 'changed'})"
        for k in keys
        if before.get(k) != after.get(k)
    ]


PNG_END = b"IEND\xaeB`\x82"


def half_written(run_dir: Path) -> list[str]:
    """Files under ``run_dir`` that are not complete: unparseable CSV/JSON, unloadable
    tensors, PNGs without their end chunk, temporary files left behind."""
    bad = []
    for p in sorted(run_dir.rglob("*")):
        if not p.is_file():
            continue
        rel = p.relative_to(run_dir).as_posix()
        if rel.startswith(".hydra/") or "lock" in p.name.lower():
            continue
        try:
            if p.name.startswith(".") or p.name.endswith((".tmp", ".partial")):
                bad.append(f"{rel} (temporary file left)")
            elif p.suffix == ".csv":
                rows = list(csv.reader(p.read_text().splitlines()))
                if not rows or any(len(r) != len(rows[0]) for r in rows):
                    bad.append(f"{rel} (ragged or empty CSV)")
            elif p.suffix == ".json":
                json.loads(p.read_text())
            elif p.suffix in (".ckpt", ".pt"):
                torch.load(p, map_location="cpu", weights_only=True)
            elif p.suffix == ".png" and not p.read_bytes().endswith(PNG_END):
                bad.append(f"{rel} (truncated PNG)")
        except Exception as exc:  # noqa: BLE001 - any failure to read is the finding
            bad.append(f"{rel} ({type(exc).__name__})")
    return bad
