"""Quantized BSR kernels (issue #14): int8 agrees bit for bit with the pure-torch reference on every
ISA path, bf16 to fp32 rounding; packing round-trips; validate() rejects every corruption."""
import json
import math
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from sparseprune import ops, quant
from sparseprune.quant import QuantBSRMatrix, qspmm, reference_qspmm

from helpers import block_sparse_weight

pytestmark = pytest.mark.usefixtures("one_thread")

DTYPES = {"int8": torch.int8, "bf16": torch.bfloat16}
QPATHS = [(p["dtype"], p["isa"]) for p in quant.qisa_paths(supported_only=False)]
BLOCKS = {"int8": [(16, 16), (16, 4), (4, 4), (1, 4), (8, 8), (32, 16)],
          "bf16": [(16, 16), (16, 4), (4, 4), (1, 4), (1, 2), (8, 8)]}


@pytest.fixture(params=QPATHS, ids=[f"{d}-{i}" for d, i in QPATHS])
def qpath(request):
    """(dtype, isa): every quantized kernel path in ukernels.inc, forced; skipped where the CPU lacks it."""
    kind, isa = request.param
    supported = {(p["dtype"], p["isa"]) for p in quant.qisa_paths()}
    if (kind, isa) not in supported:
        pytest.skip(f"this CPU cannot run {kind} {isa}")
    ops.set_isa(isa)
    assert quant.active_qisa(DTYPES[kind]) == isa
    yield DTYPES[kind]
    ops.set_isa("best")


def _check(y, ref, dtype):
    if dtype == torch.int8:
        assert torch.equal(y, ref), f"max diff {(y - ref).abs().max().item()}"
    else:
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5 * (1 + (ref.abs().max().item() if ref.numel() else 0)))


def _run(x, p, bias=None, **kw):
    with torch.no_grad():
        return qspmm(x, p, bias, **kw)


# (M, K, N, sparsity): odd sizes, M / K not multiples of the block, decode N = 1, N = 0, empty rows; N = 40 and 64:
# 24-row panels and a 16-row one (each run through one loop over the block rows, q_panel)
CASES = [(64, 64, 24, 0.5), (37, 50, 30, 0.5), (33, 21, 1, 0.3), (19, 13, 2, 0.0), (70, 90, 53, 0.8),
         (48, 40, 0, 0.5), (40, 36, 5, 1.0), (5, 8, 26, 0.0), (64, 96, 40, 0.5), (48, 64, 64, 0.8)]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "M{}K{}N{}s{}".format(*c))
@pytest.mark.parametrize("bias", [False, True])
def test_paths_match_reference(qpath, case, bias):
    dtype = qpath
    m, k, n, s = case
    g = torch.Generator().manual_seed(m * 1000 + k)
    for block in BLOCKS["int8" if dtype == torch.int8 else "bf16"][:4]:
        w = block_sparse_weight(m, k, block, s, generator=g)
        p = QuantBSRMatrix.from_dense(w, block, dtype)
        x = torch.randn(n, k, generator=g) * 3
        b = torch.randn(m, generator=g) if bias else None
        _check(_run(x, p, b), reference_qspmm(x, p, b), dtype)


def test_large_tiles_and_panels(qpath):
    """Enough rows for full register tiles, several panels and both threads; 16-bit and 32-bit indices."""
    dtype = qpath
    g = torch.Generator().manual_seed(1)
    w = block_sparse_weight(96, 200, (16, 16), 0.6, generator=g)
    x = torch.randn(77, 200, generator=g)
    b = torch.randn(96, generator=g)
    p = QuantBSRMatrix.from_dense(w, (16, 16), dtype)
    ref = reference_qspmm(x, p, b)
    for nt in (1, 2):
        _check(_run(x, p, b, num_threads=nt), ref, dtype)
    p32 = QuantBSRMatrix(p.shape, p.block_size, dtype, p.row_ptr, p.col_idx.int(), p.values, p.scales, p.compensation)
    _check(_run(x, p32, b), ref, dtype)
    # every row count that selects a tile written in assembly (qspmm_simd.h, q_asm_tile): a 16-row panel
    # (n = 16: 16- and 8-row tiles there), and 24-row panels ending in 16 or 8 rows
    for n in (16, 32, 40, 48):
        _check(_run(x[:n], p, b), reference_qspmm(x[:n], p, b), dtype)
    # blocks taller than the 16-wide register tile (the assembly tiles take 16 x 16 blocks only)
    for block in [(32, 16), (16, 16)] if dtype == torch.int8 else [(16, 16)]:
        p = QuantBSRMatrix.from_dense(block_sparse_weight(64, 96, block, 0.5, generator=g), block, dtype)
        _check(_run(x[:, :96].contiguous(), p, b[:64]), reference_qspmm(x[:, :96], p, b[:64]), dtype)


def test_all_zero_and_dense_blocks(qpath):
    dtype = qpath
    w = torch.zeros(32, 48)
    w[:16, 16:32] = 1e-30  # a stored block that quantizes to zeros (int8) / denormals (bf16)
    w[16:, :] = torch.randn(16, 48)
    p = QuantBSRMatrix.from_dense(w, (16, 16), dtype)
    x = torch.randn(9, 48)
    x[3] = 0  # an all-zero row of X: scale 1, zero point 0
    x[4] = 5.0  # a constant row: zero point 0
    x[5] = -2.0  # a negative constant row: zero point 127
    _check(_run(x, p), reference_qspmm(x, p), dtype)


