"""Per-layer kernel variants (issue #15): the thread split and the X-panel choice can be pinned per layer,
every variant equals the reference, convert() times them on the layer's inputs and pins the fastest, and the
choice travels in saved files as a hint that is dropped on another CPU."""
import importlib

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

import sparseprune as sp
from sparseprune import ops, reference

from helpers import assert_close, block_sparse_weight

cv = importlib.import_module("sparseprune.convert")
cv_decide = importlib.import_module("sparseprune.convert.decide")
cv_cache = importlib.import_module("sparseprune.convert.cache")


@settings(max_examples=40, deadline=None)
@given(kernel=st.sampled_from(list(ops.KERNELS)), threads=st.integers(1, 3), n=st.integers(1, 120),
       k=st.sampled_from([7, 64, 256, 384, 512, 768, 3072]), m=st.integers(1, 100),
       block=st.sampled_from([(16, 16), (8, 8), (4, 4), (1, 1), (16, 1)]), sparsity=st.sampled_from([0.0, 0.6, 0.95]),
       act=st.sampled_from(["none", "relu", "gelu"]))
def test_every_variant_matches_the_reference(kernel, threads, n, k, m, block, sparsity, act):
    lin = nn.Linear(k, m)
    with torch.no_grad():
        lin.weight.copy_(block_sparse_weight(m, k, block, sparsity))
    fmt = "csr" if block == (1, 1) else "bsr"
    layer = sp.SparseLinear.from_dense(lin, format=fmt, block_size=None if fmt == "csr" else block,
                                       num_threads=threads, activation=act)
    layer.kernel = kernel
    layer.validate()
    x = torch.randn(n, k)
    with torch.no_grad():
        # float32 sums of k products against a float64 reference: the error grows like sqrt(k) (k = 3072 once
        # missed 1e-4 by 2.4e-5 on an output near zero)
        tol = 1e-4 * max(1.0, (k / 512) ** 0.5)
        assert_close(layer(x), ops.apply_activation(reference.linear(x, lin.weight, lin.bias), act), rtol=1e-4, atol=tol)


@pytest.mark.parametrize("kernel", list(ops.KERNELS))
@pytest.mark.parametrize("threads", [1, 2])
def test_wide_inputs_in_whole_panels_every_variant(kernel, threads):
    # With K >= 2731 the unpacked variants also step through X 24 rows at a time, as the packed ones do; the
    # loop over one whole panel must run only on packed panels (it once ran on the unpacked variants' null
    # panel pointer: a crash). 24 / 48 rows: whole panels only; 50: and a partial one.
    lin = nn.Linear(3072, 48)
    with torch.no_grad():
        lin.weight.copy_(block_sparse_weight(48, 3072, (16, 16), 0.6))
    layer = sp.SparseLinear.from_dense(lin, format="bsr", block_size=(16, 16), num_threads=threads, activation="relu")
    layer.kernel = kernel
    for n in (24, 48, 50):
        x = torch.randn(n, 3072)
        with torch.no_grad():
            assert_close(layer(x), torch.relu(reference.linear(x, lin.weight, lin.bias)))


@pytest.mark.parametrize("block", [(8, 8), (32, 32)])
@pytest.mark.parametrize("kernel", list(ops.KERNELS))
def test_big_weights_in_passes_of_several_panels(isa, block, kernel):
    # Blocks other than one 16-wide vector tall with a weight over 128K floats keep block rows outside and passes
    # of nc rows (72 for K = 768) inside: each pass's panels are packed right before it (100 rows: 72, then 28)
    lin = nn.Linear(768, 256)
    with torch.no_grad():
        lin.weight.copy_(block_sparse_weight(256, 768, block, 0.2))
    layer = sp.SparseLinear.from_dense(lin, format="bsr", block_size=block, num_threads=2)
    layer.kernel = kernel
    for n in (100, 48):
        x = torch.randn(n, 768)
        with torch.no_grad():
            assert_close(layer(x), reference.linear(x, lin.weight, lin.bias))


def test_bad_kernel_names_are_refused():
    layer = sp.SparseLinear.from_dense(nn.Linear(8, 8), format="csr")
    layer.kernel = "fastest"
    with pytest.raises(ValueError, match="kernel must be one of"):
        layer.validate()


