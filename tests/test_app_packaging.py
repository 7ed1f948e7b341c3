"""The configs ship inside the package: a plain (non-editable) install runs ``cdi-train``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

REPO = Path(__file__).resolve().parent.parent


def test_pyproject_lists_every_package() -> None:
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = {
        ".".join(p.parent.relative_to(REPO).parts)
        for p in (REPO / "cdi_experiments").rglob("__init__.py")
        if "__pycache__" not in p.parts
    }
    assert set(meta["packages"]) == found | {"cdi_experiments.configs"}
    assert meta["package-dir"] == {"cdi_experiments.configs": "configs"}


@pytest.mark.integration
def test_plain_install_composes_from_its_own_configs(tmp_path: Path) -> None:
    target, cwd = tmp_path / "site", tmp_path / "elsewhere"
    cwd.mkdir()
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
         "--target", str(target), str(REPO)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(target)}
    where = subprocess.run(
        [sys.executable, "-c", "import cdi_experiments.configs as c; print(c.__path__[0])"],
        cwd=cwd, env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert Path(where.stdout.strip()) == target / "cdi_experiments" / "configs"
    proc = subprocess.run(
        [sys.executable, "-m", "cdi_experiments.cli.train", "--cfg", "job", "model=cnn"],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "_target_: cdi_experiments.models.CNN" in proc.stdout
    assert sorted(cwd.iterdir()) == []