def test_extreme_products_do_not_saturate(qpath):
    """The largest int8 pair sums the kernels meet: activations at the top of their 7-bit range (127) and
    at the zero point's far end, weights at +-127 in every lane, 24-row panels of 16x16 blocks (the
    compile-time tile) and odd shapes. vpmaddubsw (AVX2) saturates pair sums at +-32767: with 7-bit
    activations the largest is 2 * 127 * 127, so every path must still agree bit for bit."""
    if qpath != torch.int8:
        pytest.skip("int8 only")
    for m, k, n in ((32, 64, 48), (48, 80, 25), (16, 20, 3)):
        w = torch.full((m, k), 1.0)
        w[1::2] = -1.0  # every row quantizes to +127 or -127 everywhere
        w[:, 16:32] = 0.0  # and one empty block column
        p = QuantBSRMatrix.from_dense(w, (16, 16), torch.int8)
        x = torch.full((n, k), 3.0)  # positive rows: q = 127 everywhere (zero point 0)
        x[1::3] = -3.0  # negative rows: zero point 127, q = 0
        x[2::3, ::2] = -3.0  # mixed rows: q alternates 0 and 127
        y = _run(x, p)
        _check(y, reference_qspmm(x, p), torch.int8)
        one_sign = torch.arange(n) % 3 != 2  # rows of one sign are on the quantization grid: exact
        assert torch.allclose(y[one_sign], (x @ w.T)[one_sign], rtol=1e-5, atol=1e-3)


def test_rows_with_nan_or_inf_give_nan_rows(qpath):
    """int8: a NaN or infinity anywhere in a row of X (first, inside, and last lane of every min / max
    chain, and the scalar tail) makes that output row NaN, as a dense float matmul would, not a finite
    number from the rest of the row. bf16: NaN / inf reach the outputs their column touches, as in the
    float reference. Other rows are untouched."""
    dtype = qpath
    g = torch.Generator().manual_seed(3)
    k = 16 * 4 * 3 + 8 + 3  # full 64-wide chains, an 8-wide step and a scalar tail
    w = block_sparse_weight(40, k, (16, 4), 0.5, generator=g)
    p = QuantBSRMatrix.from_dense(w, (16, 4), dtype)
    x = torch.randn(12, k, generator=g)
    bad = {1: (0, float("nan")), 3: (15, float("nan")), 4: (63, float("inf")), 6: (127, float("-inf")),
           7: (k - 1, float("nan")), 9: (k - 4, float("inf")), 10: (16 * 4 * 3 + 2, float("nan"))}
    for row, (col, v) in bad.items():
        x[row, col] = v
    y = _run(x, p)
    ref = reference_qspmm(x, p)
    rows = torch.tensor(sorted(bad))
    if dtype == torch.int8:
        assert torch.isnan(y[rows]).all() and torch.isnan(ref[rows]).all()
    else:  # every output whose weight on the bad column is nonzero is NaN / inf
        for row, (col, _) in bad.items():
            assert not torch.isfinite(y[row, w[:, col] != 0]).any()
    keep = torch.tensor([i for i in range(12) if i not in bad])
    assert torch.isfinite(y[keep]).all()
    _check(y[keep], ref[keep], dtype)


@settings(max_examples=12, deadline=None)
@given(m=st.integers(1, 40), k=st.integers(1, 70), n=st.integers(0, 30), s=st.sampled_from([0.0, 0.5, 0.9]),
       kind=st.sampled_from(["int8", "bf16"]), bi=st.integers(0, 3), seed=st.integers(0, 2**16))
def test_property_best_path(m, k, n, s, kind, bi, seed):
    dtype = DTYPES[kind]
    block = BLOCKS[kind][bi]
    g = torch.Generator().manual_seed(seed)
    w = block_sparse_weight(m, k, block, s, generator=g)
    p = QuantBSRMatrix.from_dense(w, block, dtype)
    x = torch.randn(n, k, generator=g)
    b = torch.randn(m, generator=g)
    _check(_run(x, p, b), reference_qspmm(x, p, b), dtype)
    if dtype == torch.bfloat16:  # bf16 input (odd K included) is packed as is: same result as rounding first
        xb = x.bfloat16()
        torch.testing.assert_close(_run(xb, p, b).float(), reference_qspmm(xb.float(), p, b), rtol=8e-3, atol=1e-3)
    # pack -> unpack is exact on the stored values
    assert torch.equal(QuantBSRMatrix.from_dense(p.to_dense(), block, dtype).int_repr(), p.int_repr())


def test_accuracy_against_float():
    """Quantization error is that of per-channel int8 / bf16, not worse."""
    g = torch.Generator().manual_seed(2)
    w = block_sparse_weight(128, 256, (16, 16), 0.5, generator=g)
    x = torch.randn(32, 256, generator=g)
    exact = x.double() @ w.double().T
    for dtype, tol in ((torch.int8, 0.03), (torch.bfloat16, 0.01)):
        y = _run(x, QuantBSRMatrix.from_dense(w, (16, 16), dtype))
        rel = ((y.double() - exact).norm() / exact.norm()).item()
        assert rel < tol, (dtype, rel)


def test_pack_roundtrip_and_container():
    g = torch.Generator().manual_seed(3)
    w = block_sparse_weight(37, 52, (16, 4), 0.5, generator=g)
    p = QuantBSRMatrix.from_dense(w, (16, 4), torch.int8)
    assert p.tensor_names == ("row_ptr", "col_idx", "values", "scales", "compensation")
    assert p.values.shape == (p.nnz_blocks, 1, 16, 4) and p.values.dtype == torch.int8
    assert p.nbytes == sum(t.numel() * t.element_size() for t in p.tensors())
    assert torch.equal(p.compensation, p.int_repr().sum(1, dtype=torch.int32))
    err = (p.to_dense() - w).abs()
    assert bool((err <= p.scales[:, None] / 2 + 1e-6).all())
    assert bool(((p.to_dense() != 0) <= (w != 0)).all())
    pb = QuantBSRMatrix.from_dense(w, (16, 4), torch.bfloat16)
    assert pb.tensor_names == ("row_ptr", "col_idx", "values")
    assert torch.equal(pb.to_dense(), w.bfloat16().float())
    q = QuantBSRMatrix.from_tensors(p.shape, p.block_size, torch.int8, dict(zip(p.tensor_names, p.tensors())))
    assert torch.equal(q.to_dense(), p.to_dense())
    assert "int8" in repr(p)


