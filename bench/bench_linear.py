"""Kernel-level SpMM benchmarks at real-model shapes: dense F.linear, torch CSR, scipy CSR and our
CSR / BSR kernels in one group per (shape, sparsity)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import sparseprune as sp
from conftest import block_sparse, measure

# (name, rows N, in K, out M)
SHAPES = [
    ("bert_ffn_up", 128, 768, 3072),
    ("bert_ffn_down", 128, 3072, 768),
    ("bert_attn", 128, 768, 768),
    ("minilm_up", 128, 384, 1536),
    ("minilm_down", 128, 1536, 384),
    ("resnet50_1x1", 196, 256, 1024),
    ("llm_decode_n1", 1, 4096, 4096),
    ("llm_decode_n16", 16, 4096, 4096),
]
SPARSITIES = [0.5, 0.8, 0.9, 0.95]
IMPLS = ["dense", "torch_csr", "scipy_csr", "ours_csr", "ours_bsr16"]
QUICK_SHAPES = {"bert_ffn_up", "llm_decode_n1"}


def _layer(w, fmt, block=None):
    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
    with torch.no_grad():
        lin.weight.copy_(w)
    return sp.SparseLinear.from_dense(lin, format=fmt, block_size=block)


@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("shape", SHAPES, ids=[s[0] for s in SHAPES])
@pytest.mark.parametrize("impl", IMPLS)  # dense first: the others report their ratio to it
def test_spmm(benchmark, impl, shape, sparsity, quick):
    name, n, k, m = shape
    if quick and (name not in QUICK_SHAPES or sparsity != 0.9):
        pytest.skip("--quick")
    x = torch.randn(n, k)
    flops = 2.0 * n * k * m
    group = f"{name} {n}x{k}->{m} s={sparsity}"
    if impl == "ours_bsr16":
        w = block_sparse(m, k, (16, 16), sparsity)
    else:
        w = block_sparse(m, k, (1, 1), sparsity) if impl != "dense" else torch.randn(m, k)
    density = float((w != 0).float().mean()) if impl != "dense" else 1.0
    info = dict(shape=name, n=n, k=k, m=m, sparsity=sparsity)
    if impl == "dense":
        fn = lambda: F.linear(x, w)  # noqa: E731
        info.update(format="dense", block=None)
    elif impl == "torch_csr":
        wc = w.to_sparse_csr()
        xt = x.t().contiguous()
        fn = lambda: torch.mm(wc, xt)  # noqa: E731  (Y^T = W X^T: torch's MKL CSR path)
        info.update(format="csr", block=None)
    elif impl == "scipy_csr":
        import scipy.sparse
        ws = scipy.sparse.csr_matrix(w.numpy())
        xn = np.ascontiguousarray(x.numpy().T)
        fn = lambda: ws @ xn  # noqa: E731  (single-threaded)
        info.update(format="csr", block=None)
    elif impl == "ours_csr":
        layer = _layer(w, "csr")
        fn = lambda: layer(x)  # noqa: E731
        info.update(format="csr", block=None)
    else:
        layer = _layer(w, "bsr", (16, 16))
        fn = lambda: layer(x)  # noqa: E731
        info.update(format="bsr", block="16x16")
    with torch.no_grad():
        measure(benchmark, fn, group=group, impl=impl, dense_flops=flops, density=density, quick=quick, **info)


BLOCKS = [(4, 4), (8, 8), (16, 16), (32, 32), (1, 8), (8, 1)]


@pytest.mark.parametrize("sparsity", [0.5, 0.8, 0.9])
@pytest.mark.parametrize("block", [None] + BLOCKS, ids=lambda b: "dense" if b is None else f"{b[0]}x{b[1]}")
def test_block_shapes(benchmark, block, sparsity, quick):
    """Which block shape runs best: BERT FFN up-projection, 128 rows."""
    if quick and (sparsity != 0.9 or block not in (None, (16, 16))):
        pytest.skip("--quick")
    n, k, m = 128, 768, 3072
    x = torch.randn(n, k)
    group = f"blocks bert_ffn_up {n}x{k}->{m} s={sparsity}"
    info = dict(shape="bert_ffn_up", n=n, k=k, m=m, sparsity=sparsity)
    if block is None:
        w = torch.randn(m, k)
        fn = lambda: F.linear(x, w)  # noqa: E731
        impl, density = "dense", 1.0
        info.update(format="dense", block=None)
    else:
        w = block_sparse(m, k, block, sparsity)
        layer = _layer(w, "bsr", block)
        fn = lambda: layer(x)  # noqa: E731
        impl, density = f"ours_bsr{block[0]}x{block[1]}", float((w != 0).float().mean())
        info.update(format="bsr", block=f"{block[0]}x{block[1]}")
    with torch.no_grad():
        measure(benchmark, fn, group=group, impl=impl, dense_flops=2.0 * n * k * m, density=density, quick=quick, **info)
