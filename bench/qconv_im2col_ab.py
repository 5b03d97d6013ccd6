"""int8 / bf16 SparseConv2d: rows of patches gathered inside the kernel (the default since 2 Dec 2026)
against the materialised im2col matrix (``sparseprune.nn._FUSED_IM2COL = False``), taking turns in one
process with the float32 sparse convolution and dense ``F.conv2d``; outputs checked identical first.

    python bench/qconv_im2col_ab.py [--rounds 21] [--out table.md]
"""
import argparse
import statistics
import time

import torch
from torch import nn

import sparseprune.nn as spnn
from sparseprune import SparseConv2d
from sparseprune.convert.cache import cpu_model

# (cin, cout, kernel, stride, size): the ResNet-50 3x3 shapes, batch 1
SHAPES = [(64, 64, 3, 1, 56), (128, 128, 3, 2, 56), (256, 256, 3, 1, 14), (512, 512, 3, 1, 7)]


def per_call(f, reps):
    t = time.perf_counter()
    for _ in range(reps):
        f()
    return (time.perf_counter() - t) / reps * 1e3


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=21)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--sparsities", default="0.8,0.9")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    lines = [f"{cpu_model()}, {torch.get_num_threads()} threads, torch {torch.__version__}; median of {a.rounds} "
             f"rounds of {a.reps} calls each, all variants taking turns; `old/new` = median of per-round ratios.", "",
             "| dtype | conv | sparsity | materialised ms | gathered ms | old/new | float32 sparse ms | dense ms |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    print("\n".join(lines), flush=True)
    for dt in (torch.int8, torch.bfloat16):
        for cin, cout, k, s, hw in SHAPES:
            for sp_ in (float(v) for v in a.sparsities.split(",")):
                conv = nn.Conv2d(cin, cout, k, s, padding=k // 2)
                keep = (torch.rand(cout // 16, cin // 16) >= sp_).float()
                with torch.no_grad():
                    conv.weight.mul_(keep.repeat_interleave(16, 0).repeat_interleave(16, 1)[:, :, None, None])
                q = SparseConv2d.from_dense(conv, format="bsr", block_size=(16, 16), weight_dtype=dt)
                f32 = SparseConv2d.from_dense(conv, format="bsr", block_size=(16, 16))
                x = torch.randn(1, cin, hw, hw)
                t = {"old": [], "new": [], "f32": [], "dense": []}
                with torch.no_grad():
                    spnn._FUSED_IM2COL = False
                    ref = q(x)
                    spnn._FUSED_IM2COL = True
                    assert torch.equal(q(x), ref), "gathered and materialised im2col disagree"
                    for _ in range(a.rounds):
                        spnn._FUSED_IM2COL = False
                        t["old"].append(per_call(lambda: q(x), a.reps))
                        spnn._FUSED_IM2COL = True
                        t["new"].append(per_call(lambda: q(x), a.reps))
                        t["f32"].append(per_call(lambda: f32(x), a.reps))
                        t["dense"].append(per_call(lambda: conv(x), a.reps))
                med = {key: statistics.median(v) for key, v in t.items()}
                ratio = statistics.median(o / n for o, n in zip(t["old"], t["new"]))
                line = (f"| {str(dt).split('.')[-1]} | {cin}->{cout} {k}x{k}/{s} @{hw} | {sp_:.0%} | {med['old']:.3f} | "
                        f"{med['new']:.3f} | {ratio:.2f}x | {med['f32']:.3f} | {med['dense']:.3f} |")
                lines.append(line)
                print(line, flush=True)
    if a.out:
        with open(a.out, "w") as f:
            f.write("# int8 / bf16 convolutions: gathered vs materialised im2col\n\n"
                    "`python bench/qconv_im2col_ab.py`\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