def _model():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 64))
    with torch.no_grad():
        m[0].weight.copy_(block_sparse_weight(256, 256, (16, 16), 0.9))
        m[2].weight.copy_(block_sparse_weight(64, 256, (16, 16), 0.9))
    return m.eval()


def test_convert_pins_the_fastest_variant_and_saves_it_as_a_hint(monkeypatch, tmp_path):
    def fake(fns, *a, **k):  # sparse wins; among kernel variants "rows/direct" is the fastest
        if "auto" in fns:
            return {v: (0.5 if v == "rows/direct" else 1.0) for v in fns}
        return {n: (1.0 if n == "dense" else 0.1) for n in fns}
    monkeypatch.setattr(cv_decide, "time_calls", fake)
    monkeypatch.setattr(cv, "time_calls", fake)
    m, x = _model(), torch.randn(32, 256)
    c = sp.convert(m, x, formats=("bsr",), end_to_end=False, time_budget=2.0)
    assert c[0].kernel == "rows/direct" and c[0].kernel_cpu == cv_cache.timing_machine()
    rows = {r["name"]: r for r in sp.summary(c, print_fn=None)}
    assert rows["0"]["kernel"] == "rows/direct" and "kernel rows/direct" in rows["0"]["reason"]
    with torch.no_grad():
        torch.testing.assert_close(c(x), m(x), rtol=1e-4, atol=1e-5)
    path = tmp_path / "m.sp"
    sp.save(c, path)
    assert sp.load(path, _model())[0].kernel == "rows/direct"  # same CPU: kept
    with monkeypatch.context() as mp:  # the same CPU model under another instruction set (a VM hiding AVX-512)
        mp.setattr(ops, "active_isa", lambda: "some other isa")
        other = sp.load(path, _model())
        assert other[0].kernel == "auto" and other[0].kernel_cpu == ""
    monkeypatch.setattr(cv_cache, "cpu_model", lambda: "Some Other CPU")
    other = sp.load(path, _model())
    assert other[0].kernel == "auto" and other[0].kernel_cpu == ""  # another CPU: back to the heuristics
    with torch.no_grad():
        torch.testing.assert_close(other(x), c(x))


def test_variants_within_noise_keep_the_heuristics(monkeypatch):
    def fake(fns, *a, **k):
        if "auto" in fns:
            return {v: (1.0 if v == "auto" else 0.97) for v in fns}
        return {n: (1.0 if n == "dense" else 0.1) for n in fns}
    monkeypatch.setattr(cv_decide, "time_calls", fake)
    monkeypatch.setattr(cv, "time_calls", fake)
    c = sp.convert(_model(), torch.randn(32, 256), formats=("bsr",), end_to_end=False, time_budget=2.0)
    assert c[0].kernel == "auto" and c[0].kernel_cpu == ""


@pytest.mark.parametrize("n", [128, 136, 49, 200])
@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("block", [(16, 16), (8, 8)])
def test_thread_splits_of_odd_row_counts_match_the_reference(n, threads, block):
    """Rows of X split between 2-3 threads (in whole 24-row panels when packed), block rows split, or
    both: every kernel variant, with row counts that leave a partial panel."""
    torch.manual_seed(n + threads)
    lin = nn.Linear(256, 96)
    with torch.no_grad():
        lin.weight.copy_(block_sparse_weight(96, 256, block, 0.7))
    x = torch.randn(n, 256)
    ref = reference.linear(x, lin.weight, lin.bias)
    layer = sp.SparseLinear.from_dense(lin, format="bsr", block_size=block, num_threads=threads)
    for kernel in ops.KERNELS:
        layer.kernel = kernel
        with torch.no_grad():
            assert_close(layer(x), ref)


