"""One torchrun worker for ``tests/test_sharded.py``: every sharded layout at one world size.

Run as ``torchrun --nproc-per-node N tests/_sharded_worker.py OUT`` (gloo, CPU). Each rank
initializes, perturbs, analyzes and rewinds sharded models; every result that lives in shards
is gathered with ``full_tensor()`` and rank 0 saves it all to ``OUT/world{N}.pt``. The test
process then recomputes each result in one process on plain tensors and compares, so this
script checks nothing itself: it only produces the sharded side.

Layouts (all at every N unless noted):

* ``fsdp``: FSDP2 ``fully_shard`` (``Shard(0)``, uneven: 30 and 7 rows, an MHA whose packed
  ``in_proj_weight`` shards straddle its Q/K/V blocks, a conv, an embedding, a norm).
* ``fsdp_meta``: the same net built on the meta device and materialized by ``init_module``.
* ``tp``: tensor parallel: ``ColwiseParallel`` (``Shard(0)``), ``RowwiseParallel``
  (``Shard(1)`` weight, ``Replicate`` bias), and a plain (unsharded) LayerNorm.
* ``2d``, ``2d_meta`` (N=4): FSDP over TP on a 2 x 2 mesh (strided shards).
"""

from __future__ import annotations

import os
import resource
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from cdi_experiments.generator import schemes
from cdi_experiments.generator.core import DEFAULT_CHUNK_ELEMS, layer_id_for
from cdi_experiments.modules import (
    analyze_module,
    awakened_masks,
    delta_stats,
    init_module,
    record_module,
    rewind,
)
from cdi_experiments.modules.sharding import global_coords, local_part
from cdi_experiments.pruning.mask import Mask

THRESHOLDS = (0.0, 1e-6, 1e-4, 1e-2)
SEED = 11
SCHEME_PARAMS = {"constant": {"value": 0.37}, "uniform": {"low": -0.2, "high": 0.3}}
META_SCHEMES = ("torch_default", "he")
# (scheme, zero_mean_conv) analyzed per layout: normal and uniform draws (the fused path),
# zero-mean filters and orthogonal matrices (whole-only paths)
ANALYSES = {
    "fsdp": (("he", True), ("orthogonal", False), ("xavier_uniform", False)),
    "fsdp_meta": (("he", False),),
    "tp": (("he", False), ("orthogonal", False)),
    "2d": (("he", False), ("orthogonal", False)),
    "2d_meta": (("he", False),),
}


class FsdpNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3)
        self.emb = nn.Embedding(11, 6)
        self.attn = nn.MultiheadAttention(6, 2)
        self.norm = nn.LayerNorm(6)
        self.fc1 = nn.Linear(64, 30)
        self.fc2 = nn.Linear(30, 7)


class TpNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.col = nn.Linear(16, 30)
        self.row = nn.Linear(30, 7)
        self.norm = nn.LayerNorm(7)


def per_element_schemes() -> list[str]:
    """Every registered scheme whose values are drawn element by element (all but QR)."""
    return [
        s
        for s in schemes.names()
        if schemes.get(s).draw(4, 4, SCHEME_PARAMS.get(s, {})).kind != "orthogonal"
    ]


def build(layout: str, world: int, meta: bool) -> nn.Module:
    """The layout's model, sharded, with a random (rank-dependent) or meta init first."""
    torch.manual_seed(1000 + dist.get_rank())  # a different random init on every rank
    with torch.device("meta") if meta else torch.device("cpu"):
        net = FsdpNet() if layout.startswith("fsdp") else TpNet()
    if layout.startswith("fsdp"):
        fully_shard(net, mesh=init_device_mesh("cpu", (world,)))
        return net
    plan = {"col": ColwiseParallel(), "row": RowwiseParallel()}
    if layout == "tp":
        parallelize_module(net, init_device_mesh("cpu", (world,)), plan)
        return net
    mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp", "tp"))
    parallelize_module(net, mesh["tp"], plan)
    fully_shard(net, mesh=mesh["dp"])
    return net


