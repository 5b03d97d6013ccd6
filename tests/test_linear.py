import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import sparseprune as sp
from sparseprune import reference
from helpers import assert_close, block_sparse_weight

BLOCKS = [(1, 1), (1, 8), (8, 1), (2, 2), (3, 5), (4, 4), (8, 8), (12, 20), (16, 16), (16, 4), (32, 32)]
NS = [0, 1, 3, 64, 257]
SPARSITIES = [0.0, 0.5, 0.9, 0.99, 1.0]


def make_layer(m, k, block, sparsity, bias=True):
    lin = torch.nn.Linear(k, m, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(block_sparse_weight(m, k, block, sparsity))
    fmt = "csr" if block == (1, 1) else "bsr"
    return lin, sp.SparseLinear.from_dense(lin, format=fmt, block_size=None if fmt == "csr" else block)


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_matches_dense_linear_all_paths(isa, block, sparsity):
    lin, sl = make_layer(97, 131, block, sparsity)
    for n in NS:
        x = torch.randn(n, 131)
        assert_close(sl(x), reference.linear(x, lin.weight, lin.bias))


@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("bias", [True, False])
def test_ns_and_bias(isa, n, bias):
    for block in [(1, 1), (16, 16), (4, 4)]:
        lin, sl = make_layer(200, 300, block, 0.8, bias=bias)
        x = torch.randn(n, 300)
        assert_close(sl(x), reference.linear(x, lin.weight, lin.bias))


@given(m=st.integers(1, 90), k=st.integers(1, 90), n=st.integers(0, 70), r=st.integers(1, 33),
       c=st.integers(1, 33), sparsity=st.sampled_from([0.0, 0.3, 0.8, 0.95, 1.0]),
       isa=st.sampled_from([p["isa"] for p in sp.ops.isa_paths()]), seed=st.integers(0, 2**16))
def test_property_kernels_match_reference(m, k, n, r, c, sparsity, isa, seed):
    g = torch.Generator().manual_seed(seed)
    w = block_sparse_weight(m, k, (r, c), sparsity, g)
    lin = torch.nn.Linear(k, m)
    with torch.no_grad():
        lin.weight.copy_(w)
    sl = sp.SparseLinear.from_dense(lin, format="bsr", block_size=(r, c))
    x = torch.randn(n, k, generator=g)
    sp.ops.set_isa(isa)
    try:
        out = sl(x)
    finally:
        sp.ops.set_isa("best")
    # independent reference: rebuild W element by element from the packed arrays
    ref = reference.spmm(x, sl.row_ptr, sl.col_idx, sl.values, sl.bias, m, k, r, c)
    assert_close(out, ref)
    assert_close(out, reference.linear(x, w, lin.bias))


def test_input_layouts(isa):
    lin, sl = make_layer(48, 40, (8, 8), 0.5)
    x3 = torch.randn(2, 5, 40)
    assert_close(sl(x3), reference.linear(x3, lin.weight, lin.bias))
    x1 = torch.randn(40)
    assert sl(x1).shape == (48,)
    assert_close(sl(x1), reference.linear(x1, lin.weight, lin.bias))
    xt = torch.randn(40, 7).t()  # non-contiguous
    assert_close(sl(xt), reference.linear(xt, lin.weight, lin.bias))
    xs = torch.randn(7, 80)[:, ::2]  # strided columns
    assert_close(sl(xs), reference.linear(xs, lin.weight, lin.bias))
    xr = torch.randn(9, 60)[:, :40]  # row stride larger than K
    assert_close(sl(xr), reference.linear(xr, lin.weight, lin.bias))


def test_output_fully_written_poisoned():
    # outputs are allocated by torch.empty; make sure every element is written even with empty rows
    lin, sl = make_layer(100, 64, (16, 16), 0.99)
    for _ in range(3):
        torch.full((4096,), float("nan")).sum()  # dirty the allocator
        x = torch.randn(33, 64)
        out = sl(x)
        assert torch.isfinite(out).all()
        assert_close(out, reference.linear(x, lin.weight, lin.bias))


def test_memory_is_packed_weight_only():
    lin, sl = make_layer(3072, 768, (16, 16), 0.9)
    held = sum(b.numel() * b.element_size() for b in sl.buffers())
    assert held < 0.2 * lin.weight.numel() * 4
    assert "format=bsr" in repr(sl) and "block_size=(16, 16)" in repr(sl) and "density=" in repr(sl)


def test_formats_auto_and_dense():
    lin, _ = make_layer(64, 64, (16, 16), 0.75)
    auto = sp.SparseLinear.from_dense(lin, format="auto")
    assert auto.format == "bsr" and auto.block_size == (16, 16)
    dense = sp.SparseLinear.from_dense(lin, format="dense")
    x = torch.randn(5, 64)
    assert_close(auto(x), F.linear(x, lin.weight, lin.bias))
    assert_close(dense(x), F.linear(x, lin.weight, lin.bias))
    unstructured = torch.nn.Linear(64, 64)
    with torch.no_grad():
        unstructured.weight.mul_(torch.rand(64, 64) > 0.9)
    assert sp.SparseLinear.from_dense(unstructured).format == "csr"
    assert sp.SparseLinear.from_dense(torch.nn.Linear(64, 64)).format == "dense"


def test_to_dense_and_to_linear_round_trip():
    lin, sl = make_layer(33, 47, (4, 4), 0.7)
    assert torch.equal(sl.to_dense(), lin.weight.detach())
    back = sl.to_linear()
    assert torch.equal(back.weight, lin.weight.detach())


@pytest.mark.parametrize("block", [(1, 1), (16, 16), (3, 5)])
def test_gradient_wrt_input(isa, block):
    lin, sl = make_layer(37, 29, block, 0.6)
    x = torch.randn(11, 29, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    g = torch.randn(11, 37)
    (sl(x) * g).sum().backward()
    (F.linear(x2, lin.weight.detach(), lin.bias.detach()) * g).sum().backward()
    assert_close(x.grad, x2.grad)
    assert_close(sl.bias.grad, g.sum(0))


def test_gradcheck_double_reference():
    # gradcheck needs float64; check our backward against finite differences of the reference
    lin, sl = make_layer(9, 7, (2, 2), 0.5)
    x = torch.randn(4, 7, requires_grad=True)
    y = sl(x)
    (gx,) = torch.autograd.grad(y.sum(), x)
    assert_close(gx, lin.weight.detach().sum(0).expand(4, 7))


@pytest.mark.parametrize("block", [(1, 1), (16, 16), (4, 4)])
def test_opcheck(block):
    lin, sl = make_layer(40, 24, block, 0.5)
    r, c = sl.block_size
    for n in (0, 1, 5):
        x = torch.randn(n, 24, requires_grad=True)
        args = (x, sl.row_ptr, sl.col_idx, sl.values, sl.bias.detach(), 40, 24, r, c, 1)
        torch.library.opcheck(torch.ops.sparseprune.spmm.default, args)
        dy = torch.randn(n, 40)
        torch.library.opcheck(torch.ops.sparseprune.spmm_t.default, (dy, sl.row_ptr, sl.col_idx, sl.values, 40, 24, r, c, 1))


def test_meta_tensors_see_shapes():
    lin, sl = make_layer(40, 24, (8, 8), 0.5)
    x = torch.randn(6, 24, device="meta")
    out = torch.ops.sparseprune.spmm(x, sl.row_ptr.to("meta"), sl.col_idx.to("meta"), sl.values.to("meta"),
                                     None, 40, 24, 8, 8, 1)
    assert out.shape == (6, 40) and out.device.type == "meta"


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_thread_counts(threads):
    lin = torch.nn.Linear(512, 256)
    with torch.no_grad():
        lin.weight.copy_(block_sparse_weight(256, 512, (16, 16), 0.8))
    sl = sp.SparseLinear.from_dense(lin, format="bsr", block_size=(16, 16), num_threads=threads)
    x = torch.randn(100, 512)
    assert_close(sl(x), reference.linear(x, lin.weight, lin.bias))


def test_bad_inputs_raise():
    lin, sl = make_layer(16, 8, (4, 4), 0.5)
    with pytest.raises(ValueError, match="8"):
        sl(torch.randn(3, 9))
    with pytest.raises(TypeError, match="float32"):
        sl(torch.randn(3, 8, dtype=torch.float64))
    with pytest.raises(TypeError, match="float32"):
        sl(torch.ones(3, 8, dtype=torch.int64))
    with pytest.raises(ValueError, match="format"):
        sp.SparseLinear.from_dense(lin, format="coo")
    with pytest.raises(TypeError):
        sp.SparseLinear.from_dense(torch.nn.Conv2d(1, 1, 1))
    with pytest.raises(TypeError, match="float32"):
        sl.double()


@settings(max_examples=40, deadline=None)
@given(threads=st.integers(2, 4), n=st.integers(16, 160), k=st.integers(1, 300), m=st.integers(1, 300),
       block=st.sampled_from([(16, 16), (8, 8), (4, 4), (16, 1), (1, 1), (32, 16)]),
       sparsity=st.sampled_from([0.3, 0.8, 0.97]))
def test_thread_splits_property(threads, n, k, m, block, sparsity):
    """Rows of X split between threads (each packs its own panels) or block rows split (shared panels):
    which one runs depends on the sizes of W and X; both must equal the reference."""
    lin = torch.nn.Linear(k, m)
    with torch.no_grad():
        lin.weight.copy_(block_sparse_weight(m, k, block, sparsity))
    fmt = "csr" if block == (1, 1) else "bsr"
    sl = sp.SparseLinear.from_dense(lin, format=fmt, block_size=None if fmt == "csr" else block, num_threads=threads)
    x = torch.randn(n, k)
    with torch.no_grad():
        assert_close(sl(x), reference.linear(x, lin.weight, lin.bias))
