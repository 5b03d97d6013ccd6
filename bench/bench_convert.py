"""End-to-end benchmark of convert(): the issue's mixed model and an unpruned model, dense vs converted.

    PYTHONPATH=python python -m pytest bench/bench_convert.py --benchmark-only -s

Mixed model (transformer FFN shapes, 768 <-> 3072): fc1, fc2 at 95% 16x16-block sparsity, fc3 at 90%
unstructured, fc4 at 10% unstructured; 128 rows. Dense PyTorch runs in the same group, same process,
same thread count. ``extra_info`` records the speedup from interleaved timing (dense and converted
alternate, so that load from other processes hits both alike) and the per-layer decisions.
"""
import os
import statistics
import sys
import time

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import sparseprune as sp  # noqa: E402
from test_convert_models import MLP, make_mixed  # noqa: E402

ROWS = 128


def _interleaved(a, b, x, reps=40):
    ta, tb = [], []
    with torch.no_grad():
        for _ in range(3):
            a(x), b(x)
        for _ in range(reps):
            t0 = time.perf_counter()
            a(x)
            t1 = time.perf_counter()
            b(x)
            t2 = time.perf_counter()
            ta.append(t1 - t0)
            tb.append(t2 - t1)
    return statistics.median(ta), statistics.median(tb)


@pytest.fixture(scope="module")
def mixed():
    torch.manual_seed(0)
    src = make_mixed()
    x = torch.randn(ROWS, 768)
    conv = sp.convert(src, x, time_budget=5.0, progress=False)
    print()
    sp.summary(conv)
    return src, conv, x


@pytest.fixture(scope="module")
def unpruned():
    torch.manual_seed(0)
    src = MLP().eval()
    x = torch.randn(ROWS, 768)
    return src, sp.convert(src, x, time_budget=2.0, progress=False), x


def _record(benchmark, src, conv, x):
    dense_s, conv_s = _interleaved(src, conv, x)
    benchmark.extra_info.update(
        rows=ROWS, threads=torch.get_num_threads(), dense_ms=dense_s * 1e3, converted_ms=conv_s * 1e3,
        speedup=dense_s / conv_s,
        layers=[{k: r[k] for k in ("name", "format", "block", "density", "speedup")}
                for r in sp.summary(conv, print_fn=None)])
    print(f"\n{benchmark.name}: dense {dense_s * 1e3:.3f} ms, converted {conv_s * 1e3:.3f} ms, "
          f"speedup {dense_s / conv_s:.2f}x")


@pytest.mark.benchmark(group="mixed-128")
def test_mixed_dense(benchmark, mixed):
    src, _, x = mixed
    with torch.no_grad():
        benchmark(src, x)


@pytest.mark.benchmark(group="mixed-128")
def test_mixed_converted(benchmark, mixed):
    src, conv, x = mixed
    with torch.no_grad():
        benchmark(conv, x)
    _record(benchmark, src, conv, x)


@pytest.mark.benchmark(group="unpruned-128")
def test_unpruned_dense(benchmark, unpruned):
    src, _, x = unpruned
    with torch.no_grad():
        benchmark(src, x)


@pytest.mark.benchmark(group="unpruned-128")
def test_unpruned_converted(benchmark, unpruned):
    src, conv, x = unpruned
    with torch.no_grad():
        benchmark(conv, x)
    _record(benchmark, src, conv, x)


@pytest.mark.benchmark(group="convert-cost")
def test_convert_cost_bert_base(benchmark, quick, tmp_path, monkeypatch):
    """Wall time of sp.convert itself on BERT-base (random init, 1x128 tokens, every Linear at 90% 16x16
    blocks, default time_budget): the first convert times every layer, the second finds the timings in
    the on-disk cache (a fresh cache folder for this test). Recorded, not asserted."""
    if quick:
        pytest.skip("BERT-base convert cost: full benchmark runs only")
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import bench_models as bm
    monkeypatch.setenv("SPARSEPRUNE_CACHE_DIR", str(tmp_path / "cache"))
    model, args = bm._bert_base()
    sp.prune_blocks(model, sparsity=0.9, block_size=(16, 16), dense_first_last=False)
    model.eval()
    seconds = []

    def once():
        t = time.perf_counter()
        with torch.no_grad():
            fast = sp.convert(model, args, progress=False)
        seconds.append(time.perf_counter() - t)
        return fast

    once()  # first convert: every layer timed
    fast = benchmark.pedantic(once, rounds=1, iterations=1)  # second convert: cached timings
    s = sp.summary(fast, print_fn=None).totals
    benchmark.extra_info.update(first_convert_s=seconds[0], second_convert_s=seconds[1],
                                sparse_layers=s["sparse_layers"], layers=s["layers"],
                                end_to_end_ms=s["end_to_end_ms"], threads=torch.get_num_threads())
    print(f"\nconvert BERT-base: first {seconds[0]:.1f} s, second (cache) {seconds[1]:.1f} s; "
          f"{s['sparse_layers']}/{s['layers']} sparse; end to end {s['end_to_end_ms']}")
