"""The one way a ``cdi-train`` checkpoint file is read: safely, and checked to be ours.

Every path that opens a checkpoint (``cdi-train`` resuming a run directory, ``cdi-prune``)
calls :func:`load_checkpoint`. It loads with ``torch.load(..., weights_only=True)``, which
refuses a pickle that would run code, and then checks that the file is a ``cdi-train``
checkpoint (Lightning's ``state_dict`` plus the :class:`DeterministicInitCallback`'s state).
A truncated, malicious or foreign file is one :class:`CheckpointError` line naming the file
and the fix. torch's own message advises retrying with ``weights_only=False`` ("will likely
succeed"); for a file we refuse as untrusted that is the wrong advice, so it is never passed on.

A checkpoint also carries the composed task config it was trained with, as plain containers
(``checkpoint["cdi"]["config"]``, :func:`checkpoint_config`).

A checkpoint is a file, or, from ``trainer=fsdp2`` with ``save_distributed_checkpoint=true``, a
``torch.distributed.checkpoint`` (DCP) folder: every rank's shards in ``__<rank>_0.distcp``,
their index in ``.metadata``, and everything else in Lightning's ``meta.pt``. Such a folder is
read here into the same dict as a file, in one process, without a process group
(:func:`load_distributed_checkpoint`), and just as safely: ``meta.pt`` and every tensor with
``weights_only=True``. ``.metadata`` is a plain pickle, which torch's own reader unpickles with
``pickle.load`` (code would run); here it is unpickled with a restricted unpickler that admits
only the classes of DCP's index (dataclasses, ``torch.Size``, dtypes) and refuses any other.
Such a folder is saved beside its name and swapped in
(:mod:`cdi_experiments.lightning.checkpoint_io`); where a kill left the swap half done, the
folder is missing until ``cdi-train`` resumes the run (which restores it), and the message
says so.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import re
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from cdi_experiments.paths import CHECKPOINT_DIR, DCP_INDEX, DCP_META, LAST_CKPT, is_dcp_folder
from cdi_experiments.run.schema import ConfigError

INIT_CALLBACK = "DeterministicInitCallback"
_MAGIC = (b"PK\x03\x04", b"\x80")  # torch's zip format, a legacy torch.save pickle
_GLOBAL = re.compile(r"unsupported GLOBAL ([\w.]*\w)")


class CheckpointError(ConfigError):
    """A checkpoint file that cannot be used: missing, a directory, truncated, unsafe
    (a pickle that would run code) or not written by ``cdi-train``. One line naming the file
    and the fix. A :class:`ConfigError`, so every command line that reports a bad config
    reports it the same way (one line, exit status 2)."""


def check_checkpoint_path(path: str | os.PathLike) -> Path:
    """``path``, after checking it names an existing file or DCP folder (nothing is read).

    Raises:
        CheckpointError: ``path`` is another directory (the message suggests its
            ``checkpoints/last.ckpt``) or does not exist.
    """
    path = Path(path)
    if is_dcp_folder(path):
        return path
    if path.is_dir():
        raise CheckpointError(
            f"{path} is a directory, not a checkpoint file; pass "
            f"{path / CHECKPOINT_DIR / LAST_CKPT}"
        )
    if not path.exists():
        if _swap_left(path):
            raise CheckpointError(
                f"checkpoint {path} is missing: a kill interrupted its save (its complete copy "
                f"is a hidden .{path.name}.dcp-* folder beside it); rerun the run's cdi-train "
                "command to restore it, then pass it again"
            )
        raise CheckpointError(
            f"checkpoint {path} does not exist; pass a .ckpt from <run>/{CHECKPOINT_DIR}/"
        )
    return path


def _swap_left(path: Path) -> bool:
    """Whether a half-done DCP swap left ``path``'s complete copy beside it."""
    siblings = path.parent.glob(f".{path.name}.dcp-*") if path.parent.is_dir() else ()
    if not any(siblings):  # (checked first: the names' module imports Lightning)
        return False
    from cdi_experiments.lightning.checkpoint_io import swap_paths  # lazy: Lightning

    swap = swap_paths(path)
    return swap.ready.is_dir() or swap.old.is_dir()