# K-chunked X^T family (spmm_simd.h, xt_rows_chunked): used by default when a tile of X^T passes 160 KiB and
# M <= K / 2 (CSR at K = 2,700 and NB = 32 is 338 KiB; 4x4 blocks on AVX2 run NB = 16, 169 KiB); each block
# row then runs once per K chunk with its partial sums kept between chunks.
@pytest.mark.parametrize("block", [(1, 1), (1, 4), (2, 4), (4, 4), (3, 1)])
@pytest.mark.parametrize("n", [45, 128])
@pytest.mark.parametrize("sparsity", [0.0, 0.6, 1.0])
def test_k_chunked_products_match_the_reference(isa, block, n, sparsity):
    torch.manual_seed(n + int(10 * sparsity) + 3 * block[0] + block[1])
    k, m = 2700, 203  # K not a multiple of c = 4 or of a chunk; M not of r
    lin = nn.Linear(k, m)
    with torch.no_grad():
        w = block_sparse_weight(m, k, block, sparsity)
        w[:7] = 0.0  # empty block rows
        lin.weight.copy_(w)
    x = torch.randn(n, k)
    fmt = "csr" if block == (1, 1) else "bsr"
    for act in ("none", "gelu") if sparsity == 0.6 else ("none",):
        ref = ops.apply_activation(reference.linear(x, lin.weight, lin.bias), act)
        for threads in (1, 2):
            layer = sp.SparseLinear.from_dense(lin, format=fmt, block_size=None if fmt == "csr" else block,
                                               num_threads=threads, activation=act)
            for kernel in ops.KERNELS:
                layer.kernel = kernel
                with torch.no_grad():
                    assert_close(layer(x), ref, rtol=1e-4, atol=2e-4)


_CHUNK_CHILD = r"""
import torch, sparseprune as sp
from torch import nn
from sparseprune import ops, reference
torch.manual_seed(0)
for (n, k, m, block) in [(40, 300, 50, (1, 1)), (33, 517, 20, (2, 4)), (64, 129, 129, (4, 4)), (9, 64, 30, (1, 4))]:
    lin = nn.Linear(k, m)
    with torch.no_grad():
        w = lin.weight * (torch.rand(m, k) < 0.4)
        w[3] = 0.0
        lin.weight.copy_(w)
    x = torch.randn(n, k)
    fmt = "csr" if block == (1, 1) else "bsr"
    for act in ("none", "relu"):
        layer = sp.SparseLinear.from_dense(lin, format=fmt, block_size=None if fmt == "csr" else block,
                                           num_threads=2, activation=act)
        for kernel in ops.KERNELS:
            layer.kernel = kernel
            with torch.no_grad():
                torch.testing.assert_close(layer(x), ops.apply_activation(reference.linear(x, lin.weight, lin.bias), act),
                                           rtol=1e-4, atol=2e-4)
print("ok")
"""


@pytest.mark.parametrize("chunk", ["1", "7", "100"])
def test_forced_k_chunks_of_any_width_match_the_reference(chunk):
    """SPARSEPRUNE_XT_CHUNK forces chunks of that many columns of K on every xt-family product (read once
    per process, hence a child process): chunks of one block column, chunks that end inside a block, and
    the last chunk shorter than the rest."""
    import os
    import subprocess
    import sys
    env = dict(os.environ, SPARSEPRUNE_XT_CHUNK=chunk)
    out = subprocess.run([sys.executable, "-c", _CHUNK_CHILD], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


def _conv_model():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(64, 64, 1), nn.ReLU(), nn.Conv2d(64, 32, 3, padding=1))
    with torch.no_grad():
        for conv in (m[0], m[2]):
            mask = block_sparse_weight(conv.out_channels, conv.in_channels, (16, 16), 0.75) != 0
            conv.weight.mul_(mask[:, :, None, None].float())
    return m.eval()


