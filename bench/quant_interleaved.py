"""Quantized block-sparse kernels timed interleaved (issue #14's table): for each shape and sparsity, dense
fp32 ``F.linear``, torch's dynamic int8 Linear, dense bf16 ``F.linear``, and our SparseLinear modules (fp32,
int8, bf16 BSR, 16x16 blocks or ``--block``, on the same weight, built as a user would: ``SparseLinear.from_dense``) take turns;
best single call of many rounds (``bench_quant.py`` times each on its own, which a drifting machine skews).

    python bench/quant_interleaved.py [--rounds 60] [--threads 2] [--out bench/results/quant_interleaved.md]
"""
import argparse
import os
import sys
import warnings

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sparseprune as sp  # noqa: E402
from bench_conv import interleaved_min  # noqa: E402
from bench_quant import SHAPES, _dynamic_int8  # noqa: E402
from conftest import block_sparse, steady_malloc  # noqa: E402
from sparseprune import quant  # noqa: E402
from sparseprune.convert.cache import cpu_model  # noqa: E402

IMPLS = ["dense fp32", "dense int8 (torch dyn)", "dense bf16", "ours fp32", "ours int8", "ours bf16"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sparsities", default="0.5,0.8,0.9")
    ap.add_argument("--shapes", default=",".join(s[0] for s in SHAPES), help="comma list of shape names")
    ap.add_argument("--block", default="16x16", help="block shape r x c of every layer (e.g. 1x4: the X^T tiles)")
    ap.add_argument("--out", help="also write the table (with its header) to this markdown file")
    a = ap.parse_args(argv)
    block = tuple(int(v) for v in a.block.lower().split("x"))
    lines = []

    def emit(line=""):
        print(line, flush=True)
        lines.append(line)

    torch.set_num_threads(a.threads)
    warnings.simplefilter("ignore")
    emit(f"{cpu_model()}, {a.threads} threads, torch {torch.__version__}, int8 path "
          f"{quant.active_qisa(torch.int8)}, bf16 path {quant.active_qisa(torch.bfloat16)}; "
          f"best of {a.rounds} interleaved rounds, BSR {a.block} (every layer with a bias); {steady_malloc()}")
    emit()
    emit("| shape | sparsity | dense fp32 us | dyn int8 ×fp32 | bf16 ×fp32 | ours fp32 ×fp32 | ours int8 ×fp32 "
          "| ours int8 ×dyn int8 | ours bf16 ×dense bf16 | ours int8 ×ours fp32 |")
    emit("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    torch.manual_seed(0)
    for name, n, k, m in (s for s in SHAPES if s[0] in a.shapes.split(",")):
        for s in (float(v) for v in a.sparsities.split(",")):
            w = block_sparse(m, k, block, s)
            x = torch.randn(n, k)
            lin = torch.nn.Linear(k, m)
            with torch.no_grad():
                lin.weight.copy_(w)
            dyn = _dynamic_int8(w)
            xb, wb = x.bfloat16(), w.bfloat16()
            mods = [sp.SparseLinear.from_dense(lin, format="bsr", block_size=block, weight_dtype=dt)
                    for dt in (torch.float32, torch.int8, torch.bfloat16)]
            fns = [lambda: F.linear(x, lin.weight, lin.bias), lambda: dyn(x), lambda: F.linear(xb, wb, lin.bias.bfloat16())]
            fns += [lambda mod=mod: mod(x) for mod in mods]
            t = interleaved_min(fns, rounds=a.rounds, warmup=3, inner=1)
            emit(f"| {name} {n}x{k}->{m} | {s:g} | {t[0] * 1e6:.0f} | {t[0] / t[1]:.2f} | {t[0] / t[2]:.2f} | "
                 f"{t[0] / t[3]:.2f} | {t[0] / t[4]:.2f} | {t[1] / t[4]:.2f} | {t[2] / t[5]:.2f} | {t[3] / t[4]:.2f} |")
    if a.out:
        with open(a.out, "w") as f:
            f.write("# Quantized BSR kernels, interleaved timing\n\nWritten by `python bench/quant_interleaved.py --out "
                    f"{a.out}` (ratios: dense time / ours, same process, the implementations taking turns).\n\n")
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
