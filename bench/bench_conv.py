"""SparseConv2d at ResNet-50 layer shapes (batch 1, 224x224 input) against dense PyTorch (oneDNN) in the
same process and thread count, plus ResNet-50 end to end (random-initialised transformers model).

    pytest bench/bench_conv.py --benchmark-only            # pytest-benchmark groups, dense in each group
    python bench/bench_conv.py [--threads 2] [--e2e]        # the markdown table quoted in the README

Speedups come from interleaved minimum times (dense and sparse take turns, best single call of many
rounds): on a shared machine this is the most stable estimate of what each kernel can do.
"""
import argparse
import copy
import math
import os
import sys
import time

import pytest
import torch

import sparseprune as sp
from sparseprune.nn import SparseConv2d

sys.path.insert(0, os.path.dirname(__file__))
from conftest import steady_malloc  # noqa: E402
from resnet_helpers import conv_block_mask, prune_convs, sparsify_convs  # noqa: E402

THREADS = int(os.environ.get("SP_BENCH_THREADS", "2"))
# name, cin, cout, kernel, stride, input size
LAYERS = [
    ("3x3 64->64 @56", 64, 64, 3, 1, 56),
    ("1x1 64->256 @56", 64, 256, 1, 1, 56),
    ("3x3/2 128->128 @56", 128, 128, 3, 2, 56),
    ("3x3 256->256 @14", 256, 256, 3, 1, 14),
    ("1x1 1024->256 @14", 1024, 256, 1, 1, 14),
    ("3x3 512->512 @7", 512, 512, 3, 1, 7),
]
# format, block, sparsity[, weight dtype]: int8 / bf16 run as im2col + the quantized BSR kernel
CONFIGS = [("dense", None, 0.0), ("bsr", (16, 16), 0.8), ("bsr", (16, 16), 0.9), ("csr", None, 0.9),
           ("bsr", (16, 16), 0.8, "int8"), ("bsr", (16, 16), 0.9, "int8"), ("bsr", (16, 16), 0.9, "bfloat16")]


