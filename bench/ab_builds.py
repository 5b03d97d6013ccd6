"""Two builds of the BSR / CSR kernels (float32, or int8 / bf16 with ``--dtype``) in one process, taking turns with dense ``F.linear``: the way to see a
5-20% kernel change on a noisy machine, where separate runs drift by more than that. The installed
``sparseprune._C`` is "new"; ``--old`` is the ``_C`` shared object of another build, e.g.

    git worktree add /tmp/oldsrc <commit>
    pip install --no-build-isolation --no-deps --target /tmp/oldpkg /tmp/oldsrc -Cbuild-dir=/tmp/oldbuild
    python bench/ab_builds.py --old /tmp/oldpkg/sparseprune/_C.*.so [--rounds 41] [--out table.md]
    python bench/ab_builds.py --old ... --dtype int8 --blocks 16x16 --sparsities 0.5,0.8,0.9

Both builds get the same packed arrays (the packing is Python, shared) and pointers; each result is checked
against dense PyTorch before timing (int8 / bf16: the two builds must agree bit for bit, and both within
quantization error of dense PyTorch on the dequantized weight). ``new/old`` is the median over rounds of old time / new time (each call right after a dense one); η is
speedup over dense x density, from the best call of each.
"""
import argparse
import glob
import importlib.machinery
import importlib.util
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

import sparseprune as sp
from sparseprune import _C as new_c
from sparseprune.convert.cache import cpu_model

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import steady_malloc  # noqa: E402

SHAPES = {"bert_ffn_down": (128, 3072, 768), "minilm_down": (128, 1536, 384), "bert_ffn_up": (128, 768, 3072),
          "bert_attn": (128, 768, 768), "resnet50_1x1": (196, 256, 1024), "llm_decode_n16": (16, 4096, 4096),
          "llm_decode_n1": (1, 4096, 4096), "bert_ffn_up_13rows": (13, 768, 3072),
          "minilm_up_2k": (2048, 384, 1536), "minilm_down_2k": (2048, 1536, 384)}
DEFAULT_SHAPES = "bert_ffn_down,minilm_down,bert_ffn_up,bert_attn,resnet50_1x1,llm_decode_n16"


def load_old(path: str):
    paths = glob.glob(path)
    if len(paths) != 1:
        raise SystemExit(f"--old must name one shared object, got {paths or path}")
    loader = importlib.machinery.ExtensionFileLoader("sparseprune_old._C", paths[0])
    spec = importlib.util.spec_from_loader("sparseprune_old._C", loader)
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    return mod


