"""Write tests/fingerprints.json: sha256 of generated tensors, the generator's bit contract.

Each case is ``(seed, layer_id, shape, scheme)``; its float32 and float64 tensors are hashed
as raw little-endian bytes in C order. The tests regenerate every case with every backend (and
under several CPU instruction sets) and compare. Regenerate the file only together with a
deliberate bump of ``GENERATOR_VERSION``.

Usage::

    .venv/bin/python scripts/make_fingerprints.py                 # write the file (numba)
    .venv/bin/python scripts/make_fingerprints.py --check         # compare, write nothing
    .venv/bin/python scripts/make_fingerprints.py --reference     # also recompute every case
        with the pure-Python scalar path over all cores (minutes) and require equal digests
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import multiprocessing as mp
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from cdi_experiments.generator import bits
from cdi_experiments.generator.core import BACKENDS, TensorInit, generate

FINGERPRINTS = Path(__file__).resolve().parents[1] / "tests" / "fingerprints.json"
DTYPES = ("float32", "float64")

CASES: list[dict[str, Any]] = [
    # the big one: > 10M coordinates, the original tool's seed
    {"seed": 42, "layer_id": 0, "shape": [4096, 2560], "scheme": "he"},
    # ~2M: small enough to regenerate under several instruction sets in the default test run
    {"seed": 7, "layer_id": 3, "shape": [1024, 2048], "scheme": "he"},
    # extreme 64-bit seed and layer id, a 4-D conv shape
    {"seed": 2**64 - 1, "layer_id": 2**63 + 5, "shape": [64, 3, 7, 7], "scheme": "he"},
    # 1-D, seed 0
    {"seed": 0, "layer_id": 1, "shape": [1000], "scheme": "he"},
    # the uniform stream (selector 2)
    {"seed": 42, "layer_id": 5, "shape": [300, 500], "scheme": "he_uniform"},
]


def tensor_sha256(a: np.ndarray) -> str:
    """sha256 of the raw little-endian bytes of ``a`` in C order."""
    a = np.ascontiguousarray(a)
    return hashlib.sha256(a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes()).hexdigest()


def _spec(case: dict[str, Any]) -> TensorInit:
    return TensorInit(case["seed"], case["layer_id"], tuple(case["shape"]), case["scheme"])


def _reference_rows(job: tuple[dict[str, Any], int, int]) -> np.ndarray:
    """Float64 rows ``[a, b)`` of a case from the scalar reference (``bits``)."""
    case, a, b = job
    spec = _spec(case)
    draw = spec.draw
    inner = list(np.ndindex(*spec.shape[1:]))
    seed, layer = spec.seed, spec.layer_id
    if draw.kind == "normal":
        vals = [draw.std * bits.gaussian(seed, layer, i, *r) for i in range(a, b) for r in inner]
    else:
        width = draw.high - draw.low
        vals = [
            draw.low + width * bits.u01(seed, layer, i, *r, bits.SEL_UNIFORM)
            for i in range(a, b)
            for r in inner
        ]
    return np.array(vals, dtype=np.float64).reshape((b - a, *spec.shape[1:]))


def reference(case: dict[str, Any], pool: Any) -> np.ndarray:
    """The whole float64 tensor of a case from the scalar reference, rows split over ``pool``."""
    rows = case["shape"][0]
    step = max(1, math.ceil(rows / 64))
    jobs = [(case, a, min(a + step, rows)) for a in range(0, rows, step)]
    return np.concatenate(pool.map(_reference_rows, jobs))


def fingerprints(backend: str, with_reference: bool) -> list[dict[str, Any]]:
    """One record per (case, dtype)."""
    records = []
    pool = mp.Pool() if with_reference else None
    try:
        for case in CASES:
            spec = _spec(case)
            ref = None
            if pool is not None:
                t0 = time.perf_counter()
                ref = reference(case, pool)
                print(
                    f"  scalar reference {case['shape']}: {time.perf_counter() - t0:.1f} s",
                    file=sys.stderr,
                )
            for dt in DTYPES:
                digest = tensor_sha256(generate(spec, dtype=dt, backend=backend))
                if ref is not None and tensor_sha256(ref.astype(dt)) != digest:
                    raise SystemExit(
                        f"error: backend {backend} disagrees with the scalar reference on "
                        f"{case} {dt}; fix the backend before writing fingerprints"
                    )
                records.append(
                    {**case, "dtype": dt, "elements": math.prod(case["shape"]), "sha256": digest}
                )
    finally:
        if pool is not None:
            pool.close()
    return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="numba", choices=[b for b in BACKENDS if b != "auto"])
    parser.add_argument("--reference", action="store_true", help="verify with the scalar path")
    parser.add_argument("--check", action="store_true", help="compare with the file, no write")
    parser.add_argument("--out", type=Path, default=FINGERPRINTS)
    args = parser.parse_args(argv)

    records = fingerprints(args.backend, args.reference)
    doc = {
        "generator_version": bits.GENERATOR_VERSION,
        "about": "sha256 of raw little-endian C-order bytes; written by scripts/make_fingerprints.py",
        "cases": records,
    }
    if args.check:
        committed = json.loads(args.out.read_text())
        if committed != doc:
            print(f"error: {args.out} differs from what {args.backend} generates", file=sys.stderr)
            return 1
        print(f"{args.out}: {len(records)} fingerprints match ({args.backend})")
        return 0
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {len(records)} fingerprints to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
