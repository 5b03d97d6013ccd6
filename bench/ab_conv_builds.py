"""Two builds of the sparse conv kernels in one process, taking turns with dense ``nn.Conv2d`` on the ResNet-50
layer shapes (batch 1, NCHW, 16x16 blocks): the conv counterpart of ``ab_builds.py``. The installed
``sparseprune._C`` is "new"; ``--old`` is the ``_C`` shared object of another build, e.g.

    git worktree add /tmp/oldsrc <commit>
    cmake -S /tmp/oldsrc -B /tmp/oldbuild -G Ninja -DCMAKE_BUILD_TYPE=Release -DSPARSEPRUNE_CUDA=OFF \
        -Dpybind11_DIR=$(python -m pybind11 --cmakedir) -DPython_EXECUTABLE=$(which python)
    cmake --build /tmp/oldbuild -j2
    python bench/ab_conv_builds.py --old /tmp/oldbuild/_C.*.so [--rounds 41] [--isa avx2]

Both builds run the same SparseConv2d (one deep copy each, so that each keeps the plan its own ``_C`` made);
each output is checked against the dense conv first. ``new/old`` is the median over rounds of old time / new
time (dense runs before each build's call, the builds' order alternating); η = speedup over dense x density, best call of each.
"""
import argparse
import copy
import os
import statistics
import sys
import time

import torch

from sparseprune import ops
from sparseprune.convert.cache import cpu_model
from sparseprune.nn import SparseConv2d

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ab_builds import load_old  # noqa: E402
from conftest import steady_malloc  # noqa: E402
from resnet_helpers import conv_block_mask  # noqa: E402

# name, in, out, kernel, stride, input size
SHAPES = [("3x3 64->64 @56", 64, 64, 3, 1, 56), ("1x1 64->256 @56", 64, 256, 1, 1, 56),
          ("3x3/2 128->128 @56", 128, 128, 3, 2, 56), ("3x3 256->256 @14", 256, 256, 3, 1, 14),
          ("1x1 1024->256 @14", 1024, 256, 1, 1, 14), ("1x1 256->1024 @14", 256, 1024, 1, 1, 14),
          ("3x3 512->512 @7", 512, 512, 3, 1, 7)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--old", required=True)
    ap.add_argument("--rounds", type=int, default=31)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sparsities", default="0.8,0.9")
    ap.add_argument("--isa", default=None, help="force this ISA path in both builds (e.g. avx2)")
    ap.add_argument("--channels-last", action="store_true", help="input and dense conv in channels_last")
    ap.add_argument("--shapes", default=None, help="comma list: only the layers whose name contains one of these")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    old, new = load_old(a.old), ops._C
    if a.isa:
        old.set_isa(a.isa)
        new.set_isa(a.isa)
    print(f"{cpu_model()}, {a.threads} threads, isa {new.active_isa()}; {a.rounds} rounds"
          f"{'; channels_last' if a.channels_last else ''}; {steady_malloc()}\n")
    print("| layer | sparsity | dense µs | old µs | new µs | new/old (median) | η old | η new |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    torch.manual_seed(0)
    try:
        for name, cin, cout, k, s, hw in SHAPES:
            if a.shapes and not any(p in name for p in a.shapes.split(",")):
                continue
            for sparsity in (float(v) for v in a.sparsities.split(",")):
                conv = torch.nn.Conv2d(cin, cout, k, s, k // 2)
                with torch.no_grad():
                    conv.weight.mul_(conv_block_mask(conv.weight, sparsity))
                density = float((conv.weight != 0).float().mean())
                m_new = SparseConv2d.from_dense(conv, format="bsr", block_size=(16, 16)).eval()
                m_old = copy.deepcopy(m_new)
                x = torch.randn(1, cin, hw, hw)
                if a.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                    conv = conv.to(memory_format=torch.channels_last)
                with torch.no_grad():
                    ref = conv(x)
                    for mod, c in ((m_new, new), (m_old, old)):
                        ops._C = c
                        torch.testing.assert_close(mod(x), ref, atol=1e-3, rtol=1e-3)
                    td, to, tn, ratio = [], [], [], []
                    for i in range(a.rounds):
                        # dense before each build's call, the builds' order alternating (a fixed dense, old,
                        # new order ran new on the input and output memory old had just warmed)
                        for mod, c, ts in ((m_old, old, to), (m_new, new, tn)) if i % 2 == 0 else \
                                ((m_new, new, tn), (m_old, old, to)):
                            t = time.perf_counter()
                            conv(x)
                            td.append(time.perf_counter() - t)
                            ops._C = c
                            t = time.perf_counter()
                            mod(x)
                            ts.append(time.perf_counter() - t)
                        ratio.append(to[-1] / tn[-1])
                d, o, n = min(td), min(to), min(tn)
                print(f"| {name} | {sparsity:.0%} | {d * 1e6:.0f} | {o * 1e6:.0f} | {n * 1e6:.0f} | "
                      f"{statistics.median(ratio):.2f} | {d / o * density:.2f} | {d / n * density:.2f} |", flush=True)
    finally:
        ops._C = new


if __name__ == "__main__":
    main()
