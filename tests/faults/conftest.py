"""Fixtures of the fault tier: the uninterrupted reference runs, tmpfs mounts, matrix rows."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from faults.common import tail, tool, train


class Case:
    """One row of the fault matrix: what is expected and what was observed (test properties
    that ``scripts/faults_report.py`` prints)."""

    def __init__(self, node: pytest.Item) -> None:
        self.node = node

    def expect(self, case: str, expected: str) -> None:
        self.node.user_properties += [("case", case), ("expected", expected)]

    def observe(self, text: str) -> None:
        self.node.user_properties.append(("observed", text))


@pytest.fixture
def case(request: pytest.FixtureRequest) -> Case:
    return Case(request.node)


@pytest.fixture(scope="session")
def ref_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted run every resumed run must equal, file for file."""
    run = tmp_path_factory.mktemp("reference") / "run"
    proc = train(run)
    assert proc.returncode == 0, tail(proc)
    return run


@pytest.fixture(scope="session")
def fashion_cnn_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A FashionMNIST-CNN run's checkpoint (to copy into an MNIST-MLP run's directory)."""
    run = tmp_path_factory.mktemp("fashion") / "run"
    proc = train(run, "data=fashion_mnist", "model=cnn", "trainer.max_epochs=1", "prune=off")
    assert proc.returncode == 0, tail(proc)
    return run / "checkpoints" / "last.ckpt"


@pytest.fixture
def run_copy(ref_run: Path, tmp_path: Path) -> Path:
    """A private copy of the reference run (a finished MNIST-MLP run)."""
    dst = tmp_path / "run"
    shutil.copytree(ref_run, dst)
    return dst


def _mount(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    return proc.returncode == 0


def _umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


@contextlib.contextmanager
def _tmpfs_mounts(tmp_path: Path, fallback: Callable[[], None]) -> Iterator[Callable]:
    """``mount(size)``: a fresh tmpfs under ``tmp_path`` (unmounted on exit), or what
    ``fallback()`` returns where mounting is not allowed or ``CDI_FAULTS_NO_TMPFS`` is set."""
    mounted: list[Path] = []

    def mount(size: str) -> Path | None:
        path = tmp_path / f"tmpfs{len(mounted)}"
        if os.environ.get("CDI_FAULTS_NO_TMPFS") or not _mount(path, size):
            return fallback()
        mounted.append(path)
        return path

    try:
        yield mount
    finally:
        for path in reversed(mounted):
            _umount(path)


def _skip_without_tmpfs() -> None:
    pytest.skip("cannot mount a tmpfs here (needs root); the ENOSPC fallback covers it")


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """``tmpfs("64m")``: a fresh tmpfs under ``tmp_path``, unmounted afterwards; skips the
    test where mounting is not allowed (not root, no CAP_SYS_ADMIN)."""
    with _tmpfs_mounts(tmp_path, _skip_without_tmpfs) as mount:
        yield mount


@pytest.fixture
def tmpfs_or_none(tmp_path: Path) -> Iterator[Callable[[str], Path | None]]:
    """As :func:`tmpfs`, but ``None`` where mounting is not allowed (the caller falls back to
    a stand-in) instead of skipping."""
    with _tmpfs_mounts(tmp_path, lambda: None) as mount:
        yield mount


def remount(path: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(path)], check=True)


__all__ = ["Case", "remount", "tool"]