def read_checkpoint_bytes(path: str | os.PathLike) -> bytes:
    """The bytes of the checkpoint file ``path`` (:func:`check_checkpoint_path` first).

    Raises:
        CheckpointError: ``path`` is a directory, does not exist or cannot be read.
    """
    path = check_checkpoint_path(path)
    try:
        return path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {path} ({exc.strerror})") from None


def checkpoint_sha256(path: str | os.PathLike) -> str:
    """sha256 of a checkpoint's bytes: of the file, or of a DCP folder's files (names and
    bytes, in name order).

    Raises:
        CheckpointError: as :func:`read_checkpoint_bytes`.
    """
    path = check_checkpoint_path(path)
    if not path.is_dir():
        return hashlib.sha256(read_checkpoint_bytes(path)).hexdigest()
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f.relative_to(path).as_posix().encode() + b"\0")
        try:
            h.update(f.read_bytes())
        except OSError as exc:
            raise CheckpointError(f"cannot read checkpoint {f} ({exc.strerror})") from None
    return h.hexdigest()


def load_checkpoint(path: str | os.PathLike, fix: str, data: bytes | None = None) -> dict[str, Any]:
    """Load a ``cdi-train`` checkpoint with ``weights_only=True`` and check it is one.

    Args:
        path: The checkpoint file, or DCP folder (:func:`load_distributed_checkpoint`),
            named in every message.
        fix: What the user should do with a bad file, for the message, e.g. ``"delete it to
            start the run over"``.
        data: The file's bytes if already read (:func:`read_checkpoint_bytes`); read here
            otherwise.

    Returns:
        The checkpoint: Lightning's dict (``state_dict``, ``callbacks``, ``hyper_parameters``,
        ... and ``cdi``), holding only plain containers, scalars and tensors.

    Raises:
        CheckpointError: ``path`` is a directory or missing; the file is truncated or not a
            torch file; it holds objects a safe load refuses (a pickle that would run code);
            or it is a torch file but not a ``cdi-train`` checkpoint (e.g. a plain
            ``torch.save(model.state_dict())``). One line, naming the file and ``fix``.
    """
    path = Path(path)
    if data is None and is_dcp_folder(path):
        ckpt: Any = load_distributed_checkpoint(path, fix)
    else:
        ckpt = _torch_load(path, read_checkpoint_bytes(path) if data is None else data, fix)
    return _check_ours(path, ckpt, fix)


def _torch_load(path: Path, data: bytes, fix: str) -> Any:
    """``torch.load(data, weights_only=True)``; every failure is one CheckpointError line."""
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols on stderr
            warnings.simplefilter("ignore")
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = _GLOBAL.search(str(exc))
        if not found and not data.startswith(_MAGIC):
            raise CheckpointError(
                f"{path} is truncated or not a torch checkpoint ({_reason(exc, data)}); {fix}"
            ) from None
        what = f"it would call {found.group(1)}" if found else "it holds objects beyond tensors"
        raise CheckpointError(
            f"{path} is not a safe checkpoint: {what}, which a weights-only load refuses "
            f"(not written by cdi-train; do not load it otherwise); {fix}"
        ) from None
    except Exception as exc:  # zip, EOF or key errors from a truncated or non-torch file
        raise CheckpointError(
            f"{path} is truncated or not a torch checkpoint ({_reason(exc, data)}); {fix}"
        ) from None