@pytest.mark.parametrize("channels_last", [True, False])
def test_convert_pins_a_variant_for_channels_last_1x1_convs(monkeypatch, tmp_path, channels_last):
    # a 1x1 conv on channels_last inputs runs the Linear kernels: its variants are timed and pinned like a
    # Linear layer's (saved as a hint, dropped on another CPU); NCHW inputs and 3x3 convs keep "auto"
    def fake(fns, *a, **k):
        if "auto" in fns:
            return {v: (0.5 if v == "blocks/direct" else 1.0) for v in fns}
        return {n: (1.0 if n == "dense" else 0.1) for n in fns}
    monkeypatch.setattr(cv_decide, "time_calls", fake)
    monkeypatch.setattr(cv, "time_calls", fake)
    m, x = _conv_model(), torch.randn(2, 64, 10, 9)
    if channels_last:
        m, x = m.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    c = sp.convert(m, x, formats=("bsr",), end_to_end=False, time_budget=2.0)
    assert isinstance(c[0], sp.SparseConv2d) and isinstance(c[2], sp.SparseConv2d)
    assert c[0].kernel == ("blocks/direct" if channels_last else "auto") and c[2].kernel == "auto"
    with torch.no_grad():
        torch.testing.assert_close(c(x), m(x), rtol=1e-4, atol=1e-4)
    path = tmp_path / "m.sp"
    sp.save(c, path)
    assert sp.load(path, _conv_model())[0].kernel == c[0].kernel
    monkeypatch.setattr(cv_cache, "cpu_model", lambda: "Some Other CPU")
    assert sp.load(path, _conv_model())[0].kernel == "auto"


@pytest.mark.parametrize("act", ["none", "relu", "silu"])
@pytest.mark.parametrize("kernel", list(ops.KERNELS))
@pytest.mark.parametrize("n,block,k,m", [(1, (1, 1), 37, 29), (2, (1, 1), 64, 40), (50, (1, 1), 64, 40),
                                         (30, (4, 4), 48, 36), (7, (2, 2), 20, 18), (60, (16, 16), 64, 56),
                                         (25, (8, 8), 40, 27), (130, (16, 1), 33, 48)])
def test_spmm_residual_every_family(isa, kernel, act, n, block, k, m):
    # spmm_eager's residual: added in the broadcast family's store, in a pass after the others (gather for
    # one or two rows of a CSR matrix, X^T tiles for short blocks); a strided residual is copied first
    torch.manual_seed(n + k)
    w = block_sparse_weight(m, k, block, 0.6)
    lin = nn.Linear(k, m)
    with torch.no_grad():
        lin.weight.copy_(w)
    fmt = "csr" if block == (1, 1) else "bsr"
    layer = sp.SparseLinear.from_dense(lin, format=fmt, block_size=None if fmt == "csr" else block)
    x = torch.randn(n, k)
    for res in (torch.randn(n, m), torch.randn(m, n).t()):
        b = layer._buffers
        r, c = layer.block_size
        with torch.no_grad():
            got = ops.spmm_eager(x, b["row_ptr"], b["col_idx"], b["values"], lin.bias, m, k, r, c, 1,
                                 ops.ACTIVATIONS.index(act), kernel, res)
            want = ops.apply_activation(reference.linear(x, lin.weight, lin.bias) + res, act)
        assert_close(got, want)
    with pytest.raises(ValueError, match="residual must be"):
        ops.spmm_eager(x, b["row_ptr"], b["col_idx"], b["values"], lin.bias, m, k, r, c, 1, 0, kernel,
                       torch.randn(n, m + 1))


