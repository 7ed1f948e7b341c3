"""Benchmark at scale: sharded init, init_module on resnet18, and the analysis of N parameters.

Every line names what it timed and ends with a ratio (ours over torch's equivalent, or over
the 1-rank run), so figures from different machines compare by ratio; the header prints the
CPU model, its vector flags and the thread counts, so they are never confused. Timings are
best of ``--repeats`` (after one untimed call that also compiles or loads the numba kernels).

Lines:

* ``shard world=W``: an MLP (``--shard-params``) built on the meta device, FSDP2
  ``fully_shard``-ed over W gloo processes (one thread each), materialized by ``init_module``:
  the slowest rank's time, and per rank the peak RSS growth and the peak numpy allocations
  (tracemalloc) during the init. Ratio: over the 1-rank time (1/W is perfect scaling).
* ``resnet18``: ``init_module(resnet18(num_classes=10))`` over torch's ``reset_parameters``
  of the same modules, with our default scheme (He normal: a log and a cosine per weight)
  and with ``torch_default`` (torch's own uniform distributions, addressable). Ratio: ours /
  torch.
* ``analysis``: ``analyze_module`` over a stack of ``Linear(4096, 4096)`` layers holding
  ``--params`` parameters, every third row moved by 1e-4. Up to ``--materialize-max``
  parameters the model is real; above it (``--params 1e9``) the weights are never held whole:
  each ``(chunk, 4096)`` block of each layer is regenerated, perturbed, and summarized with
  :func:`~cdi_experiments.generator.core.delta_summary` at its global rows (what
  ``analyze_module`` does per parameter), and only the summaries are timed. Peak memory:
  tracemalloc's peak over the analysis and the RSS growth. Ratio: over
  ``kaiming_normal_`` of the same parameters (layer-sized buffer refilled, same threads).

The last line is ``ratio <analysis time over N params / kaiming_normal_ time over the same
params>``. A CUDA line (generation against ``torch.randn`` on the device) is printed when a
GPU is present.

Usage::

    .venv/bin/python scripts/bench_scale.py [--params 1e8] [--repeats 3] [--threads 2]
    .venv/bin/python scripts/bench_scale.py --quick      # seconds: small sizes, for the tests
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import socket
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numba
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from cdi_experiments.generator import core
from cdi_experiments.modules import analyze_module, init_module
from cdi_experiments.modules.analysis import DELTA_EDGES
from cdi_experiments.timing import timings

LAYER = 4096  # analysis layers are (LAYER, LAYER)
MOVE = 1e-4  # every third row of every analysed layer is moved by this much
THRESHOLDS = (0.0, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2)


def best_of(fn: Callable[[], object], repeats: int) -> float:
    """Best wall time over ``repeats`` calls, after one untimed call."""
    return timings(fn, repeats)[0]


def maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_header() -> list[str]:
    model, flags = platform.processor() or "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:
        pass
    vec = [f for f in ("avx2", "fma", "avx512f", "avx512dq", "avx512vl") if f in flags]
    return [
        f"cpu {model} ({os.cpu_count()} logical cpus), {platform.machine()}, "
        f"python {platform.python_version()}",
        f"flags {' '.join(vec) or 'none of avx2/fma/avx512'} "
        f"(avx2={'avx2' in flags}, avx512={'avx512f' in flags})",
        f"threads torch={torch.get_num_threads()} numba={numba.get_num_threads()} "
        f"(layer {numba.threading_layer() if _numba_ran() else 'n/a'}), "
        f"torch {torch.__version__}, numba {numba.__version__}, "
        f"backend auto -> {core.resolve_backend('auto')}",
    ]


def _numba_ran() -> bool:
    try:
        numba.threading_layer()
    except ValueError:  # no parallel kernel ran yet
        return False
    return True


# ----------------------------------------------------------------------------- sharded init


def _mlp(params: int) -> nn.Sequential:
    """``Linear(1024, 1024)`` layers holding about ``params`` weights, and a 7-row head so
    that shards are uneven."""
    width = 1024
    hidden = [nn.Linear(width, width) for _ in range(max(1, round(params / width**2)))]
    return nn.Sequential(*hidden, nn.Linear(width, 7))


def _shard_worker(rank: int, world: int, port: int, params: int, out_dir: str) -> None:
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    numba.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        core.generate(core.TensorInit(0, 0, (8, 8)))  # compile/load the kernel: not timed
        with torch.device("meta"):
            model = _mlp(params)
        for layer in model:
            fully_shard(layer)
        fully_shard(model)
        dist.barrier()
        rss0 = maxrss_mib()
        tracemalloc.start()
        t0 = time.perf_counter()
        init_module(model, seed=0, device="cpu")
        elapsed = time.perf_counter() - t0
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        local = sum(p.to_local().numel() for p in model.parameters())
        result = {
            "time": elapsed,
            "rss_growth_mib": maxrss_mib() - rss0,
            "numpy_peak_mib": peak / 2**20,
            "local_params": local,
        }
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sharded_init(world: int, params: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_shard_worker, args=(world, _free_port(), params, out), nprocs=world, join=True)
        return [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(world)]


# ----------------------------------------------------------------------------- resnet18


def resnet18_line(repeats: int) -> str:
    import torchvision

    model = torchvision.models.resnet18(num_classes=10)

    def torch_init() -> None:
        for m in model.modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()

    theirs = best_of(torch_init, repeats)
    n = sum(p.numel() for p in model.parameters())
    lines = []
    for scheme in ("he", "torch_default"):
        ours = best_of(lambda s=scheme: init_module(model, seed=0, scheme=s), repeats)
        lines.append(
            f"resnet18 init_module scheme={scheme} ({n / 1e6:.1f} M params): ours "
            f"{ours * 1e3:.0f} ms, torch reset_parameters {theirs * 1e3:.0f} ms, "
            f"ratio {ours / theirs:.2f}"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------- analysis


def _layer_rows(params: int) -> list[int]:
    """Rows of each (rows, LAYER) layer: full layers, then one holding the remainder."""
    rows = [LAYER] * (params // (LAYER * LAYER))
    rest = math.ceil((params - sum(rows) * LAYER) / LAYER)
    return rows + ([rest] if rest > 0 else [])


def _moved(w: torch.Tensor, first_row: int) -> None:
    """Move every third (global) row by MOVE, in place."""
    with torch.no_grad():
        w[(3 - first_row % 3) % 3 :: 3] += MOVE


def analysis_materialized(params: int, repeats: int) -> tuple[float, float, float, int]:
    """(time, tracemalloc peak MiB, RSS growth MiB, params) of analyze_module on a real model."""
    model = nn.Sequential(*[nn.Linear(LAYER, r, bias=False) for r in _layer_rows(params)])
    plan = init_module(model, seed=0, biases=False)
    for layer in model:
        _moved(layer.weight, 0)
    n = sum(p.numel() for p in model.parameters())
    analyze_module(model, plan, THRESHOLDS)  # untimed: compiles or loads the fused kernel
    rss0 = maxrss_mib()
    tracemalloc.start()
    t = best_of(lambda: analyze_module(model, plan, THRESHOLDS), max(1, repeats - 1))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return t, peak / 2**20, maxrss_mib() - rss0, n


def analysis_streamed(params: int) -> tuple[float, float, float, int]:
    """As :func:`analysis_materialized`, never holding a layer whole: only the per-chunk
    :func:`delta_summary` calls are timed (not the regeneration of the stand-in weights)."""
    rows_per_chunk = max(1, core.DEFAULT_CHUNK_ELEMS // LAYER)
    rss0 = maxrss_mib()
    tracemalloc.start()
    total, n = 0.0, 0
    for k, rows in enumerate(_layer_rows(params)):
        spec = core.TensorInit(0, core.layer_id_for(f"{k}.weight"), (rows, LAYER))
        for a in range(0, rows, rows_per_chunk):
            index = (slice(a, min(rows, a + rows_per_chunk)),)
            w = torch.from_numpy(core.generate(spec, index))
            _moved(w, a)
            t0 = time.perf_counter()
            core.delta_summary(w, spec, index, thresholds=THRESHOLDS, edges=DELTA_EDGES)
            total += time.perf_counter() - t0
            n += w.numel()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return total, peak / 2**20, maxrss_mib() - rss0, n


def kaiming_time(params: int, repeats: int) -> float:
    """kaiming_normal_ over ``params`` weights: a (LAYER, LAYER) buffer refilled per layer."""
    rows = _layer_rows(params)
    buf = torch.empty(LAYER, LAYER)

    def run() -> None:
        for r in rows:
            torch.nn.init.kaiming_normal_(buf[:r])

    return best_of(run, repeats)


def cuda_line(repeats: int) -> str | None:
    if not torch.cuda.is_available():
        return None
    shape = (4096, 4096)
    spec = core.TensorInit(42, 0, shape)

    def ours() -> None:
        core.generate_tensor(spec, device="cuda", backend="torch")
        torch.cuda.synchronize()

    def theirs() -> None:
        torch.randn(shape, device="cuda")
        torch.cuda.synchronize()

    a, b = best_of(ours, repeats), best_of(theirs, repeats)
    return (
        f"cuda {torch.cuda.get_device_name()} 4096x4096 float32: ours {a * 1e3:.2f} ms, "
        f"torch.randn {b * 1e3:.2f} ms, ratio {a / b:.2f}"
    )


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=float, default=1e8, help="analysed parameters")
    parser.add_argument("--shard-params", type=float, default=16e6, help="sharded MLP size")
    parser.add_argument("--worlds", default="1,2,4", help="world sizes of the sharded init")
    parser.add_argument("--materialize-max", type=float, default=2e8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one repeat")
    args = parser.parse_args(argv)
    if args.quick:
        args.params, args.shard_params, args.repeats = 2e6, 1e6, 1
    params, shard_params = int(args.params), int(args.shard_params)
    torch.set_num_threads(args.threads)
    numba.set_num_threads(args.threads)
    core.generate(core.TensorInit(0, 0, (8, 8)))  # load or compile the kernels: not timed

    for line in cpu_header():
        print(line, flush=True)
    print(f"best of {args.repeats} after an untimed call; a shared machine makes times noisy")

    base = None
    for world in (int(w) for w in args.worlds.split(",")):
        ranks = sharded_init(world, shard_params)
        slowest = max(r["time"] for r in ranks)
        base = base or slowest
        per_rank = ", ".join(
            f"r{i} {r['time'] * 1e3:.0f} ms rss+{r['rss_growth_mib']:.0f} MiB "
            f"numpy-peak {r['numpy_peak_mib']:.1f} MiB ({r['local_params'] / 1e6:.2f} M local)"
            for i, r in enumerate(ranks)
        )
        print(
            f"shard world={world} fully_shard MLP {shard_params / 1e6:.1f} M params, meta -> "
            f"init_module: {slowest * 1e3:.0f} ms [{per_rank}], ratio {slowest / base:.2f}",
            flush=True,
        )

    print(resnet18_line(args.repeats), flush=True)

    line = cuda_line(args.repeats)
    if line:
        print(line, flush=True)

    streamed = params > args.materialize_max
    if streamed:
        t, peak, rss, n = analysis_streamed(params)
        how = "streamed chunks, delta_summary"
    else:
        t, peak, rss, n = analysis_materialized(params, args.repeats)
        how = "materialized model, analyze_module"
    k = kaiming_time(n, args.repeats)
    print(
        f"analysis {n / 1e6:.1f} M params ({how}): {t:.2f} s ({n / t / 1e6:.0f} M params/s), "
        f"peak numpy {peak:.1f} MiB, rss growth {rss:.0f} MiB; kaiming_normal_ {k:.2f} s, "
        f"ratio {t / k:.2f}",
        flush=True,
    )
    print(f"ratio {t / k:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
