"""Quantized block-sparse kernels (issue #14) against dense PyTorch in the same dtype.

One group per (shape, sparsity): dense fp32 F.linear (the group's baseline), dense bf16 F.linear,
torch dynamic int8 Linear (quantize_dynamic: fbgemm, per-call activation quantization), our fp32
BSR (SparseLinear), our int8 BSR and our bf16 BSR (quant.qspmm) — all on the same 16x16-block-sparse
weight, same process, same thread count. extra_info carries the ratios to every dense baseline; a
table of them is printed at the end of the module (run with -s to see it).
"""
import warnings

import pytest
import torch
import torch.nn.functional as F

import sparseprune as sp
from conftest import block_sparse, cpu_model, measure
from sparseprune import quant

# (name, rows N, in K, out M)
SHAPES = [
    ("bert_ffn_up", 128, 768, 3072),
    ("bert_ffn_down", 128, 3072, 768),
    ("bert_attn", 128, 768, 768),
    ("llm_decode_n1", 1, 4096, 4096),
    ("llm_decode_n16", 16, 4096, 4096),
]
SPARSITIES = [0.5, 0.8, 0.9]
# dense baselines first: the others report their ratios to them
IMPLS = ["dense", "dense_bf16", "dense_int8", "ours_bsr_fp32", "ours_bsr_int8", "ours_bsr_bf16"]
QUICK = {("bert_ffn_up", 0.9), ("llm_decode_n1", 0.9)}
BLOCK = (16, 16)

_MED = {}  # group -> impl -> median seconds
_ROWS = []  # (group, impl, ratios) for the summary table


def _dynamic_int8(w):
    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
    with torch.no_grad():
        lin.weight.copy_(w)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(lin), {torch.nn.Linear}, dtype=torch.qint8)


def _fn(impl, x, w):
    if impl == "dense":
        return lambda: F.linear(x, w)
    if impl == "dense_bf16":
        xb, wb = x.bfloat16(), w.bfloat16()
        return lambda: F.linear(xb, wb)
    if impl == "dense_int8":
        q = _dynamic_int8(w)
        return lambda: q(x)
    if impl == "ours_bsr_fp32":
        lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
        with torch.no_grad():
            lin.weight.copy_(w)
        layer = sp.SparseLinear.from_dense(lin, format="bsr", block_size=BLOCK)
        return lambda: layer(x)
    dtype = torch.int8 if impl == "ours_bsr_int8" else torch.bfloat16
    packed = quant.QuantBSRMatrix.from_dense(w, BLOCK, dtype)
    return lambda: quant.qspmm(x, packed)


@pytest.fixture(scope="module", autouse=True)
def _summary():
    yield
    if not _ROWS:
        return
    print(f"\n\nquantized BSR {BLOCK[0]}x{BLOCK[1]}, {torch.get_num_threads()} threads, {cpu_model()}")
    print(f"{'group':<42} {'impl':<14} {'us':>8} {'vs fp32':>8} {'vs bf16':>8} {'vs int8':>8} {'vs bsr32':>8}")
    for group, impl, us, r in _ROWS:
        cells = " ".join(f"{r.get(k, float('nan')):8.2f}" for k in ("dense", "dense_bf16", "dense_int8", "ours_bsr_fp32"))
        print(f"{group:<42} {impl:<14} {us:8.1f} {cells}")


@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("shape", SHAPES, ids=[s[0] for s in SHAPES])
@pytest.mark.parametrize("impl", IMPLS)
def test_qspmm(benchmark, impl, shape, sparsity, quick):
    name, n, k, m = shape
    if quick and (name, sparsity) not in QUICK:
        pytest.skip("--quick")
    w = block_sparse(m, k, BLOCK, sparsity)
    x = torch.randn(n, k)
    group = f"quant {name} {n}x{k}->{m} s={sparsity}"
    density = 1.0 if impl.startswith("dense") else float(quant.QuantBSRMatrix.from_dense(w, BLOCK, torch.bfloat16).density)
    info = dict(shape=name, n=n, k=k, m=m, sparsity=sparsity, block="16x16",
                format="dense" if impl.startswith("dense") else "bsr",
                dtype={"dense": "fp32", "ours_bsr_fp32": "fp32", "dense_bf16": "bf16", "ours_bsr_bf16": "bf16"}.get(impl, "int8"))
    if impl.endswith("int8"):
        info["isa"] = quant.active_qisa(torch.int8)
    elif impl.endswith("bf16"):
        info["isa"] = quant.active_qisa(torch.bfloat16)
    with torch.no_grad():
        fn = _fn(impl, x, w)
        med = measure(benchmark, fn, group=group, impl=impl, dense_flops=2.0 * n * k * m, density=density,
                      quick=quick, **info)
    meds = _MED.setdefault(group, {})
    meds[impl] = med
    ratios = {base: meds[base] / med for base in ("dense", "dense_bf16", "dense_int8", "ours_bsr_fp32") if base in meds}
    benchmark.extra_info.update({f"speedup_vs_{b}": v for b, v in ratios.items()})
    _ROWS.append((group, impl, med * 1e6, ratios))