@pytest.mark.parametrize("kernel", list(ops.KERNELS))
@pytest.mark.parametrize("n", [1, 23, 50])
@pytest.mark.parametrize("k,keep_cols", [(32, 1), (1024, 40)])  # a weight within L1 (panel by panel) or not
@pytest.mark.parametrize("bias", [True, False])
def test_empty_block_rows_with_residual_and_activation(isa, kernel, n, k, keep_cols, bias):
    # block rows without blocks (the first, a middle one and the last, partial one) are act(bias + residual),
    # written without the tiles; the others through them
    m, block = 72, (16, 16)
    torch.manual_seed(n + k)
    keep = torch.zeros(5, k // 16, dtype=torch.bool)
    keep[1, :keep_cols] = True
    keep[3, -keep_cols:] = True
    w = torch.randn(m, k) * keep.repeat_interleave(16, 0)[:m].repeat_interleave(16, 1)
    lin = nn.Linear(k, m, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(w)
    layer = sp.SparseLinear.from_dense(lin, format="bsr", block_size=block)
    assert int((layer.row_ptr.diff() == 0).sum()) == 3
    b = layer._buffers
    x, res = torch.randn(n, k), torch.randn(n, m)
    for act in ("none", "relu", "gelu"):
        for r in (None, res):
            with torch.no_grad():
                got = ops.spmm_eager(x, b["row_ptr"], b["col_idx"], b["values"], lin.bias, m, k, 16, 16, 2,
                                     ops.ACTIVATIONS.index(act), kernel, r)
                want = reference.linear(x, lin.weight, lin.bias)
                want = ops.apply_activation(want if r is None else want + r, act)
            assert_close(got, want)


_NBV_CHILD = r"""
import torch, sparseprune as sp
from torch import nn
from sparseprune import ops, reference
torch.manual_seed(0)
# N with every remainder class of 24- and 32-column tiles (24-column tiles of X^T chosen by themselves on AVX2
# for N = 49 / 196 on two threads and K <= 1024)
for n in (3, 9, 17, 23, 25, 47, 49, 196):
    for k in (37, 256, 900):
        m = 29
        lin = nn.Linear(k, m)
        with torch.no_grad():
            w = lin.weight * (torch.rand(m, k) < 0.3)
            w[5] = 0.0
            lin.weight.copy_(w)
        x = torch.randn(n, k)
        for act in ("none", "gelu"):
            ref = ops.apply_activation(reference.linear(x, lin.weight, lin.bias), act)
            for threads in (1, 2):
                layer = sp.SparseLinear.from_dense(lin, format="csr", num_threads=threads, activation=act)
                for kernel in ops.KERNELS:
                    layer.kernel = kernel
                    with torch.no_grad():
                        torch.testing.assert_close(layer(x), ref, rtol=1e-4, atol=2e-4)
print("ok")
"""


@pytest.mark.parametrize("isa_env", ["", "avx2"])
@pytest.mark.parametrize("nbv", ["", "1", "2", "3", "4"])
def test_xt_tile_widths_match_the_reference(isa_env, nbv):
    """CSR products in X^T tiles of 1 / 2 / 3 / 4 vectors (SPARSEPRUNE_XT_NBV, read once per process: a child
    process each), and the width the kernel picks by itself ("")."""
    import os
    import subprocess
    import sys
    env = {key: v for key, v in os.environ.items() if key not in ("SPARSEPRUNE_XT_NBV", "SPARSEPRUNE_ISA")}
    if nbv:
        env["SPARSEPRUNE_XT_NBV"] = nbv
    if isa_env:
        if isa_env not in [p["isa"] for p in ops.isa_paths()]:
            pytest.skip(f"this CPU cannot run {isa_env}")
        env["SPARSEPRUNE_ISA"] = isa_env
    out = subprocess.run([sys.executable, "-c", _NBV_CHILD], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


@pytest.mark.parametrize("n", [5, 49, 196])
def test_csr_with_int32_column_indices_matches_the_reference(n):
    """K past 32768 columns stores CSR column indices as int32 (the X^T loop then reads them one by one, not
    four in one load as with int16); rows of every length from 0 to ~20 non-zeros."""
    torch.manual_seed(n)
    k, m = 33001, 23
    lin = nn.Linear(k, m)
    with torch.no_grad():
        w = torch.zeros(m, k)
        for i in range(m):
            cols = torch.randperm(k)[: i % 21]
            w[i, cols] = torch.randn(len(cols))
        lin.weight.copy_(w)
    layer = sp.SparseLinear.from_dense(lin, format="csr")
    assert layer.col_idx.dtype == torch.int32
    x = torch.randn(n, k)
    with torch.no_grad():
        assert_close(layer(x), reference.linear(x, lin.weight, lin.bias))


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 260), threads=st.integers(2, 5),
       block=st.sampled_from([(1, 1), (1, 4), (1, 3), (1, 6), (1, 8), (2, 4), (4, 1)]),
       m=st.integers(1, 70), k=st.sampled_from([5, 64, 300]), skew=st.sampled_from(["even", "top", "bottom", "empty"]),
       seed=st.integers(0, 2 ** 16))
def test_xt_thread_shares_inside_tiles_match_the_reference(n, threads, block, m, k, skew, seed):
    """The X^T family split by rows of X (spmm_simd.h, xt_spmm_r) gives each thread an equal share of (tile, block
    row) work: a share may start inside a tile another thread also runs (that thread transposes its own copy).
    1 x c blocks (their own loop: values four at a time, a tail of c % 4, the last block cut by K) included.
    Every kernel variant (the rows ones force the split even with fewer tiles than threads), non-zeros packed into
    the first or last rows (shares end at odd block rows), or no non-zeros at all."""
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(k, m)
    with torch.no_grad():
        w = torch.randn(m, k, generator=g) * (torch.rand(m, k, generator=g) < 0.4)
        if skew == "top":
            w[m // 3:] = 0.0
        elif skew == "bottom":
            w[: (2 * m) // 3] = 0.0
        elif skew == "empty":
            w.zero_()
        lin.weight.copy_(w)
    x = torch.randn(n, k, generator=g)
    ref = reference.linear(x, lin.weight, lin.bias)
    fmt = "csr" if block == (1, 1) else "bsr"
    layer = sp.SparseLinear.from_dense(lin, format=fmt, block_size=None if fmt == "csr" else block,
                                       num_threads=threads)
    for kernel in ops.KERNELS:
        layer.kernel = kernel
        with torch.no_grad():
            assert_close(layer(x), ref)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 2), k=st.integers(1, 90), m=st.integers(1, 40), threads=st.integers(1, 3),
       block=st.sampled_from([(1, 4), (1, 8), (1, 12), (1, 16), (1, 20), (2, 4), (2, 8), (2, 12), (4, 4), (4, 8),
                              (4, 12), (3, 8)]),
       sparsity=st.sampled_from([0.0, 0.5, 0.9, 1.0]), act=st.sampled_from(["none", "relu", "gelu"]),
       bias=st.booleans(), residual=st.booleans(), isa=st.sampled_from(["avx2", "avx512", "best"]),
       seed=st.integers(0, 99))
def test_thin_blocks_on_one_or_two_rows_match_the_reference(n, k, m, threads, block, sparsity, act, bias, residual,
                                                            isa, seed):
    """1 x c, 2 x c and 4 x c blocks (c % 4 == 0) against one or two rows of X (decode): a dot product per output
    over the blocks' contiguous weights (thin_spmm: pairs of 1 x 4 blocks a vector and a remainder, 8-wide pieces
    and a 4-wide one for wider blocks) or 8 / r columns of a column-major block against their x values spread r
    lanes each (thin_cols_spmm: two vectors a step, one left over for 2 x 4 / 2 x 12); the last block column
    partial where K % c != 0 (X is not padded); K and M not multiples of the block, empty rows, bias, activation,
    a residual (added after the kernel's store), 1-3 threads; 3 x 8 (the other families) alongside."""
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(k, m, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(block_sparse_weight(m, k, block, sparsity, generator=g))
    x = torch.randn(n, k, generator=g)
    res = torch.randn(n, m, generator=g) if residual else None
    want = reference.linear(x, lin.weight, lin.bias) + (res if residual else 0)
    want = ops.apply_activation(want, act)
    if isa != "best" and isa not in {p["isa"] for p in ops.isa_paths()}:
        return
    ops.set_isa(isa)
    try:
        layer = sp.SparseLinear.from_dense(lin, format="bsr", block_size=block, num_threads=threads, activation=act)
        p = layer.packed()
        with torch.no_grad():
            y = ops.spmm_eager(x, p.row_ptr, p.col_idx, p.values, lin.bias, m, k, *p.block_size, threads,
                               ops.activation_code(act), residual=res)
    finally:
        ops.set_isa("best")
    assert_close(y, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("block", [(1, 4), (2, 4), (4, 4)])
def test_thin_blocks_never_read_past_the_row_of_x(block):
    """K = 5 in r x 4 blocks: the last block column holds one column of X. Reading the block's 4 values of x
    would take row 1's first three, an infinity there times the zero padding a NaN in row 0's output."""
    lin = nn.Linear(5, 6)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(6, 5))
    layer = sp.SparseLinear.from_dense(lin, format="bsr", block_size=block)
    x = torch.randn(2, 5)
    x[1, :3] = float("inf")
    with torch.no_grad():
        y = layer(x)
    assert y[0].isfinite().all()
    assert_close(y[0], reference.linear(x[:1], lin.weight, lin.bias)[0])