def test_input_dtypes_and_shapes():
    g = torch.Generator().manual_seed(4)
    w = block_sparse_weight(24, 32, (8, 8), 0.5, generator=g)
    x = torch.randn(2, 5, 32, generator=g)
    for dtype in DTYPES.values():
        p = QuantBSRMatrix.from_dense(w, (8, 8), dtype)
        y = _run(x, p)
        assert y.shape == (2, 5, 24) and y.dtype == torch.float32
        _check(y, reference_qspmm(x, p), dtype)
        yb = _run(x.bfloat16(), p)
        assert yb.dtype == torch.bfloat16
        if dtype == torch.bfloat16:  # bf16 input is used as is
            torch.testing.assert_close(yb.float(), reference_qspmm(x.bfloat16().float(), p), rtol=1e-2, atol=1e-2)
        # non-contiguous input
        xt = torch.randn(32, 7, generator=g).T
        _check(_run(xt, p), reference_qspmm(xt.contiguous(), p), dtype)


def test_zero_inner_dimension():
    for dtype in DTYPES.values():
        p = QuantBSRMatrix.from_dense(torch.zeros(5, 0), (1, 4), dtype)
        b = torch.randn(5)
        assert torch.equal(_run(torch.randn(3, 0), p, b), b.expand(3, 5))


def test_errors():
    w = torch.randn(16, 16)
    for block in [(16, 3), (16, 2), (4, 1), (1, 6)]:
        with pytest.raises(ValueError, match="multiples of 4"):
            QuantBSRMatrix.from_dense(w, block, torch.int8)
    for block in [(4, 1), (16, 3)]:
        with pytest.raises(ValueError, match="multiples of 2"):
            QuantBSRMatrix.from_dense(w, block, torch.bfloat16)
    with pytest.raises(TypeError):
        QuantBSRMatrix.from_dense(w, (16, 16), torch.float16)
    p = QuantBSRMatrix.from_dense(w, (16, 16), torch.int8)
    with pytest.raises(ValueError, match="features"):
        _run(torch.randn(3, 15), p)
    with pytest.raises(TypeError):
        _run(torch.randn(3, 16).double(), p)
    with pytest.raises(ValueError, match="bias"):
        _run(torch.randn(3, 16), p, torch.randn(15))
    with pytest.raises(TypeError):
        qspmm(torch.randn(3, 16), w)
    x = torch.randn(3, 16, requires_grad=True)
    with pytest.raises(RuntimeError, match="inference-only"):
        qspmm(x, p)


CORRUPTIONS = {
    "col_idx out of range": "p.col_idx[-1] = 99",
    "col_idx unsorted": "p.col_idx[0], p.col_idx[1] = int(p.col_idx[1]), int(p.col_idx[0])",
    "col_idx negative int32": "p.col_idx = p.col_idx.int(); p.col_idx[0] = -1",
    "row_ptr too short": "p.row_ptr = p.row_ptr[:-1].clone()",
    "row_ptr decreasing": "p.row_ptr[1] = int(p.row_ptr[2]) + 1",
    "row_ptr end": "p.row_ptr[-1] = 10**6",
    "row_ptr start": "p.row_ptr[0] = 1",
    "row_ptr dtype": "p.row_ptr = p.row_ptr.long()",
    "values short": "p.values = p.values[:-1].clone()",
    "values dtype": "p.values = p.values.float()",
    "values layout": "p.values = p.values.reshape(p.values.shape[0], -1).contiguous()",
    "values non-contiguous": "p.values = p.values.transpose(1, 2)",
    "scales missing": "p.scales = None",
    "scales short": "p.scales = p.scales[:-1].clone()",
    "scales negative": "p.scales[0] = -1.0",
    "scales nan": "p.scales[0] = float('nan')",
    "scales dtype": "p.scales = p.scales.double()",
    "compensation wrong": "p.compensation[0] += 1",
    "compensation dtype": "p.compensation = p.compensation.long()",
    "col_idx 2-D": "p.col_idx = p.col_idx.reshape(1, -1)",
    "block width": "p.block_size = (16, 6)",
    "shape grows": "p.shape = (p.shape[0] + 40, p.shape[1])",
    "bf16 values in int8": "p.values = p.values.to(torch.bfloat16)",
    "not a tensor": "p.col_idx = p.col_idx.tolist()",
}


