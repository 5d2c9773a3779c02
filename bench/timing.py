"""Repeated timing for the benches: at least 3 timed calls after warm-up, min and median.

The min is the figure least disturbed by other work on the machine; the median shows how
steady the runs were. A bench reports both, and ratios of medians.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

MIN_REPEATS = 3


def timed(fn: Callable[[], object], repeats: int, warmup: int = 1) -> list[float]:
    """Seconds of each of `repeats` calls of `fn`, after `warmup` untimed ones (compile)."""
    if repeats < MIN_REPEATS:
        raise SystemExit(f"--repeats {repeats}: time at least {MIN_REPEATS} calls")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def median(times: list[float]) -> float:
    return statistics.median(times)


def line(name: str, times: list[float], tokens: int) -> str:
    """`name  min ... ms  median ... ms  ... tok/s (median)` for one implementation."""
    lo, mid = min(times), median(times)
    return (
        f"{name:44s} min {lo * 1e3:9.1f} ms  median {mid * 1e3:9.1f} ms  "
        f"{tokens / mid:9.0f} tok/s (median of {len(times)})"
    )