def _check_ours(path: Path, ckpt: Any, fix: str) -> dict[str, Any]:
    """``ckpt``, after checking it is a ``cdi-train`` checkpoint."""
    if not isinstance(ckpt, Mapping) or not isinstance(ckpt.get("state_dict"), Mapping):
        kind = (
            "a plain state dict (torch.save(model.state_dict()))"
            if isinstance(ckpt, Mapping) and ckpt and all(torch.is_tensor(v) for v in ckpt.values())
            else f"a {type(ckpt).__name__} without Lightning's 'state_dict'"
        )
        raise CheckpointError(f"{path} is not a cdi-train checkpoint: it holds {kind}; {fix}")
    state = init_state(ckpt)
    if not isinstance(state, Mapping) or not state.get("plan"):
        raise CheckpointError(
            f"{path} is not a cdi-train checkpoint: it has no {INIT_CALLBACK} state "
            f"(a Lightning checkpoint from another program?); {fix}"
        )
    return dict(ckpt)


# ----------------------------------------------------------------------------- DCP folders

# What a DCP index may name: its own dataclasses and what they hold. Nothing else is looked up,
# so unpickling it calls no other code (https://docs.python.org/3/library/pickle.html#restricting-globals).
_DCP_GLOBALS = {
    ("torch.distributed.checkpoint.metadata", name)
    for name in (
        "Metadata",
        "MetadataIndex",
        "StorageMeta",
        "TensorProperties",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "_MEM_FORMAT_ENCODING",
    )
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "PureWindowsPath"),
    ("collections", "OrderedDict"),
}


class _IndexUnpickler(pickle.Unpickler):
    """Unpickles a DCP ``.metadata`` index, refusing every global but :data:`_DCP_GLOBALS`
    and torch's dtypes."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _DCP_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"unsupported GLOBAL {module}.{name}")


def _read_index(path: Path, fix: str) -> Any:
    from torch.distributed.checkpoint.metadata import Metadata  # lazy: torch.distributed

    index = path / DCP_INDEX
    try:
        with open(index, "rb") as f:
            meta = _IndexUnpickler(f).load()
    except pickle.UnpicklingError as exc:
        found = _GLOBAL.search(str(exc))
        what = f"it would call {found.group(1)}" if found else _brief(exc)
        raise CheckpointError(
            f"{index} is not a safe checkpoint index: {what}, which this reader refuses "
            f"(not written by cdi-train; do not load it otherwise); {fix}"
        ) from None
    except Exception as exc:  # EOF, a truncated or foreign file
        raise CheckpointError(
            f"{index} is truncated or not a DCP index ({_brief(exc)}); {fix}"
        ) from None
    if not isinstance(meta, Metadata):
        raise CheckpointError(f"{index} holds a {type(meta).__name__}, not a DCP index; {fix}")
    return meta


def _brief(exc: BaseException) -> str:
    """An exception in a few words (its first line, or its type)."""
    text = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
    return text or type(exc).__name__


def _dcp_tensors(path: Path, meta: Any, prefix: str, fix: str) -> Iterator[tuple[str, Any]]:
    """``(key, full tensor)`` for every tensor of the index whose key starts with ``prefix``,
    assembled from its chunks (each loaded with ``weights_only=True``)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    for fqn, md in meta.state_dict_metadata.items():
        if fqn.startswith(prefix) and isinstance(md, TensorStorageMetadata):
            try:
                full = _assemble(path, meta, fqn, md, fix)
            except CheckpointError:
                raise
            except Exception as exc:  # an index entry of the wrong types or bounds
                raise CheckpointError(
                    f"{path}: the index entry of {fqn!r} is malformed ({_brief(exc)}); {fix}"
                ) from None
            yield fqn[len(prefix) :], full


