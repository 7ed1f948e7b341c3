"""The package's architecture as a test: the layer contracts of ``.importlinter``, no import
cycles, and no ``torch.nn`` or Lightning in the pure generator.

Each check is also run once against a copy of the package with a planted violation, so a
contract that silently stopped checking anything fails here.
"""

from __future__ import annotations

import ast
import configparser
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "cdi_experiments"
CONFIG = REPO / ".importlinter"
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")
IMPORT_CYCLES = REPO.parent / "shared" / "tools" / "import_cycles.py"

# What generator/ must never use: it stays pure (tensors from torch, no nn, no Lightning).
FORBIDDEN_IN_GENERATOR = ("torch.nn", "pytorch_lightning", "lightning", "lightning_fabric")


def lint_imports(cwd: Path) -> subprocess.CompletedProcess[str]:
    """``lint-imports`` on the ``cdi_experiments`` found in ``cwd`` (it goes first on the path)."""
    assert LINT_IMPORTS.exists(), "lint-imports missing: `.venv/bin/pip install -e '.[dev]'`"
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", "--no-logo", str(CONFIG)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def contract_names() -> list[str]:
    parser = configparser.ConfigParser()
    parser.read(CONFIG)
    return [parser[s]["name"] for s in parser.sections() if s.startswith("importlinter:contract:")]


def forbidden_uses(source: str) -> list[str]:
    """``torch.nn`` and Lightning in ``source``: imports at any depth, and ``torch.nn``
    reached as an attribute of an imported ``torch``. Returns ``"line: what"`` entries."""
    found = []

    def forbidden(name: str) -> bool:
        return any(name == f or name.startswith(f + ".") for f in FORBIDDEN_IN_GENERATOR)

    for node in ast.walk(ast.parse(source)):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
        elif (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and f"{node.value.id}.{node.attr}" == "torch.nn"
        ):
            names = ["torch.nn"]
        found += [f"{node.lineno}: {n}" for n in names if forbidden(n)]
    return found


def scratch_package(tmp_path: Path) -> Path:
    """A copy of the package under ``tmp_path`` (the tree others work on stays untouched)."""
    shutil.copytree(PACKAGE, tmp_path / PACKAGE.name, ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path / PACKAGE.name


def plant(path: Path, line: str) -> None:
    """Add ``line`` after ``from __future__ import annotations`` (or at the top)."""
    text = path.read_text()
    future = "from __future__ import annotations\n"
    if future in text:
        path.write_text(text.replace(future, future + line + "\n", 1))
    else:
        path.write_text(line + "\n" + text)


# ----------------------------------------------------------------------------- import-linter


def test_every_layer_contract_is_kept() -> None:
    proc = lint_imports(REPO)
    names = contract_names()
    assert len(names) >= 2, names
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"Contracts: {len(names)} kept, 0 broken." in proc.stdout, proc.stdout


@pytest.mark.parametrize(
    ("module", "line", "contract"),
    [
        # a lower layer importing a higher one
        ("pruning/mask.py", "import cdi_experiments.run.report", "Layers:"),
        # two siblings of one layer importing each other
        ("models.py", "import cdi_experiments.datasets", "Layers:"),
        # Lightning below lightning/, even lazily inside a function
        (
            "modules/plan.py",
            "def _late():\n    import pytorch_lightning",
            "Only lightning/",
        ),
    ],
)
def test_a_planted_violation_breaks_its_contract(
    tmp_path: Path, module: str, line: str, contract: str
) -> None:
    plant(scratch_package(tmp_path) / module, line)
    proc = lint_imports(tmp_path)
    assert proc.returncode != 0, proc.stdout
    broken = [ln for ln in proc.stdout.splitlines() if ln.rstrip().endswith("BROKEN")]
    assert broken, proc.stdout
    assert "0 broken" not in proc.stdout and contract in proc.stdout


# ----------------------------------------------------------------------------- import cycles


def run_import_cycles(package: Path) -> subprocess.CompletedProcess[str]:
    if not IMPORT_CYCLES.exists():
        pytest.skip(f"{IMPORT_CYCLES} not present")
    return subprocess.run(
        [sys.executable, str(IMPORT_CYCLES), str(package)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_no_import_cycles() -> None:
    proc = run_import_cycles(PACKAGE)
    assert proc.returncode == 0 and "import cycle:" not in proc.stdout, proc.stdout
    assert proc.stdout.startswith("no import cycles in cdi_experiments (")


def test_a_planted_cycle_is_reported(tmp_path: Path) -> None:
    package = scratch_package(tmp_path)
    plant(package / "paths.py", "def _late():\n    import cdi_experiments.tables")
    plant(package / "tables.py", "import cdi_experiments.paths")
    proc = run_import_cycles(package)
    assert proc.returncode == 1
    assert "import cycle: cdi_experiments.paths <-> cdi_experiments.tables" in proc.stdout


# ----------------------------------------------------------------------------- generator


def test_generator_has_no_torch_nn_and_no_lightning() -> None:
    files = sorted((PACKAGE / "generator").glob("*.py"))
    assert len(files) >= 5
    found = {f.name: forbidden_uses(f.read_text()) for f in files}
    assert not any(found.values()), {k: v for k, v in found.items() if v}


@pytest.mark.parametrize(
    "source",
    [
        "import torch.nn",
        "import torch.nn.functional as F",
        "from torch import nn",
        "from torch.nn import init",
        "import torch\nx = torch.nn.Linear",
        "def f():\n    import pytorch_lightning as pl",
        "from lightning.pytorch import Trainer",
    ],
)
def test_the_generator_check_sees_each_way_in(source: str) -> None:
    assert forbidden_uses(source)


def test_the_generator_check_lets_plain_torch_through() -> None:
    assert forbidden_uses("import torch\nx = torch.zeros(3)\nfrom torch import Tensor") == []
