"""Wall-clock timing for the benchmarks: one warm-up call, then the best and the median."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def timings(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    """``(best, median)`` wall time in seconds of ``repeats`` calls of ``fn``, after one untimed
    warm-up call (numba compiles, caches fill).

    Raises:
        ValueError: ``repeats`` is below 1.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times), statistics.median(times)


__all__ = ["timings"]
