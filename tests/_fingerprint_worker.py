"""Fingerprint one generated tensor per backend, in a fresh interpreter.

``tests/test_generator_bits.py`` runs this script in subprocesses whose environment pins the
CPU instruction sets each backend may use::

    NPY_DISABLE_CPU_FEATURES   numpy's SIMD dispatch targets (e.g. "X86_V4 AVX512_ICL")
    ATEN_CPU_CAPABILITY        torch's CPU kernels: default, avx2 or avx512
    NUMBA_CPU_NAME             the CPU numba compiles for ("generic": plain x86-64, no AVX)

and checks that every variant reproduces the committed fingerprint. The worker also reports
evidence that each setting took effect (numpy's feature table, torch's capability, the
instructions in numba's machine code), because an ignored variable would pass vacuously.

The tests import :func:`tensor_sha256`, :func:`case_spec` and :func:`reference_block` from
here too, so there is one definition of "the fingerprint of a tensor" on the test side.

Usage::

    python tests/_fingerprint_worker.py '{"seed": 7, "layer_id": 3, "shape": [1024, 2048],
        "scheme": "he"}' numpy,torch,numba

prints ``{"sha256": {backend: {dtype: hex}}, "env": {...}}`` as one JSON line.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from typing import Any

import numpy as np

DTYPES = ("float32", "float64")


def tensor_sha256(a: np.ndarray) -> str:
    """sha256 of the raw little-endian bytes of ``a`` in C order (shape and dtype not included)."""
    a = np.ascontiguousarray(a)
    return hashlib.sha256(a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes()).hexdigest()


def case_spec(case: dict[str, Any]):
    """The :class:`TensorInit` a case describes (``params`` optional, default none)."""
    from cdi_experiments.generator.core import TensorInit

    return TensorInit(
        int(case["seed"]),
        int(case["layer_id"]),
        tuple(case["shape"]),
        case["scheme"],
        case.get("params", {}),
    )


def reference_block(case: dict[str, Any], rows: range) -> np.ndarray:
    """Float64 values of leading-axis ``rows`` of a case from the pure-Python scalar path.

    About 5 us per element: for samples, or for the slow full check split over processes.
    """
    from cdi_experiments.generator import bits

    spec = case_spec(case)
    draw = spec.draw
    inner = list(np.ndindex(*spec.shape[1:]))
    out = np.empty((len(rows), len(inner)), dtype=np.float64)
    seed, layer = spec.seed, spec.layer_id
    for r, i in enumerate(rows):
        if draw.kind == "normal":
            out[r] = [draw.std * bits.gaussian(seed, layer, i, *rest) for rest in inner]
        elif draw.kind == "uniform":
            width = draw.high - draw.low
            out[r] = [
                draw.low + width * bits.u01(seed, layer, i, *rest, bits.SEL_UNIFORM)
                for rest in inner
            ]
        else:
            raise ValueError(f"no scalar reference for a {draw.kind!r} draw")
    return out.reshape((len(rows), *spec.shape[1:]))


def _numpy_env() -> dict[str, Any]:
    try:
        from numpy._core import _multiarray_umath as mu
    except ImportError:  # numpy < 2
        from numpy.core import _multiarray_umath as mu
    disabled = os.environ.get("NPY_DISABLE_CPU_FEATURES", "").replace(",", " ").split()
    return {
        "disabled_requested": disabled,
        # a feature numpy really turned off reads False here
        "disabled_state": {f: bool(mu.__cpu_features__.get(f, False)) for f in disabled},
        "enabled": sorted(f for f, on in mu.__cpu_features__.items() if on),
    }


def _numba_env() -> dict[str, Any]:
    import numba

    from cdi_experiments.generator import numba_kernel

    asm = "\n".join(numba_kernel.gaussian_grid.inspect_asm().values())
    return {
        "cpu_name": numba.config.CPU_NAME,
        # inspect_asm is empty for kernels loaded from numba's cache: the caller points
        # NUMBA_CACHE_DIR at a fresh directory so the kernel is compiled here
        "asm_chars": len(asm),
        "uses_zmm": "zmm" in asm,
        "uses_ymm": "ymm" in asm,
        "uses_fma": bool(re.search(r"\bvfn?m(add|sub)", asm)),
    }


def main(argv: list[str]) -> int:
    case = json.loads(argv[0])
    backends = argv[1].split(",")
    import torch

    from cdi_experiments.generator.core import generate

    torch.set_num_threads(1)  # the tests run workers side by side on small machines
    spec = case_spec(case)
    digests: dict[str, dict[str, str]] = {}
    for backend in backends:
        digests[backend] = {
            dt: tensor_sha256(generate(spec, dtype=dt, backend=backend)) for dt in DTYPES
        }
    env: dict[str, Any] = {"numpy": _numpy_env(), "torch": torch.backends.cpu.get_cpu_capability()}
    if "numba" in backends:
        env["numba"] = _numba_env()
    print(json.dumps({"sha256": digests, "env": env}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
