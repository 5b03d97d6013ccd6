"""The one timing helper (convert, measure, search, demo and the benchmarks use it)."""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Dict, Optional

import torch

__all__ = ["time_calls", "Threads", "sync"]


def sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def time_calls(calls: Dict[str, Callable[[], Any]], budget_s: float, *, min_reps: int = 3, max_reps: int = 50,
               warmup: int = 1, deadline: Optional[float] = None) -> Dict[str, float]:
    """Median seconds per call of each callable, timed round-robin (noise from other processes hits
    them alike) until ``budget_s`` is spent, with at least ``min_reps`` rounds — fewer (but one) when
    the absolute ``deadline`` (a ``time.perf_counter()`` value) has passed."""
    for _ in range(warmup):
        for fn in calls.values():  # first-call allocations, lazy init
            fn()
    sync()
    samples = {k: [] for k in calls}
    start = time.perf_counter()
    for rep in range(max(max_reps, 1)):
        for k, fn in calls.items():
            t0 = time.perf_counter()
            fn()
            sync()
            samples[k].append(time.perf_counter() - t0)
        now = time.perf_counter()
        if deadline is not None and now >= deadline:
            break
        if rep + 1 >= min_reps and now - start > budget_s:
            break
    return {k: statistics.median(v) for k, v in samples.items()}


class Threads:
    """``with Threads(n):`` sets torch's thread count for the block (``None``: unchanged)."""

    def __init__(self, n: Optional[int]):
        self.n, self.old = n, None

    def __enter__(self):
        if self.n is not None:
            self.old = torch.get_num_threads()
            torch.set_num_threads(int(self.n))
        return self

    def __exit__(self, *exc):
        if self.old is not None:
            torch.set_num_threads(self.old)
