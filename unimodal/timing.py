"""Wall-clock timing for benchmarks and measured comparisons: the median of repeated calls, with queued
GPU work waited for."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def time_it(fn: Callable[[], object], repeats: int = 5, warmup: int = 1, device: str = "cpu") -> float:
    """Median seconds per call of `fn`, after `warmup` calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def sync(device: str | torch.device):
    """Wait for queued GPU work, so wall-clock timers measure it (a no-op on CPU)."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
