"""Benchmarks, each run as ``python -m tests.bench.NAME``, against a same-process baseline."""

import time
from collections.abc import Callable


def best_per_call(run: Callable[[int], None], calls: int, repeats: int) -> float:
    """Seconds per call: the fastest of ``repeats`` runs of ``calls`` calls."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run(calls)
        best = min(best, (time.perf_counter() - start) / calls)
    return best
