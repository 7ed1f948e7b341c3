"""DTensor helpers: where a rank's local shard sits in the global tensor, whether it is the
copy that counts, and the collectives analysis needs.

A parameter sharded by FSDP2 (``fully_shard``), tensor parallelism or both is a
``torch.distributed.tensor.DTensor``: a global shape, a device mesh, one placement per mesh
dimension, and this rank's local tensor. The generator can fill any block of a tensor from
its global coordinates (:func:`cdi_experiments.generator.core.generate`), so a rank only
needs those coordinates: :func:`global_coords` gives them per axis, as integer arrays, for
every placement the distribution code itself can produce (``Shard`` with torch.chunk's uneven
split, ``Replicate``, and the strided shards of FSDP x TP meshes, whose local rows are not a
contiguous range of global rows).

Only public DTensor API is used. ``torch.distributed.tensor._utils.
compute_local_shape_and_global_offset`` (private) would give an offset per axis, which cannot
describe a strided shard; the one private class met here, ``_StridedShard``, is rebuilt from
its own type (see :func:`_axis_coords`), never imported.

Everything here works on plain tensors too (the whole tensor is the local shard), so callers
need no second code path.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

from cdi_experiments.generator.core import TensorInit
from cdi_experiments.modules.plan import Block

Coords = tuple[np.ndarray, ...]
"""Global coordinates of a local block, one int64 array per axis (the block is their grid)."""


def is_dtensor(t: object) -> bool:
    """True for a ``DTensor`` (an ``nn.Parameter`` wrapping one included)."""
    return isinstance(t, DTensor)


def local_part(t: torch.Tensor) -> torch.Tensor:
    """The tensor this rank holds: a DTensor's local shard (a view: writing it writes the
    parameter), or ``t`` itself."""
    return t.to_local() if isinstance(t, DTensor) else t


def global_coords(t: torch.Tensor) -> Coords:
    """Global indices, per axis, of the elements of :func:`local_part` ``(t)``.

    ``local_part(t)[i0, ..., ik]`` is element ``[c[0][i0], ..., c[k][ik]]`` of the global
    tensor (``c = global_coords(t)``). A plain tensor gives ``arange`` on every axis; an empty
    local shard (more ranks than rows) gives an empty array on its sharded axis.

    Raises:
        ValueError: a ``Partial`` placement (a pending reduction has no values to compare).
    """
    if not isinstance(t, DTensor):
        return tuple(np.arange(n, dtype=np.int64) for n in t.shape)
    mesh = t.device_mesh
    return tuple(_axis_coords(mesh, tuple(t.placements), axis, n) for axis, n in enumerate(t.shape))


@functools.lru_cache(maxsize=1024)
def _axis_coords(mesh, placements: tuple, axis: int, size: int) -> np.ndarray:
    """Global indices along ``axis`` of this rank's shard, read off by sharding
    ``arange(size)`` the way the DTensor is sharded along that axis.

    ``distribute_tensor(..., src_data_rank=None)`` splits the local copy without any
    communication, with the same placement code (torch.chunk semantics, strided shards) that
    laid out the parameter, so this cannot drift from torch. Placements on other axes become
    ``Replicate`` (sharding one axis never moves another's indices). Costs O(size) per axis.
    """
    one_d = []
    for mesh_dim, p in enumerate(placements):
        if isinstance(p, Replicate):
            one_d.append(Replicate())
        elif isinstance(p, Shard) or _is_shard_like(p):
            # _StridedShard (FSDP over TP) is not a Shard subclass (torch 2.14); type(p) keeps
            # its split factor without naming the private class
            if p.dim != axis:
                one_d.append(Replicate())
            elif type(p) is Shard:
                one_d.append(Shard(0))
            else:
                one_d.append(type(p)(0, split_factor=p.split_factor))
        else:
            raise ValueError(
                f"cannot locate a shard with placement {p} on mesh dim {mesh_dim}: only Shard "
                "and Replicate hold values; call .redistribute() to a Shard/Replicate layout first"
            )
    idx = torch.arange(size, dtype=torch.int64)
    local = distribute_tensor(idx, mesh, one_d, src_data_rank=None).to_local()
    coords = local.cpu().numpy().astype(np.int64, copy=True)
    coords.flags.writeable = False  # cached and shared between callers
    return coords


def _is_shard_like(p: object) -> bool:
    return hasattr(p, "dim") and hasattr(p, "split_factor")


def compact_index(idx: np.ndarray) -> slice | np.ndarray:
    """A contiguous ascending run of indices as a slice (cheaper to generate and to index)."""
    if idx.size and int(idx[-1]) - int(idx[0]) == idx.size - 1 and (np.diff(idx) == 1).all():
        return slice(int(idx[0]), int(idx[-1]) + 1)
    return idx


def torch_index(idx: slice | np.ndarray) -> slice | torch.Tensor:
    """:func:`compact_index`'s result as something a torch tensor can be indexed with."""
    return idx if isinstance(idx, slice) else torch.from_numpy(idx)


def local_chunks(
    t: torch.Tensor, blocks: Sequence[Block], chunk_elems: int
) -> Iterator[tuple[slice | np.ndarray, TensorInit, tuple]]:
    """Walk this rank's part of ``t`` (all of ``t`` unless a DTensor) block by block, in
    chunks of about ``chunk_elems`` elements: ``(local rows, spec, index)`` where
    ``local_part(t)[local rows]`` holds the values ``generate(spec, index)`` gives (``index``
    in the block's own global coordinates; ``None`` for the whole block). Whole-only specs
    (orthogonal) come as one chunk per block: their QR needs the whole matrix anyway.
    Nothing for an empty local shard."""
    if local_part(t).numel() == 0:  # more ranks than rows: this rank holds nothing of it
        return
    rows, *rest = global_coords(t)
    rest_idx = tuple(compact_index(c) for c in rest)
    row_elems = max(1, math.prod(c.size for c in rest))
    for b in blocks:
        pos = np.flatnonzero((rows >= b.start) & (rows < b.stop))  # local rows in block b
        if pos.size == 0:
            continue
        step = pos.size if b.spec.whole_only else max(1, chunk_elems // row_elems)
        for a in range(0, pos.size, step):
            here = pos[a : a + step]
            index = (compact_index(rows[here] - b.start), *rest_idx)
            yield compact_index(here), b.spec, None if _whole(index, b.spec.shape) else index


def _whole(index: tuple, shape: tuple[int, ...]) -> bool:
    # the whole tensor: pass index=None, the generator's plainest (and fastest) call
    return all(isinstance(i, slice) and i == slice(0, n) for i, n in zip(index, shape, strict=True))


def counts_here(t: torch.Tensor) -> bool:
    """True when this rank's shard of ``t`` is the copy that counts in a sum over ranks.

    A replicated mesh dimension holds the same shard on every rank along it: only the rank at
    coordinate 0 there counts it, so all-reduced counts are never doubled. A plain tensor
    always counts (every rank holds all of it; its analysis is not reduced)."""
    if not isinstance(t, DTensor):
        return True
    coord = t.device_mesh.get_coordinate()
    if coord is None:  # this rank is not in the parameter's mesh
        return False
    return all(c == 0 for c, p in zip(coord, t.placements, strict=True) if isinstance(p, Replicate))


def counting_copies(tensors: Sequence[torch.Tensor]) -> list[bool]:
    """For each DTensor of ``tensors``: whether this rank's shard is the one copy that counts
    in a sum over all ranks of the default process group. Collective (one small all-reduce).

    Copies arise two ways: a replicated dimension of the tensor's own mesh (see
    :func:`counts_here`), and a tensor that lives on a sub-mesh, e.g. a norm weight that FSDP
    shards over ``mesh["dp"]`` only, held alike by each tensor-parallel peer in its own
    ``dp`` group. Sub-meshes of one slicing are disjoint, so the one whose lowest global rank
    is smallest counts."""
    if not tensors:
        return []
    lowest = [int(t.device_mesh.mesh.min()) for t in tensors]
    first = torch.tensor(lowest, dtype=torch.int64, device=collective_device(tensors[0]))
    all_reduce_([first], ["min"])
    return [
        counts_here(t) and own == int(best)
        for t, own, best in zip(tensors, lowest, first.cpu().tolist(), strict=True)
    ]


def as_dtensor_like(local: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``local`` as a DTensor laid out like ``ref`` (no communication); a plain ``ref`` gives
    ``local`` back."""
    if not isinstance(ref, DTensor):
        return local
    return DTensor.from_local(
        local.to(ref.to_local().device),
        ref.device_mesh,
        ref.placements,
        run_check=False,
        shape=ref.shape,
        stride=ref.stride(),
    )


def all_reduce_(tensors: Sequence[torch.Tensor], ops: Sequence[str]) -> None:
    """All-reduce each tensor in place over the default process group (``"sum"``, ``"max"``
    or ``"min"``); one collective per tensor. A no-op outside ``torch.distributed``."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    red = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
    for t, op in zip(tensors, ops, strict=True):
        dist.all_reduce(t, op=red[op])


def collective_device(t: torch.Tensor) -> torch.device:
    """Where a collective about ``t`` must run (the local shard's device: CUDA for nccl)."""
    return local_part(t).device


__all__ = [
    "Coords",
    "all_reduce_",
    "as_dtensor_like",
    "collective_device",
    "compact_index",
    "counting_copies",
    "counts_here",
    "global_coords",
    "is_dtensor",
    "local_chunks",
    "local_part",
    "torch_index",
]
