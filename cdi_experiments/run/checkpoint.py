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
"""

from __future__ import annotations

import io
import os
import pickle
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from cdi_experiments.paths import CHECKPOINT_DIR, LAST_CKPT
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
    """``path``, after checking it names an existing file (nothing is read).

    Raises:
        CheckpointError: ``path`` is a directory (the message suggests its
            ``checkpoints/last.ckpt``) or does not exist.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(
            f"{path} is a directory, not a checkpoint file; pass "
            f"{path / CHECKPOINT_DIR / LAST_CKPT}"
        )
    if not path.exists():
        raise CheckpointError(
            f"checkpoint {path} does not exist; pass a .ckpt from <run>/{CHECKPOINT_DIR}/"
        )
    return path


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


def load_checkpoint(path: str | os.PathLike, fix: str, data: bytes | None = None) -> dict[str, Any]:
    """Load a ``cdi-train`` checkpoint with ``weights_only=True`` and check it is one.

    Args:
        path: The checkpoint file (named in every message).
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
    if data is None:
        data = read_checkpoint_bytes(path)
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols on stderr
            warnings.simplefilter("ignore")
            ckpt = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
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
    "init_state",
    "load_checkpoint",
    "read_checkpoint_bytes",
]