def _assemble(path: Path, meta: Any, fqn: str, md: Any, fix: str) -> torch.Tensor:
    """One tensor of a DCP folder from its chunks, which must cover it exactly once."""
    from torch.distributed.checkpoint.metadata import MetadataIndex

    root = path.resolve()
    full = torch.empty(tuple(md.size), dtype=md.properties.dtype)
    covered = 0
    for chunk in md.chunks:
        where = (fqn, tuple(chunk.offsets), tuple(chunk.sizes))
        info = meta.storage_data.get(MetadataIndex(fqn, chunk.offsets))
        file = (root / str(getattr(info, "relative_path", ""))).resolve()
        if info is None or file.parent != root or not file.is_file():
            raise CheckpointError(f"{path}: the shard {where} is missing; {fix}")
        if getattr(info, "transform_descriptors", None):
            raise CheckpointError(
                f"{path}: the shard {where} is stored transformed "
                f"({info.transform_descriptors}), which this reader does not read; {fix}"
            )
        with open(file, "rb") as f:
            f.seek(int(info.offset))
            data = f.read(int(info.length))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                t = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"a {type(t).__name__}, not a tensor")
            region = tuple(slice(o, o + n) for o, n in zip(chunk.offsets, chunk.sizes, strict=True))
            full[region] = t.reshape(tuple(chunk.sizes))  # out of bounds: a shape mismatch
        except Exception as exc:
            raise CheckpointError(
                f"{file}: the shard {where} is unreadable ({_brief(exc)}); {fix}"
            ) from None
        covered += t.numel()
    if covered != full.numel():  # a gap would leave uninitialized memory in the weights
        raise CheckpointError(
            f"{path}: the shards of {fqn!r} hold {covered} of its {full.numel()} elements; {fix}"
        )
    return full


def load_distributed_checkpoint(path: str | os.PathLike, fix: str) -> dict[str, Any]:
    """A DCP checkpoint folder as one dict, like a checkpoint file's: ``meta.pt`` plus the
    model's full ``state_dict`` assembled from every rank's shards, in this process alone (no
    process group). Optimizer states are left out (nothing here needs them; resuming goes
    through Lightning).

    Safe like :func:`load_checkpoint`: ``meta.pt`` and every tensor load with
    ``weights_only=True``, and the ``.metadata`` index is unpickled with a restricted
    unpickler (only DCP's own index classes, ``torch.Size`` and dtypes).

    Raises:
        CheckpointError: a file is missing, truncated or unsafe (one line, naming it and
            ``fix``).
    """
    path = Path(path)
    meta = _read_index(path, fix)
    ckpt = _torch_load(path / DCP_META, read_checkpoint_bytes(path / DCP_META), fix)
    if not isinstance(ckpt, Mapping):
        raise CheckpointError(f"{path / DCP_META} holds a {type(ckpt).__name__}; {fix}")
    ckpt = dict(ckpt)
    ckpt["state_dict"] = dict(_dcp_tensors(path, meta, "state_dict.", fix))
    return ckpt


def init_state(ckpt: Mapping[str, Any]) -> Any:
    """The :class:`DeterministicInitCallback`'s state in a checkpoint (``None`` if none)."""
    callbacks = ckpt.get("callbacks")
    if not isinstance(callbacks, Mapping):
        return None
    return next((v for k, v in callbacks.items() if str(k).startswith(INIT_CALLBACK)), None)


def checkpoint_config(ckpt: Mapping[str, Any]) -> dict[str, Any] | None:
    """The composed task config stored in the checkpoint (``None`` for older checkpoints)."""
    cdi = ckpt.get("cdi")
    config = cdi.get("config") if isinstance(cdi, Mapping) else None
    return dict(config) if isinstance(config, Mapping) else None


def _reason(exc: Exception, data: bytes) -> str:
    """What is wrong with bytes torch could not load, in a few words."""
    if not data:
        return "the file is empty"
    size = len(data)
    if not data.startswith(_MAGIC):
        return f"{size} bytes of something else"
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if "central directory" in text or isinstance(exc, EOFError):
        return f"{size} bytes, the end of the file is missing"
    return text.split(". ")[0][:160] or type(exc).__name__


__all__ = [
    "CheckpointError",
    "check_checkpoint_path",
    "checkpoint_config",
    "checkpoint_sha256",
    "init_state",
    "load_checkpoint",
    "load_distributed_checkpoint",
    "read_checkpoint_bytes",
]