def gathered(net: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter, whole (collective)."""
    out = {}
    for name, p in net.named_parameters():
        out[name] = (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
    return out


def placements(net: nn.Module) -> dict[str, str]:
    return {n: str(getattr(p, "placements", "plain")) for n, p in net.named_parameters()}


def perturb(net: nn.Module) -> None:
    """Move about a third of the weights by amounts spread over 9 decades (the same global
    perturbation at every world size), and make one weight NaN."""
    with torch.no_grad():
        for name, p in net.named_parameters():
            g = torch.Generator().manual_seed(layer_id_for(name) % 2**31)
            shape = tuple(p.shape)
            move = torch.rand(shape, generator=g) < 0.35
            size = 10 ** (-9 * torch.rand(shape, generator=g))
            full = move * torch.randn(shape, generator=g) * size
            if name == "fc1.weight" or name == "row.weight":
                full[1, 2] = float("nan")
            grid = tuple(torch.from_numpy(c) for c in np.ix_(*global_coords(p)))
            local_part(p).add_(full[grid])


def stats_dict(stats) -> dict[str, dict]:
    return {
        n: {
            "total": s.total,
            "zeros": s.zeros,
            "nan": s.nan,
            "changed": [s.changed[t] for t in THRESHOLDS],
            "hist": torch.from_numpy(s.hist.copy()),
            "total_sum": s.total_sum,
            "max": s.max,
        }
        for n, s in stats.items()
    }


def naive_counts(net: nn.Module) -> dict[str, int]:
    """Sum over ranks of each parameter's local element count (what a reduction that ignores
    replication would count)."""
    out = {}
    for name, p in net.named_parameters():
        n = torch.tensor([local_part(p).numel()], dtype=torch.int64)
        dist.all_reduce(n)
        out[name] = int(n)
    return out


def analysis_case(layout: str, world: int, scheme: str, zero_mean: bool) -> dict:
    net = build(layout, world, meta=layout.endswith("meta"))
    kw = {"device": "cpu"} if layout.endswith("meta") else {}
    plan = init_module(net, SEED, scheme, zero_mean_conv=zero_mean, **kw)
    initial = gathered(net)
    perturb(net)
    out = {"plan": plan.to_dict(), "initial": initial, "perturbed": gathered(net)}
    out["stats"] = stats_dict(delta_stats(net, plan, THRESHOLDS, chunk_elems=50))
    out["table"] = analyze_module(net, plan, THRESHOLDS).to_dict("list")
    out["naive_counts"] = naive_counts(net)
    masks = awakened_masks(net, plan, 1e-4, chunk_elems=50)
    out["mask_is_dtensor"] = {n: isinstance(m, DTensor) for n, m in masks.items()}
    out["masks"] = {n: m.full_tensor() if isinstance(m, DTensor) else m for n, m in masks.items()}
    try:
        Mask(masks)
        out["mask_error"] = None
    except ValueError as exc:
        out["mask_error"] = str(exc)
    rewind(net, plan, masks)
    out["rewound_masked"] = gathered(net)
    perturb(net)
    rewind(net, plan)
    out["rewound"] = gathered(net)
    if layout == "fsdp":  # a recorded plan (an init made elsewhere): gathered, then cut up
        perturb(net)
        recorded = record_module(net)
        perturb(net)
        out["recorded_perturbed"] = gathered(net)
        out["recorded_plan"] = {n: t.clone() for n, t in recorded.tensors.items()}
        out["recorded_stats"] = stats_dict(delta_stats(net, recorded, THRESHOLDS))
    return out


def _vm_hwm_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return -1


def memory_case(world: int) -> dict:
    """Peak extra memory of init on one FSDP2-sharded 4096 x 4096 Linear built on meta."""
    with torch.device("meta"):
        big = nn.Linear(4096, 4096, bias=False)
    fully_shard(big, mesh=init_device_mesh("cpu", (world,)))
    big.to_empty(device="cpu")  # the local shard itself, allocated before measuring
    local_bytes = local_part(big.weight).numel() * 4
    try:  # reset VmHWM (Linux >= 4.0) so the RSS peak is this init's
        Path("/proc/self/clear_refs").write_text("5")
        rss0 = _vm_hwm_kib()
    except OSError:
        rss0 = -1
    tracemalloc.start()
    t0 = time.perf_counter()
    init_module(big, SEED, "he")
    seconds = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    rss_peak = _vm_hwm_kib() - rss0 if rss0 >= 0 else -1
    return {
        "local_bytes": local_bytes,
        "traced_peak_bytes": peak,
        "rss_peak_growth_kib": rss_peak,
        "seconds": seconds,
        "chunk_elems": DEFAULT_CHUNK_ELEMS,
        "maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    }


def naive_torch_init(world: int) -> dict[str, torch.Tensor]:
    """The issue's counterexample: meta + fully_shard + to_empty + manual_seed(0) +
    reset_parameters on every rank."""
    with torch.device("meta"):
        net = nn.Linear(64, 32)
    fully_shard(net, mesh=init_device_mesh("cpu", (world,)))
    net.to_empty(device="cpu")
    torch.manual_seed(0)
    net.reset_parameters()
    return gathered(net)


def main() -> None:
    out_dir = Path(sys.argv[1])
    dist.init_process_group("gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    layouts = ["fsdp", "fsdp_meta", "tp"] + (["2d", "2d_meta"] if world == 4 else [])
    result: dict = {"world": world, "layouts": layouts, "init": {}, "placements": {}}
    t0 = time.perf_counter()
    for layout in layouts:
        meta = layout.endswith("meta")
        net = build(layout, world, meta=False)  # eager layouts re-init one model per scheme
        # every scheme on the eager layouts; on the meta ones (a fresh model each) two
        cases = per_element_schemes() + ["orthogonal"] if not meta else META_SCHEMES
        for scheme in cases:
            for zero_mean in (False, True) if scheme == "he" else (False,):
                if meta:
                    net = build(layout, world, meta=True)
                init_module(
                    net,
                    SEED,
                    scheme,
                    params=SCHEME_PARAMS.get(scheme),
                    zero_mean_conv=zero_mean,
                    device="cpu" if meta else None,
                )
                result["init"][f"{layout}/{scheme}/{int(zero_mean)}"] = gathered(net)
        result["placements"][layout] = placements(net)
    result["init_seconds"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    result["analysis"] = {
        f"{layout}/{scheme}/{int(zm)}": analysis_case(layout, world, scheme, zm)
        for layout in layouts
        for scheme, zm in ANALYSES[layout]
    }
    result["analysis_seconds"] = time.perf_counter() - t0
    result["naive_torch"] = naive_torch_init(world)
    try:
        init_module(build("fsdp", world, meta=False), SEED, "lsuv", lsuv_batch=torch.zeros(1))
        result["lsuv_error"] = None
    except ValueError as exc:
        result["lsuv_error"] = str(exc)
    memory = [None] * world
    dist.all_gather_object(memory, memory_case(world))
    result["memory"] = memory
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        torch.save(result, out_dir / f"world{world}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