def test_corrupted_arrays_rejected_in_subprocess():
    """validate() must catch every corruption; a miss would hand bad arrays to the kernel, so the cases
    run (validate, then the kernel) in a child process: a crash fails this test instead of the run."""
    script = textwrap.dedent(f"""
        import json, torch
        from sparseprune.quant import QuantBSRMatrix, qspmm
        cases = {json.dumps(CORRUPTIONS)}
        out = {{}}
        for name, code in cases.items():
            g = torch.Generator().manual_seed(0)
            w = torch.randn(40, 70, generator=g)
            w[:, 16:32] = 0
            p = QuantBSRMatrix.from_dense(w, (16, 16), torch.int8)
            try:
                exec(code)
                p.validate()
                with torch.no_grad():
                    qspmm(torch.randn(3, 70), p)
                out[name] = "accepted"
            except (ValueError, TypeError) as e:
                out[name] = "rejected: " + str(e)[:80]
        print(json.dumps(out))
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    accepted = [k for k, v in out.items() if not v.startswith("rejected")]
    assert not accepted, accepted


def test_bf16_corruptions():
    w = torch.randn(20, 24)
    p = QuantBSRMatrix.from_dense(w, (4, 4), torch.bfloat16)
    p.scales = torch.ones(20)
    with pytest.raises(ValueError, match="no scales"):
        p.validate()


def test_opcheck():
    g = torch.Generator().manual_seed(5)
    w = block_sparse_weight(40, 36, (16, 4), 0.5, generator=g)
    for dtype in DTYPES.values():
        p = QuantBSRMatrix.from_dense(w, (16, 4), dtype)
        for x, b in ((torch.randn(7, 36, generator=g), torch.randn(40, generator=g)), (torch.randn(1, 36), None)):
            args = (x, p.row_ptr, p.col_idx, p.values, p.scales, p.compensation, b, 40, 36, 16, 4, 1)
            torch.library.opcheck(torch.ops.sparseprune.qspmm.default, args)


def test_paths_listed():
    kinds = {(p["dtype"], p["isa"]) for p in quant.qisa_paths(supported_only=False)}
    assert ("int8", "scalar") in kinds and ("bf16", "scalar") in kinds
    names = " ".join(p["kernels"] for p in quant.qisa_paths(supported_only=False))
    assert "s8_bsr_spmm" in names and "bf16_bsr_spmm" in names
    from sparseprune.info import info_lines
    text = "\n".join(info_lines())
    assert "s8_bsr_spmm" in text and "bf16_bsr_spmm" in text


@settings(max_examples=30, deadline=None)
@given(threads=st.integers(2, 4), n=st.integers(20, 150), k=st.integers(4, 200), m=st.integers(1, 200),
       sparsity=st.sampled_from([0.3, 0.8, 0.97]), s8=st.booleans())
def test_thread_splits_match_reference(threads, n, k, m, sparsity, s8):
    """Rows of X split between threads (each quantizes and packs its own panels) or block rows split
    (shared panels), chosen by the sizes of W and X: int8 stays bit-exact, bf16 within rounding."""
    dtype = torch.int8 if s8 else torch.bfloat16
    g = torch.Generator().manual_seed(n * 7 + k)
    w = block_sparse_weight(m, k, (16, 16), sparsity, generator=g)
    p = QuantBSRMatrix.from_dense(w, (16, 16), dtype)
    x = torch.randn(n, k, generator=g) * 2
    b = torch.randn(m, generator=g)
    _check(_run(x, p, b, num_threads=threads), reference_qspmm(x, p, b), dtype)


@pytest.mark.parametrize("n", [128, 136, 49, 200])
@pytest.mark.parametrize("threads", [2, 3])
def test_row_splits_in_chunks_of_8_are_exact(qpath, n, threads):
    """Rows of X split between threads in chunks of 8 (128 rows: 64 / 64, not 72 / 56 in whole 24-row
    panels), each thread quantizing into panels of its own that start at its first row."""
    dtype = qpath
    g = torch.Generator().manual_seed(n * 3 + threads)
    # W small next to X (split by rows), and enough work that even n = 49 gets every thread (threads_for)
    w = block_sparse_weight(128, 320, (16, 16), 0.7, generator=g)
    p = QuantBSRMatrix.from_dense(w, (16, 16), dtype)
    x = torch.randn(n, 320, generator=g) * 2
    b = torch.randn(128, generator=g)
    _check(_run(x, p, b, num_threads=threads), reference_qspmm(x, p, b), dtype)


@pytest.mark.parametrize("n", [1, 5, 8, 16, 17, 24])
@pytest.mark.parametrize("threads", [2, 3])
def test_decode_batches_split_k_groups_between_threads(qpath, n, threads):
    """At most 24 rows (one shared panel, decode batches): the threads split the panel's k-groups in whole
    64-byte lines, each finding the range of every row itself; K not a multiple of the block (a partial
    last word), a row with an infinity (NaN output row), bf16 input used as is."""
    dtype = qpath
    g = torch.Generator().manual_seed(n * 5 + threads)
    # enough blocks that one row of X gets every thread (threads_for)
    w = block_sparse_weight(1024, 1030, (16, 16), 0.3, generator=g)
    p = QuantBSRMatrix.from_dense(w, (16, 16), dtype)
    x = torch.randn(n, 1030, generator=g) * 2
    if n >= 5:
        x[3, 700] = float("inf")
    b = torch.randn(1024, generator=g)
    y = _run(x, p, b, num_threads=threads)
    ref = reference_qspmm(x, p, b)
    if n >= 5:
        if dtype == torch.int8:  # the row's scale is NaN (bf16 multiplies the infinity through: inf or NaN)
            assert y[3].isnan().all() and ref[3].isnan().all()
        keep = torch.arange(n) != 3
        y, ref = y[keep], ref[keep]
    _check(y, ref, dtype)
    if dtype == torch.bfloat16:
        xb = torch.randn(n, 1030, generator=g).bfloat16()
        torch.testing.assert_close(_run(xb, p, b, num_threads=threads).float(),
                                   reference_qspmm(xb.float(), p, b), rtol=1e-2, atol=1e-2)


def _unfold_rows(xh, ks, stride, dil, pad4):
    """Independent im2col: torch's unfold on the zero-padded NCHW image, columns in (kh, kw, C) order."""
    import torch.nn.functional as F
    pt, pb, pl, pr = pad4
    x = F.pad(xh.permute(0, 3, 1, 2), (pl, pr, pt, pb))
    cols = F.unfold(x, ks, dilation=dil, stride=stride)
    n, kk, L = cols.shape
    c = xh.shape[3]
    return cols.reshape(n, c, kk // c, L).permute(0, 3, 2, 1).reshape(n * L, kk)


# the fixture forces one ISA for the whole test: every example runs under it
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(c=st.sampled_from([4, 8, 12, 20]), m=st.integers(1, 40), ks=st.tuples(st.integers(1, 3), st.integers(1, 3)),
       stride=st.tuples(st.integers(1, 2), st.integers(1, 2)), dil=st.tuples(st.integers(1, 2), st.integers(1, 2)),
       pad4=st.tuples(*[st.integers(0, 2)] * 4), hw=st.tuples(st.integers(1, 8), st.integers(1, 8)),
       n=st.integers(1, 2), sparsity=st.sampled_from([0.0, 0.6, 1.0]), seed=st.integers(0, 999))
def test_implicit_im2col_matches_unfold(qpath, c, m, ks, stride, dil, pad4, hw, n, sparsity, seed):
    """qconv_im2col_eager (rows of patches gathered inside the kernel, zero padding implied, any side)
    against torch's unfold + the quantizing reference, on every quantized path."""
    dtype = qpath
    (kh, kw), (pt, pb, pl, pr) = ks, pad4
    ho = (hw[0] + pt + pb - dil[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (hw[1] + pl + pr - dil[1] * (kw - 1) - 1) // stride[1] + 1
    if ho < 1 or wo < 1:
        return
    g = torch.Generator().manual_seed(seed)
    w = block_sparse_weight(m, kh * kw * c, (4, 4), sparsity, generator=g)
    p = QuantBSRMatrix.from_dense(w, (4, 4), dtype)
    xh = torch.randn(n, hw[0], hw[1], c, generator=g) * 3
    b = torch.randn(m, generator=g)
    for xd in [torch.float32] + ([torch.bfloat16] if dtype == torch.bfloat16 else []):  # bf16 images too
        x = xh.to(xd)
        y = quant.qconv_im2col_eager(x, ks, stride, dil, pad4, p.row_ptr, p.col_idx, p.values,
                                     getattr(p, "scales", None), getattr(p, "compensation", None), b, m, 4, 4, 2)
        _check(y, reference_qspmm(_unfold_rows(x, ks, stride, dil, pad4), p, b), dtype)


def test_implicit_im2col_refuses_bad_geometry():
    from sparseprune import _C
    p = QuantBSRMatrix.from_dense(torch.randn(8, 36), (4, 4), torch.int8)
    xh = torch.randn(1, 5, 5, 4)
    y = torch.empty(25, 8)

    def call(h=5, w=5, ch=4, kh=3, kw=3, pads=(1, 1, 1, 1), cols=36):
        _C.qspmm_im2col("int8", 8, cols, 4, 4, p.row_ptr.data_ptr(), p.col_idx.data_ptr(),
                        p.col_idx.dtype == torch.int16, p.values.data_ptr(), p.scales.data_ptr(),
                        p.compensation.data_ptr(), xh.data_ptr(), False, 1, h, w, ch, kh, kw, 1, 1, 1, 1, *pads, 0,
                        y.data_ptr(), 8, 1, 0)
    call()  # the valid call works
    with pytest.raises(ValueError, match="kh \\* kw \\* channels"):
        call(cols=32)
    with pytest.raises(ValueError, match="smaller than the dilated kernel"):
        call(h=1, pads=(0, 0, 1, 1))
    with pytest.raises(ValueError, match="geometry"):
        call(pads=(-1, 1, 1, 1))
    with pytest.raises(ValueError, match="geometry"):
        call(ch=0, cols=0)
    with pytest.raises(ValueError, match="float32"):  # int8 quantizes float32 images only
        quant.qconv_im2col_eager(xh.bfloat16(), (3, 3), (1, 1), (1, 1), (1, 1, 1, 1), p.row_ptr, p.col_idx,
                                 p.values, p.scales, p.compensation, None, 8, 4, 4, 1)
    with pytest.raises(ValueError, match="int8 takes float32"):
        _C.qspmm_im2col("int8", 8, 36, 4, 4, p.row_ptr.data_ptr(), p.col_idx.data_ptr(),
                        p.col_idx.dtype == torch.int16, p.values.data_ptr(), p.scales.data_ptr(),
                        p.compensation.data_ptr(), xh.data_ptr(), True, 1, 5, 5, 4, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, 0,
                        y.data_ptr(), 8, 1, 0)
    with pytest.raises(ValueError, match="contiguous"):
        quant.qconv_im2col_eager(xh.transpose(1, 2), (3, 3), (1, 1), (1, 1), (1, 1, 1, 1), p.row_ptr, p.col_idx,
                                 p.values, p.scales, p.compensation, None, 8, 4, 4, 1)


@pytest.mark.parametrize("case", CASES + [(64, 96, 130, 0.7)], ids=lambda c: "M{}K{}N{}s{}".format(*c))
@pytest.mark.parametrize("act", ["none", "relu", "gelu"])
def test_residual_in_the_store(qpath, case, act):
    # qspmm_eager(residual=R): act(X W^T + b + R) with R added in the kernel's store (full tiles, row tails and
    # column tails; a strided R is copied first): int8 bit for bit with the reference plus R (the same float
    # operations in the same order), bf16 to rounding; the activation as the kernel computes it elsewhere
    dtype = qpath
    m, k, n, s = case
    g = torch.Generator().manual_seed(m * 7 + n)
    for block in BLOCKS["int8" if dtype == torch.int8 else "bf16"][:4]:
        w = block_sparse_weight(m, k, block, s, generator=g)
        p = QuantBSRMatrix.from_dense(w, block, dtype)
        x, b = torch.randn(n, k, generator=g) * 3, torch.randn(m, generator=g)
        code = ops.ACTIVATIONS.index(act)
        for res in (torch.randn(n, m, generator=g), torch.randn(m, n, generator=g).t()):
            args = (x, p.row_ptr, p.col_idx, p.values, p.scales, p.compensation, b, m, k, *block, 1)
            with torch.no_grad():
                got = quant.qspmm_eager(*args, code, residual=res)
                unfused = quant.qspmm_eager(*args, 0)  # the kernel's own activation applied to (y + R) ...
                want = reference_qspmm(x, p, b) + res
            _check(unfused + res, want, dtype)
            if act == "gelu":  # ... by the kernel: its rational erf, not torch's
                torch.testing.assert_close(got, ops.apply_activation(want, act), rtol=1e-5, atol=1e-5)
            else:
                _check(got, ops.apply_activation(want, act), dtype)
    with pytest.raises(ValueError, match="residual must be"):
        quant.qspmm_eager(*args, 0, residual=torch.randn(n, m + 1))


def _planes_reference(x, p, b, ks=(1, 1), dil=(1, 1), pad_tl=(0, 0), res=None, act="none", stride=(1, 1)):
    """The row product on the implicit im2col rows of an NCHW image (torch's unfold; the bottom / right zero
    padding, or cropping, that makes the output the input's size over the stride; reference_qspmm), back in
    NCHW planes."""
    n, c, h, w = x.shape
    (kh, kw), (dh, dw), (pt, pl), (sh, sw) = ks, dil, pad_tl, stride
    ho, wo = h // sh, w // sw
    pad4 = (pt, (ho - 1) * sh + dh * (kh - 1) + 1 - h - pt, pl, (wo - 1) * sw + dw * (kw - 1) + 1 - w - pl)
    y = reference_qspmm(_unfold_rows(x.permute(0, 2, 3, 1), ks, stride, dil, pad4), p, b)
    y = y.reshape(n, ho, wo, -1).permute(0, 3, 1, 2)
    if res is not None:
        y = y + res
    return ops.apply_activation(y, act)


# the fixture forces one ISA for the whole test: every example runs under it
@settings(max_examples=16, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(c=st.integers(1, 40), m=st.integers(1, 50), hw=st.tuples(st.integers(1, 13), st.integers(1, 13)),
       n=st.integers(1, 3), ks=st.sampled_from([(1, 1), (3, 3), (1, 3), (5, 2)]), dil=st.sampled_from([(1, 1), (2, 1)]),
       stride=st.sampled_from([(1, 1), (1, 1), (2, 2), (1, 2), (3, 2)]), pad=st.integers(0, 8),
       block=st.sampled_from([(16, 16), (16, 4), (4, 4), (16, 8), (1, 4), (8, 4), (3, 4)]),
       sparsity=st.sampled_from([0.0, 0.6, 1.0]),
       act=st.sampled_from(["none", "relu", "silu"]), res=st.booleans(), threads=st.integers(1, 3),
       seed=st.integers(0, 999))
def test_planes_match_reference(qpath, c, m, hw, n, ks, dil, stride, pad, block, sparsity, act, res, threads, seed):
    """qconv_planes_eager (a convolution whose output is the input's size over the stride, read from and
    written to NCHW planes: the planes kernels (16-pixel panels of 16-row blocks on the AVX-512 VNNI / BF16
    paths, 8-pixel panels of any block height on every x86 path), NHWC rows and transposes on the scalar path) against the quantizing reference on torch's unfold: 1x1 and larger kernels (taps as
    shifted planes, of their stride phase), strides 1-3, top / left padding up to the kernel's reach,
    dilation, partial 16-pixel panels, several images, channels not a multiple of the word, the residual and
    activation in the store, 1-3 threads. int8 bit for bit, bf16 to rounding."""
    dtype = qpath
    (kh, kw), (dh, dw), (sh, sw) = ks, dil, stride
    pt, pl = pad % (dh * (kh - 1) + 1), pad % (dw * (kw - 1) + 1)
    size = (hw[0] * sh, hw[1] * sw)
    cols = kh * kw * c
    if dtype == torch.bfloat16 and cols % 2 and block[1] % 2:
        return
    g = torch.Generator().manual_seed(seed)
    w = block_sparse_weight(m, cols, block, sparsity, generator=g)
    p = QuantBSRMatrix.from_dense(w, block, dtype)
    x = torch.randn(n, c, *size, generator=g) * 3
    b = torch.randn(m, generator=g)
    r = torch.randn(n, m, *hw, generator=g) if res else None
    code = ops.ACTIVATIONS.index(act)
    with torch.no_grad():
        y = quant.qconv_planes_eager(x, ks, stride, dil, (pt, pl), p.row_ptr, p.col_idx, p.values,
                                     getattr(p, "scales", None), getattr(p, "compensation", None), b, m, *block,
                                     threads, code, r)
    assert y.shape == (n, m, *hw) and y.is_contiguous()
    want = _planes_reference(x, p, b, ks, dil, (pt, pl), r, act, stride)
    if act == "silu":  # the kernel's own exp, not torch's
        torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    else:
        _check(y, want, dtype)


@pytest.mark.parametrize("ks,stride", [((1, 1), 1), ((3, 3), 1), ((3, 3), 2), ((1, 1), 2)])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_planes_large_maps_and_bad_pixels(qpath, ks, stride, threads):
    """Maps of many 16-pixel panels (groups of 8 packed together, split between threads mid-image), two
    images, a block row without blocks, stride 1 and 2 (the phases); a pixel with a NaN or infinity in one
    channel gives NaN (int8: the scale of every output pixel whose patch holds it is NaN), the others are
    untouched."""
    dtype = qpath
    g = torch.Generator().manual_seed(threads)
    kk = ks[0] * ks[1]
    w = block_sparse_weight(48, 64 * kk, (16, 16), 0.5, generator=g)
    w[16:32] = 0  # a block row without blocks: bias only
    p = QuantBSRMatrix.from_dense(w, (16, 16), dtype)
    size = (23, 19) if stride == 1 else (24, 20)
    x = torch.randn(2, 64, *size, generator=g) * 2
    x[1, 50, 8, 4] = float("nan")
    x[0, 3, size[0] - 1, size[1] - 1] = float("inf")
    b = torch.randn(48, generator=g)
    pad = (ks[0] // 2, ks[1] // 2)
    with torch.no_grad():
        y = quant.qconv_planes_eager(x, ks, (stride, stride), (1, 1), pad, p.row_ptr, p.col_idx, p.values,
                                     getattr(p, "scales", None), getattr(p, "compensation", None), b, 48, 16, 16,
                                     threads)
    want = _planes_reference(x, p, b, ks, (1, 1), pad, stride=(stride, stride))
    bad = torch.nn.functional.max_pool2d(x.isnan().any(1, keepdim=True).float() + x.isinf().any(1, keepdim=True).float(),
                                         ks, stride, pad)[:, 0] > 0  # output pixels whose patch holds a NaN / inf
    assert bad.shape == y.shape[:1] + y.shape[2:] and bad.any()
    if dtype == torch.int8:
        assert y.permute(1, 0, 2, 3)[:, bad].isnan().all()
    keep = ~bad.unsqueeze(1).expand_as(y)
    _check(y[keep], want[keep], dtype)


def test_planes_module_route_matches_channels_last():
    """SparseConv2d (int8 / bf16) on an NCHW input takes the planes kernel for stride-1 size-keeping convs
    (1x1, 3x3 padding 1); its output equals the channels_last route (the Linear kernel over pixel rows, or
    the implicit im2col): int8 bit for bit, bf16 to rounding; the fused residual too. A strided 1x1 (its
    kept pixels), strided, unpadded and reflect-padded 3x3s (the transposing route) agree as well."""
    import sparseprune as sp
    g = torch.Generator().manual_seed(11)
    cl = torch.channels_last
    x = torch.randn(2, 24, 9, 7, generator=g)
    res = torch.randn(2, 40, 9, 7, generator=g)
    for ks, pad in (((1, 1), 0), ((3, 3), 1)):
        conv = torch.nn.Conv2d(24, 40, ks, padding=pad)
        cols = 24 * ks[0] * ks[1]
        with torch.no_grad():  # blocks over the packed (Cout, kh, kw, Cin) matrix
            w = block_sparse_weight(40, cols, (16, 8), 0.5, generator=g)
            conv.weight.copy_(w.view(40, ks[0], ks[1], 24).permute(0, 3, 1, 2))
        for dtype in DTYPES.values():
            mod = sp.SparseConv2d.from_dense(conv, format="bsr", block_size=(16, 8), weight_dtype=dtype)
            with torch.no_grad():
                y, ycl = mod(x), mod(x.contiguous(memory_format=cl))
                z = mod.forward_residual(x, res, "relu")
                zcl = mod.forward_residual(x.contiguous(memory_format=cl), res.contiguous(memory_format=cl), "relu")
                ref = conv(x)
            assert y.is_contiguous() and z.is_contiguous()
            _check(y, ycl.contiguous(), dtype)
            _check(z, zcl.contiguous(), dtype)
            torch.testing.assert_close(y, ref, rtol=0.05, atol=0.05 * ref.abs().max().item())
    x = torch.randn(2, 24, 10, 8, generator=g)  # even: stride 2 keeps the phases whole
    c1 = torch.nn.Conv2d(24, 40, 1, stride=2)  # reads one phase
    with torch.no_grad():
        c1.weight.copy_(block_sparse_weight(40, 24, (16, 8), 0.5, generator=g).view(40, 24, 1, 1))
    for dtype in DTYPES.values():
        mod = sp.SparseConv2d.from_dense(c1, format="bsr", block_size=(16, 8), weight_dtype=dtype)
        with torch.no_grad():
            _check(mod(x), mod(x.contiguous(memory_format=cl)).contiguous(), dtype)
    for kw in ({"stride": 2, "padding": 1}, {"stride": 2}, {"padding": 0}, {"padding": 1, "padding_mode": "reflect"}):
        c2 = torch.nn.Conv2d(24, 40, 3, **kw)
        with torch.no_grad():
            c2.weight.copy_(conv.weight)
        mod = sp.SparseConv2d.from_dense(c2, format="bsr", block_size=(16, 8), weight_dtype=torch.int8)
        with torch.no_grad():
            _check(mod(x), mod(x.contiguous(memory_format=cl)).contiguous(), torch.int8)
            torch.testing.assert_close(mod(x), c2(x), rtol=0.05, atol=0.05 * c2(x).abs().max().item())


def test_planes_errors():
    from sparseprune import _C
    p = QuantBSRMatrix.from_dense(torch.randn(8, 12), (4, 4), torch.int8)
    x = torch.randn(1, 12, 3, 3)
    args = ((1, 1), (1, 1), (1, 1), (0, 0), p.row_ptr, p.col_idx, p.values, p.scales, p.compensation, None, 8, 4, 4, 1)
    with pytest.raises(ValueError, match="contiguous"):
        quant.qconv_planes_eager(x.transpose(2, 3), *args)
    with pytest.raises(ValueError, match="contiguous"):
        quant.qconv_planes_eager(x.double(), *args)
    with pytest.raises(ValueError, match="residual"):
        quant.qconv_planes_eager(x, *args, residual=torch.randn(1, 9, 3, 3))
    with pytest.raises(ValueError, match="multiple of the stride"):
        quant.qconv_planes_eager(x, (1, 1), (2, 2), *args[2:])
    y = torch.empty(1, 8, 3, 3)

    def call(n_img=1, h=3, cols=12, kh=1, pt=0, sh=1, x_ptr=None):
        x_ptr = x.data_ptr() if x_ptr is None else x_ptr
        _C.qspmm_planes_res("int8", 8, cols, 4, 4, p.row_ptr.data_ptr(), p.col_idx.data_ptr(),
                            p.col_idx.dtype == torch.int16, p.values.data_ptr(), p.scales.data_ptr(),
                            p.compensation.data_ptr(), x_ptr, n_img, h, 3, kh, 1, 1, 1, pt, 0, sh, 1, 0, y.data_ptr(), 1,
                            0, 0)
    call()
    for bad in ({"h": -1}, {"cols": 0}, {"kh": 0}, {"kh": 5}, {"pt": 1}, {"kh": 3, "pt": 3}, {"n_img": -1}, {"sh": 0},
                {"sh": 17}):
        with pytest.raises(ValueError, match="geometry"):
            call(**bad)
    with pytest.raises(ValueError, match="null"):
        call(x_ptr=0)
    with pytest.raises(ValueError, match="multiple of 4"):
        _C.qspmm_planes_res("int8", 8, 12, 4, 6, p.row_ptr.data_ptr(), p.col_idx.data_ptr(), False,
                            p.values.data_ptr(), p.scales.data_ptr(), p.compensation.data_ptr(), x.data_ptr(), 1, 3,
                            3, 1, 1, 1, 1, 0, 0, 1, 1, 0, y.data_ptr(), 1, 0, 0)


def test_planes_repeat_calls_keep_their_kernel_arguments():
    """A stride-1 int8 / bf16 conv on the planes route keeps its kernel arguments for the next call of the same
    input shape (SparseConv2d._cache_qplanes, as SparseLinear's QCall): repeat calls, forward_residual, a new
    shape, a changed activation or thread setting, a replaced or edited bias, and calls the plan must not take
    (gradients, other layouts) all give the general route's result."""
    import sparseprune as sp
    g = torch.Generator().manual_seed(21)
    conv = torch.nn.Conv2d(32, 48, 3, padding=1)
    with torch.no_grad():
        conv.weight.copy_(block_sparse_weight(48, 288, (16, 16), 0.5, generator=g).view(48, 3, 3, 32).permute(0, 3, 1, 2))
    x = torch.randn(2, 32, 9, 11, generator=g)
    res = torch.randn(2, 48, 9, 11, generator=g)

    def general(mod, inp, residual=None, act="none"):
        """The binding with all its arguments (not a kept plan): the module's arrays and settings as they are."""
        b = mod._buffers
        code = ops.ACTIVATIONS.index(act if residual is not None else mod.activation)
        with torch.no_grad():
            return quant.qconv_planes_eager(inp, mod.kernel_size, mod.stride, mod.dilation, (1, 1), b["row_ptr"],
                                            b["col_idx"], b["values"], b.get("scales"), b.get("compensation"),
                                            mod.bias, mod.out_channels, 16, 16, mod.num_threads or 2, code, residual)

    for dtype in DTYPES.values():
        mod = sp.SparseConv2d.from_dense(conv, format="bsr", block_size=(16, 16), weight_dtype=dtype)
        with torch.no_grad():
            first = mod(x)
            assert "_cache_qplanes" in mod.__dict__
            assert torch.equal(mod(x), first) and torch.equal(first, general(mod, x))
            x2 = torch.randn(1, 32, 5, 6, generator=g)  # another shape: the general route, a new plan
            assert torch.equal(mod(x2), general(mod, x2))
            assert torch.equal(mod(x2), general(mod, x2))
            z = mod.forward_residual(x, res, "relu")  # another activation code than the plan's
            assert torch.equal(z, general(mod, x, res, "relu"))
            assert torch.equal(mod.forward_residual(x, res, "relu"), z)  # now the plan's
            mod.activation = "relu"
            assert torch.equal(mod(x), general(mod, x)) and bool((mod(x) >= 0).all())
            mod.activation = "none"
            mod.num_threads = 3
            assert torch.equal(mod(x), general(mod, x))
            mod.bias.add_(1.0)  # edited in place: read at call time
            assert torch.equal(mod(x), general(mod, x))
            torch.testing.assert_close(mod(x), first + 1.0, rtol=1e-5, atol=1e-4)
            mod.bias = torch.nn.Parameter(torch.zeros(48))  # replaced: another address, the plan is rebuilt
            assert torch.equal(mod(x), general(mod, x))
            _check(mod(x.contiguous(memory_format=torch.channels_last)).contiguous(), mod(x), dtype)  # not the plan's
        xg = x.clone().requires_grad_()
        with pytest.raises(RuntimeError, match="inference-only"):
            mod(xg)


@pytest.mark.parametrize("setting", ["0", "1"])
def test_planes_tests_with_the_planes_kernels_forced_on_and_off(setting):
    """Small maps (under 100 pixels) take the rows route on paths whose planes kernels have 8-pixel panels, so
    the planes tests above would seldom reach those kernels' partial panels and edge masks: run them again in a
    child process with SPARSEPRUNE_PLANES=1 (every map through the planes kernels) and =0 (none)."""
    import os
    env = dict(os.environ, SPARSEPRUNE_PLANES=setting)
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__, "-k",
                          "planes and not forced"], env=env, capture_output=True, text=True, timeout=900,
                         cwd=os.path.dirname(os.path.abspath(__file__)))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert " passed" in out.stdout
