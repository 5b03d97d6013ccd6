"""Shared benchmark plumbing: dense PyTorch is always in the same group, timed in the same process
with the same thread count; extra_info carries what bench/report.py needs."""
import math
import os
import time

import pytest
import torch


def pytest_addoption(parser):
    parser.addoption("--quick", action="store_true", default=False,
                     help="smoke run: a few cases, few rounds (checks that the benchmarks execute)")


@pytest.fixture(scope="session")
def quick(request):
    return request.config.getoption("--quick") or os.environ.get("SPARSEPRUNE_BENCH_QUICK") == "1"


def steady_malloc() -> str:
    """Keep glibc's malloc from returning large freed blocks to the OS (fixed mmap and trim thresholds), so
    that a layer timed in a loop does not page-fault its fresh output on every call. Whether it does by default
    depends on what ran before (glibc's dynamic threshold): one 3.2 MB conv output measured 65 us without the
    faults and ~800 us with them (784 faults a call), dense oneDNN 0.33 or 1.2 ms, so layer ratios swung 4x
    between runs. Whole models reach this state by themselves (ResNet-50 / BERT forwards: 0 faults a call
    after warm-up), so this times what a model's layers see. Returns a line for the table header."""
    import ctypes
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(-3, 256 << 20) == 1 and libc.mallopt(-1, 512 << 20) == 1  # M_MMAP / M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        ok = False
    return "glibc malloc thresholds fixed (no per-call page faults)" if ok else "malloc left as is (not glibc)"


@pytest.fixture(scope="session", autouse=True)
def _threads():
    steady_malloc()
    n = int(os.environ.get("SPARSEPRUNE_BENCH_THREADS", "0")) or torch.get_num_threads()
    torch.set_num_threads(n)
    yield n


from sparseprune.convert.cache import cpu_model  # noqa: E402  (one definition, shared with convert's cache)


_DENSE = {}  # group -> median seconds of the dense baseline in this process


def measure(benchmark, fn, *, group, impl, dense_flops, density=1.0, quick=False, budget=0.4, **info):
    """Time fn with pytest-benchmark (rounds sized to ~``budget`` seconds, at most 200), record
    extra_info, return median seconds."""
    fn()
    t0 = time.perf_counter()
    fn()
    one = max(time.perf_counter() - t0, 1e-7)
    iterations = max(1, int(2e-3 / one))
    budget = 0.05 if quick else budget
    rounds = max(3, min(200, int(budget / (one * iterations))))
    benchmark.group = group
    benchmark.pedantic(fn, rounds=rounds, iterations=iterations, warmup_rounds=1)
    med = benchmark.stats.stats.median
    if impl == "dense":
        _DENSE[group] = med
    ex = benchmark.extra_info
    ex.update(info)
    ex.update(impl=impl, density=density, threads=torch.get_num_threads(), cpu=cpu_model(),
              dense_gflops_equiv=dense_flops / med / 1e9, useful_gflops=dense_flops * density / med / 1e9)
    if group in _DENSE:
        sp = _DENSE[group] / med
        ex.update(speedup=sp, eta=sp * density)
    return med


def block_sparse(m, k, block, sparsity, seed=0):
    g = torch.Generator().manual_seed(seed)
    r, c = block
    mb, kb = math.ceil(m / r), math.ceil(k / c)
    nkeep = round((1 - sparsity) * mb * kb)
    keep = torch.zeros(mb * kb, dtype=torch.bool)
    keep[torch.randperm(mb * kb, generator=g)[:nkeep]] = True
    mask = keep.reshape(mb, kb).repeat_interleave(r, 0).repeat_interleave(c, 1)[:m, :k]
    return torch.randn(m, k, generator=g) * mask