def build(layer, fmt, block, sparsity, threads=THREADS, seed=0, weight_dtype="float32"):
    name, cin, cout, k, s, hw = layer
    g = torch.Generator().manual_seed(seed)
    conv = torch.nn.Conv2d(cin, cout, k, s, k // 2, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g))
        if fmt == "bsr":
            conv.weight.mul_(conv_block_mask(conv.weight, sparsity, block))
        elif fmt == "csr":
            w = conv.weight
            keep = torch.zeros(w.numel(), dtype=torch.bool)
            keep[w.abs().flatten().topk(round(w.numel() * (1 - sparsity))).indices] = True
            w.mul_(keep.reshape(w.shape))
    mod = SparseConv2d.from_dense(conv, format=fmt, block_size=block, num_threads=threads,
                                  weight_dtype=getattr(torch, weight_dtype))
    x = torch.randn(1, cin, hw, hw, generator=g)
    return conv, mod, x


def dense_flops(layer):
    _, cin, cout, k, s, hw = layer
    ho = (hw + 2 * (k // 2) - k) // s + 1
    return 2.0 * cin * cout * k * k * ho * ho


def interleaved_min(fns, rounds=40, warmup=3, inner=3):
    """Best single-call time of each function; the functions take turns, `inner` calls at a time (so
    that the allocator's page faults after another function's large frees do not count against the
    first call of a turn more than they do for dense PyTorch)."""
    best = [math.inf] * len(fns)
    with torch.no_grad():
        for f in fns:
            for _ in range(warmup):
                f()
        for _ in range(rounds):
            for i, f in enumerate(fns):
                for _ in range(inner):
                    t = time.perf_counter()
                    f()
                    best[i] = min(best[i], time.perf_counter() - t)
    return best


def _id(v):
    return v[0] if isinstance(v, tuple) and isinstance(v[0], str) and "@" in v[0] else \
        (f"{v[0]}{'' if v[1] is None else f'{v[1][0]}x{v[1][1]}'}@{v[2]}{''.join('-' + d for d in v[3:])}"
         if isinstance(v, tuple) else str(v))


@pytest.mark.parametrize("layer", LAYERS, ids=_id)
@pytest.mark.parametrize("cfg", CONFIGS, ids=_id)
def test_conv_layer(benchmark, layer, cfg, quick):
    if quick and (layer is not LAYERS[0] or cfg[2] == 0.8 or cfg[0] == "csr"):
        pytest.skip("--quick")
    torch.set_num_threads(THREADS)
    fmt, block, sparsity, *wdt = cfg
    wdt = wdt[0] if wdt else "float32"
    conv, mod, x = build(layer, fmt, block, sparsity, weight_dtype=wdt)
    benchmark.group = f"conv {layer[0]} (threads={THREADS})"
    t_dense, t_mod = interleaved_min([lambda: conv(x), lambda: mod(x)], rounds=20)
    density = mod.density
    benchmark.extra_info.update(
        sparsity=sparsity, format=fmt, block=block, threads=THREADS, density=round(density, 4), weight_dtype=wdt,
        gflops_effective=round(dense_flops(layer) / t_mod / 1e9, 1),
        speedup_vs_dense=round(t_dense / t_mod, 3), eta=round(t_dense / t_mod * density, 3))
    with torch.no_grad():
        out = benchmark.pedantic(mod if fmt != "dense" else conv, args=(x,), rounds=20, warmup_rounds=2)
        ref = conv(x)
        if wdt == "float32":
            torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
        else:  # quantization error only: relative L2 error of a few percent at most
            assert float((out - ref).norm() / ref.norm()) < 0.05


def resnet50_pair(sparsity=0.8, block=(16, 16), threads=THREADS):
    """(dense masked model, sparse model) with every conv but the stem pruned to `sparsity` in blocks."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    dense = transformers.ResNetModel(transformers.ResNetConfig()).eval()
    prune_convs(dense, sparsity, block)
    sparse = copy.deepcopy(dense)
    sparsify_convs(sparse, "bsr", block, num_threads=threads)
    return dense, sparse


@pytest.mark.parametrize("which", ["dense", "sparse"])
def test_resnet50_end_to_end(benchmark, which, quick):
    if quick:
        pytest.skip("--quick")
    torch.set_num_threads(THREADS)
    dense, sparse = resnet50_pair()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        a, b = dense(x).last_hidden_state, sparse(x).last_hidden_state
    rel = float((a - b).norm() / a.norm())
    assert rel < 1e-4
    t_dense, t_sparse = interleaved_min([lambda: dense(x), lambda: sparse(x)], rounds=8, warmup=2, inner=1)
    benchmark.group = f"resnet50 batch 1 224x224 (threads={THREADS})"
    benchmark.extra_info.update(sparsity=0.8, format="bsr" if which == "sparse" else "dense", block=(16, 16),
                                threads=THREADS, rel_error=rel, speedup_vs_dense=round(t_dense / t_sparse, 3))
    with torch.no_grad():
        benchmark.pedantic(sparse if which == "sparse" else dense, args=(x,), rounds=5, warmup_rounds=1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=THREADS)
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--e2e", action="store_true", help="also ResNet-50 end to end")
    ap.add_argument("--e2e-only", action="store_true")
    ap.add_argument("--layout", choices=["nchw", "channels_last"], default="nchw")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"sparseprune {sp.__version__}, torch {torch.__version__}, isa {sp.ops.active_isa()}, "
          f"threads {args.threads}, layout {args.layout}, batch 1; time = interleaved min of {args.rounds} rounds; "
          f"{steady_malloc()}\n")
    if not args.e2e_only:
        print("| layer | dense ms (GFLOP/s) | format | sparsity | density | sparse ms | speedup | eta |")
        print("|---|---|---|---|---|---|---|---|")
    for layer in [] if args.e2e_only else LAYERS:
        built = [build(layer, f, b, s, args.threads, weight_dtype=(d or ["float32"])[0]) for f, b, s, *d in CONFIGS[1:]]
        conv = built[0][0]
        x = built[0][2]
        if args.layout == "channels_last":
            x = x.to(memory_format=torch.channels_last)
        dense_conv = torch.nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                                     conv.padding, bias=False)
        if args.layout == "channels_last":
            dense_conv = dense_conv.to(memory_format=torch.channels_last)
        fns = [lambda: dense_conv(x)] + [(lambda m=m: m(x)) for _, m, _ in built]
        times = interleaved_min(fns, rounds=args.rounds)
        td = times[0]
        for (fmt, block, s, *d), (_, m, _), t in zip(CONFIGS[1:], built, times[1:]):
            name = ("bsr 16x16" if fmt == "bsr" else fmt) + "".join(f" {v}" for v in d)
            print(f"| {layer[0]} | {td * 1e3:.3f} ({dense_flops(layer) / td / 1e9:.0f}) | {name} | {s:.0%} | "
                  f"{m.density:.3f} | {t * 1e3:.3f} | {td / t:.2f}x | {td / t * m.density:.2f} |", flush=True)
    if args.e2e or args.e2e_only:
        dense, sparse = resnet50_pair(threads=args.threads)
        x = torch.randn(1, 3, 224, 224)
        with torch.no_grad():
            a, b = dense(x).last_hidden_state, sparse(x).last_hidden_state
        rel = float((a - b).norm() / a.norm())
        td, ts = interleaved_min([lambda: dense(x), lambda: sparse(x)], rounds=max(10, args.rounds // 2), warmup=2,
                                 inner=1)
        print(f"\nResNet-50 (transformers, random init), all convs but the stem at 80% in 16x16 blocks, batch 1 "
              f"224x224: dense masked {td * 1e3:.1f} ms, sparse {ts * 1e3:.1f} ms, speedup {td / ts:.2f}x, "
              f"relative output difference {rel:.1e}")


if __name__ == "__main__":
    main()