def layer(k: int, m: int, sparsity: float, block, dtype=torch.float32):
    lin = nn.Linear(k, m)
    with torch.no_grad():
        r, c = block
        keep = torch.rand((m + r - 1) // r, (k + c - 1) // c) >= sparsity
        lin.weight.mul_(keep.repeat_interleave(r, 0).repeat_interleave(c, 1)[:m, :k].float())
    fmt = "csr" if block == (1, 1) else "bsr"
    return lin, sp.SparseLinear.from_dense(lin, format=fmt, block_size=None if fmt == "csr" else block,
                                           weight_dtype=dtype)


def kernel_args(L, x, y, threads):
    """The arguments of ``_C.spmm`` (float32) or ``_C.qspmm`` (int8 / bf16) for layer L on x into y."""
    b = L._buffers
    ci = b["col_idx"]
    r, c = L.block_size
    n, k = x.shape
    m = y.shape[1]
    ptrs = (b["row_ptr"].data_ptr(), ci.data_ptr(), ci.dtype == torch.int16, b["values"].data_ptr())
    if L.weight_dtype == "float32":
        return "spmm", (m, k, r, c, *ptrs, x.data_ptr(), n, k, L.bias.data_ptr(), y.data_ptr(), m, threads, 0, 0, 0)
    s8 = L.weight_dtype == "int8"
    return "qspmm", ("int8" if s8 else "bf16", m, k, r, c, *ptrs, b["scales"].data_ptr() if s8 else 0,
                     b["compensation"].data_ptr() if s8 else 0, x.data_ptr(), False, n, k, L.bias.data_ptr(),
                     y.data_ptr(), m, threads, 0)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--old", required=True, help="path (or glob) of the other build's _C shared object, or 'self' "
                    "(the installed build twice: η of one build; pybind11 cannot load the same build's types twice)")
    ap.add_argument("--rounds", type=int, default=41)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--shapes", default=DEFAULT_SHAPES, help=f"comma list of: {', '.join(SHAPES)}")
    ap.add_argument("--blocks", default="1x1,4x4", help="comma list of RxC (1x1 = CSR)")
    ap.add_argument("--sparsities", default="0.8,0.9")
    ap.add_argument("--between", choices=("dense", "none"), default="dense",
                    help="dense: a dense call before each build's call (caches as in a model); none: the builds "
                         "back to back (warm caches: the kernel's own speed)")
    ap.add_argument("--dtype", choices=("float32", "int8", "bfloat16"), default="float32", help="weight dtype")
    ap.add_argument("--out", default=None, help="also write the table to this Markdown file")
    a = ap.parse_args(argv)
    old_c = new_c if a.old == "self" else load_old(a.old)
    torch.manual_seed(0)
    torch.set_num_threads(a.threads)
    dtype = getattr(torch, a.dtype)
    lines = [f"CPU: {cpu_model()}, {a.threads} threads, torch {torch.__version__}, {a.dtype} weights; best of {a.rounds} interleaved "
             f"rounds (dense before each build's call, the builds' order alternating); {steady_malloc()}", "",
             "| shape | N×K→M | block | sparsity | dense ms | old ms | new ms | new/old speed | η old | η new |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    for name in a.shapes.split(","):
        n, k, m = SHAPES[name]
        for blk in a.blocks.split(","):
            block = tuple(int(v) for v in blk.split("x"))
            for s in (float(v) for v in a.sparsities.split(",")):
                lin, L = layer(k, m, s, block, dtype)
                x, y = torch.randn(n, k), torch.empty(n, m)
                fn, args = kernel_args(L, x, y, a.threads)
                ref = F.linear(x, lin.weight, lin.bias)
                outs = []
                for mod in (new_c, old_c):
                    getattr(mod, fn)(*args)
                    outs.append(y.clone())
                if dtype == torch.float32:
                    for out in outs:
                        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-3)
                else:
                    if not torch.equal(outs[0], outs[1]):
                        raise SystemExit(f"{name} {blk} {s}: the builds differ by {(outs[0] - outs[1]).abs().max():.3g}")
                    with torch.no_grad():
                        deq = F.linear(x, L.to_dense(), lin.bias)
                        err = float((outs[0] - deq).norm() / deq.norm())
                    if err > 0.03:
                        raise SystemExit(f"{name} {blk} {s}: relative error {err:.3g} to dense on the dequantized weight")
                old_f, new_f = getattr(old_c, fn), getattr(new_c, fn)
                fns = {"dense": lambda: F.linear(x, lin.weight, lin.bias), "old": lambda: old_f(*args),
                       "new": lambda: new_f(*args)}
                ts = {key: [] for key in fns}
                with torch.inference_mode():
                    for f in fns.values():
                        for _ in range(5):
                            f()
                    for i in range(a.rounds):
                        # dense before each build's call, the builds' order alternating: each then starts from
                        # the same caches (a call right after the other build's ran on warm X, Y and W: comparing
                        # one build with itself, the old order read 1.06-1.32x)
                        order = ("old", "new") if i % 2 == 0 else ("new", "old")
                        # back to back: o n | n o | o n ... each build follows itself and the other equally often
                        for key in ("dense", order[0], "dense", order[1]) if a.between == "dense" else order:
                            t = time.perf_counter()
                            fns[key]()
                            ts[key].append(time.perf_counter() - t)
                    for _ in range(a.rounds if a.between == "none" else 0):  # dense on its own, for η
                        t = time.perf_counter()
                        fns["dense"]()
                        ts["dense"].append(time.perf_counter() - t)
                d = 1.0 - s
                gain = statistics.median(o / nw for o, nw in zip(ts["old"], ts["new"]))
                dm, om, nm = (min(ts[key]) * 1e3 for key in ("dense", "old", "new"))
                row = (f"| {name} | {n}×{k}→{m} | {'CSR' if block == (1, 1) else blk} | {s:.2f} | {dm:.3f} | {om:.3f} | "
                       f"{nm:.3f} | {gain:.2f}× | {dm / om * d:.2f} | {dm / nm * d:.2f} |")
                lines.append(row)
                print(row, flush=True)
    if a.out:
        with open(a.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
