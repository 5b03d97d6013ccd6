"""SparseConv2d against F.conv2d on the same masked weight: every variant, layout, sparsity and ISA path."""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st

import sparseprune as sp
from sparseprune.nn import SparseConv2d
from sparseprune import reference_conv
from helpers import assert_close

SPARSITIES = [0.0, 0.8, 0.95, 1.0]
FORMATS = [("csr", None), ("bsr", (16, 16)), ("bsr", (4, 4)), ("bsr", (3, 5))]
# (cin, cout, kernel, stride, padding, dilation, groups, H, W)
CASES = [
    (8, 16, 1, 1, 0, 1, 1, 9, 7),          # 1x1: read in place (no packing)
    (12, 20, 1, 2, 0, 1, 1, 11, 9),        # 1x1 stride 2
    (16, 16, 3, 1, 1, 1, 1, 13, 11),       # 3x3 'resnet'
    (16, 24, 3, 2, 1, 1, 1, 15, 13),       # 3x3 stride 2 (phase-split input)
    (10, 18, 5, 1, 2, 1, 1, 9, 10),        # 5x5
    (6, 17, 7, 2, 3, 1, 1, 19, 17),        # 7x7 stride 2 (stem-like)
    (9, 11, 3, 1, 2, 2, 1, 8, 13),         # dilation 2
    (16, 32, 3, 1, 1, 1, 4, 7, 9),         # groups 4
    (12, 12, 3, 1, "same", 1, 1, 5, 6),    # 'same'
    (7, 9, 4, 1, "same", 1, 1, 6, 5),      # 'same' with an even kernel (asymmetric padding)
    (5, 13, 3, 1, 0, 1, 1, 3, 3),          # 'valid', 1x1 output
    (8, 8, (3, 1), (2, 1), (1, 0), (1, 2), 1, 10, 9),  # non-square everything
]


def block_mask_conv(cout, cin_g, block, sparsity, g=None):
    """(Cout, Cin/groups) keep-mask of whole r x c blocks with exactly round((1 - s) * blocks) kept."""
    r, c = block
    mb, kb = math.ceil(cout / r), math.ceil(cin_g / c)
    keep = torch.zeros(mb * kb, dtype=torch.bool)
    keep[torch.randperm(mb * kb, generator=g)[:round(mb * kb * (1 - sparsity))]] = True
    return keep.reshape(mb, kb).repeat_interleave(r, 0).repeat_interleave(c, 1)[:cout, :cin_g]


def make_conv(case, fmt, block, sparsity, bias=True, g=None):
    cin, cout, k, s, p, d, groups, H, W = case
    conv = torch.nn.Conv2d(cin, cout, k, s, p, d, groups, bias=bias)
    with torch.no_grad():
        w = conv.weight
        w[w == 0] = 1.0
        if fmt == "csr":
            keep = torch.zeros(w.numel(), dtype=torch.bool)
            keep[torch.randperm(w.numel(), generator=g)[:round(w.numel() * (1 - sparsity))]] = True
            w.mul_(keep.reshape(w.shape))
        else:
            w.mul_(block_mask_conv(cout, cin // groups, block, sparsity, g)[:, :, None, None])
    return conv, SparseConv2d.from_dense(conv, format=fmt, block_size=block)


def _pad4(conv):
    return sp.nn._conv_padding(conv.padding, conv.kernel_size, conv.stride, conv.dilation)


def expected(conv, x):
    """float64 unfold + matmul reference (independent of oneDNN and of our kernels)."""
    with torch.no_grad():
        return reference_conv.conv2d(x, conv.weight, conv.bias, conv.stride, _pad4(conv), conv.dilation, conv.groups)


def check(conv, sc, x, run_dense=True):
    with torch.no_grad():
        out = sc(x)
        if run_dense:  # dense PyTorch's own output: shape and memory format
            ref = conv(x)
            assert out.shape == ref.shape
            assert out.is_contiguous(memory_format=torch.channels_last) == \
                ref.is_contiguous(memory_format=torch.channels_last)
            assert out.is_contiguous() == ref.is_contiguous()
        else:  # PyTorch's float32 conv segfaults inside oneDNN on some random geometries (see below)
            assert out.is_contiguous(memory_format=sp.ops.conv_output_memory_format(x))
    assert_close(out, expected(conv, x))


@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)).replace(" ", ""))
@pytest.mark.parametrize("fmt,block", FORMATS, ids=lambda v: str(v))
@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_matches_conv2d_all_paths(isa, case, fmt, block, sparsity):
    conv, sc = make_conv(case, fmt, block, sparsity)
    cin, H, W = case[0], case[7], case[8]
    for n in (1, 2):
        x = torch.randn(n, cin, H, W)
        check(conv, sc, x)
        check(conv, sc, x.to(memory_format=torch.channels_last))


@pytest.mark.parametrize("case", [(64, 64, 3, 1, 1, 1, 1, 20, 20), (64, 128, 1, 1, 0, 1, 1, 20, 19),
                                  (32, 48, 3, 2, 1, 1, 1, 29, 30), (128, 64, 3, 1, 1, 1, 1, 7, 7)])
@pytest.mark.parametrize("fmt,block", [("csr", None), ("bsr", (16, 16)), ("bsr", (8, 8))])
def test_resnet_like_shapes(isa, case, fmt, block):
    # full register tiles, several pixel passes, both thread splits
    conv, sc = make_conv(case, fmt, block, 0.8)
    x = torch.randn(1, case[0], case[7], case[8])
    check(conv, sc, x)
    check(conv, sc, x.to(memory_format=torch.channels_last))


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("n", [1, 2, 5])
def test_thread_counts_and_batches(isa, threads, n):
    conv, _ = make_conv((32, 48, 3, 1, 1, 1, 1, 20, 19), "bsr", (16, 16), 0.5)
    sc = SparseConv2d.from_dense(conv, format="bsr", block_size=(16, 16), num_threads=threads)
    check(conv, sc, torch.randn(n, 32, 20, 19))


def test_strided_and_sliced_inputs(isa):
    conv, sc = make_conv((8, 12, 3, 1, 1, 1, 1, 9, 9), "csr", None, 0.5)
    base = torch.randn(2, 16, 12, 20)
    check(conv, sc, base[:, ::2, 1:10, 3:21:2])          # every stride odd: packed through the strides
    check(conv, sc, base[:, :8, :9, :9])                 # a window of a bigger tensor
    check(conv, sc, torch.randn(9, 9, 8, 2).permute(3, 2, 0, 1))  # (N, C, H, W) from an (H, W, C, N) tensor
    x1 = torch.randn(8, 9, 9)                            # unbatched
    assert_close(sc(x1), expected(conv, x1[None])[0])
    empty = sc(torch.randn(0, 8, 9, 9))
    assert empty.shape == (0, 12, 9, 9)


def test_direct_1x1_reads_in_place_at_the_end_of_memory(isa):
    # 1x1 stride 1 reads the input where it lies: the last pixel tile must not read past the tensor
    conv, sc = make_conv((3, 40, 1, 1, 0, 1, 1, 5, 7), "csr", None, 0.0)
    big = torch.randn(4096)
    x = big[-3 * 35:].view(1, 3, 5, 7)
    check(conv, sc, x)


@pytest.mark.parametrize("bias", [True, False])
def test_output_fully_written_poisoned(isa, bias):
    conv, sc = make_conv((16, 33, 3, 2, 1, 1, 1, 11, 10), "bsr", (16, 16), 0.95, bias=bias)
    for _ in range(3):
        torch.full((1 << 16,), float("nan")).sum()  # dirty the allocator
        x = torch.randn(2, 16, 11, 10)
        out = sc(x)
        assert torch.isfinite(out).all()
        assert_close(out, expected(conv, x))



@pytest.mark.parametrize("k", [1, 3])  # 1x1: q positions are output positions; 3x3: NCHW rows (padded q rows)
@pytest.mark.parametrize("stride", [1, 2])  # band mode or not
@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("keep_rows", [(1,), (), (0, 2)])
def test_empty_block_rows_of_convs(isa, k, stride, threads, bias, keep_rows):
    """A conv's output channels whose block row holds no block are act(bias [+ residual]), written apart
    from the tiles (first and last block row empty, the last one partial; an all-zero weight), over several
    images, a plane of 63 pixels (a partial vector), an output poisoned with NaN before each call."""
    cin, cout, n, h, w = 24, 40, 3, 7, 9
    conv = torch.nn.Conv2d(cin, cout, k, stride, k // 2, bias=bias)
    with torch.no_grad():
        keep = torch.zeros(3, 3, dtype=torch.bool)  # 16 x 8 blocks: block rows 0-15, 16-31, 32-39
        for br in keep_rows:
            keep[br, torch.tensor([0, 2])] = True
        conv.weight.mul_(keep.repeat_interleave(16, 0)[:cout].repeat_interleave(8, 1)[:, :, None, None])
        if bias:
            conv.bias.copy_(torch.randn(cout))
    sc = SparseConv2d.from_dense(conv, format="bsr", block_size=(16, 8), num_threads=threads)
    assert int((sc.row_ptr.diff() == 0).sum()) == 3 - len(keep_rows)  # the empty block rows are there
    x = torch.randn(n, cin, h, w)
    with torch.no_grad():
        y = conv(x)
        r = torch.randn(y.shape)
        for act in ("none", "relu", "gelu"):
            torch.full(y.shape, float("nan")).sum()  # the allocator hands this block out next
            got = sc.forward_residual(x, r, act)
            assert torch.isfinite(got).all()
            assert_close(got, sp.ops.apply_activation(expected(conv, x) + r, act))
        torch.full(y.shape, float("nan")).sum()
        assert_close(sc(x), expected(conv, x))


@pytest.mark.parametrize("geom", [(3, 1, 1), (3, 2, 1), (1, 2, 0), (5, 1, 2)])  # kernel, stride, padding
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("cl", [False, True])
def test_input_channels_no_weight_reads(isa, geom, threads, cl):
    """Input channels that no kept block reads are skipped by the input packing: NaN there changes nothing,
    and the channels that are read are packed afresh on every call (a second input gives its own result)."""
    k, s, p = geom
    cin, cout = 44, 24
    conv = torch.nn.Conv2d(cin, cout, k, s, p)
    with torch.no_grad():
        keep = torch.tensor([[1, 0, 0, 0, 0, 1], [0, 0, 1, 0, 0, 0], [1, 0, 0, 0, 1, 0]], dtype=torch.bool)
        conv.weight.mul_(keep.repeat_interleave(8, 0).repeat_interleave(8, 1)[:, :cin, None, None])
    sc = SparseConv2d.from_dense(conv, format="bsr", block_size=(8, 8), num_threads=threads)
    unread = torch.ones(cin, dtype=torch.bool)
    unread[[*range(0, 8), *range(16, 24), *range(32, 44)]] = False  # channels 8-15, 24-31 unread
    for _ in range(2):
        x = torch.randn(2, cin, 13, 11)
        ref = expected(conv, x)
        x[:, unread] = float("nan")
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)
        assert_close(sc(x), ref)

def test_padding_modes_and_same(isa):
    for mode in ("reflect", "replicate", "circular"):
        conv = torch.nn.Conv2d(6, 8, 3, padding=1, padding_mode=mode)
        sc = SparseConv2d.from_dense(conv, format="csr")
        x = torch.randn(2, 6, 7, 8)
        assert_close(sc(x), conv(x))
    conv = torch.nn.Conv2d(6, 8, (4, 2), padding="same", dilation=(1, 3))
    for fmt in ("csr", "dense"):
        sc = SparseConv2d.from_dense(conv, format=fmt)
        x = torch.randn(1, 6, 9, 10)
        assert_close(sc(x), conv(x))


@pytest.mark.parametrize("fmt,block", [("csr", None), ("bsr", (16, 16)), ("bsr", (4, 4))])
@pytest.mark.parametrize("case", [CASES[2], CASES[3], CASES[7], CASES[9]], ids=lambda c: str(c[:7]))
def test_gradient_wrt_input(isa, fmt, block, case):
    conv, sc = make_conv(case, fmt, block, 0.6)
    cin, H, W = case[0], case[7], case[8]
    for cl in (False, True):
        x = torch.randn(2, cin, H, W)
        if cl:
            x = x.to(memory_format=torch.channels_last)
        x.requires_grad_(True)
        x2 = x.detach().clone().requires_grad_(True)
        out = sc(x)
        g = torch.randn_like(out)
        (out * g).sum().backward()
        (conv(x2) * g).sum().backward()
        assert_close(x.grad, x2.grad)
        assert_close(sc.bias.grad, conv.bias.grad)
        sc.bias.grad = None
        conv.zero_grad()


@pytest.mark.parametrize("fmt,block", [("csr", None), ("bsr", (16, 16)), ("bsr", (4, 4))])
def test_opcheck(fmt, block):
    conv, sc = make_conv((8, 16, 3, 2, 1, 1, 2, 7, 6), fmt, block, 0.5)
    for n in (0, 1, 3):
        for cl in (False, True):
            x = torch.randn(n, 8, 7, 6)
            if cl:
                x = x.to(memory_format=torch.channels_last)
            x.requires_grad_(True)
            args = (x, sc.row_ptr, sc.col_idx, sc.values, sc.bias.detach(), 8, 16, [3, 3], [2, 2], [1, 1, 1, 1],
                    [1, 1], 2, sc.rk, 1)
            torch.library.opcheck(torch.ops.sparseprune.sparse_conv2d.default, args)
        dy = torch.randn(n, 16, 4, 3)
        torch.library.opcheck(torch.ops.sparseprune.sparse_conv2d_input_grad.default,
                              (dy, sc.row_ptr, sc.col_idx, sc.values, 8, 7, 6, [3, 3], [2, 2], [1, 1, 1, 1],
                               [1, 1], 2, sc.rk, 1))


def test_eager_fast_path_matches_dispatcher_and_fake_mode():
    from torch._subclasses.fake_tensor import FakeTensorMode

    conv, sc = make_conv((16, 24, 3, 1, 1, 1, 1, 9, 8), "bsr", (8, 8), 0.5)
    x = torch.randn(2, 16, 9, 8)
    with torch.no_grad():
        fast = sc(x)  # plain eager inference: the implementation is called directly
    slow = sc(x.clone().requires_grad_(True))  # autograd: through torch.ops and the dispatcher
    assert torch.equal(fast, slow.detach())
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fx = mode.from_tensor(x)
        with torch.no_grad():
            out = sc(fx)  # must take the dispatcher (fake kernel), not the CPU implementation
        assert out.shape == (2, 24, 9, 8) and type(out) is not torch.Tensor


def test_export_sees_the_custom_op():
    conv, sc = make_conv((8, 12, 3, 1, 1, 1, 1, 6, 6), "csr", None, 0.5)
    ep = torch.export.export(torch.nn.Sequential(sc, torch.nn.ReLU()), (torch.randn(2, 8, 6, 6),))
    assert "sparseprune.sparse_conv2d" in ep.graph_module.code
    x = torch.randn(2, 8, 6, 6)
    assert_close(ep.module()(x), torch.relu(expected(conv, x)))


def test_kernel_matches_packed_reference():
    # independent of nn.Conv2d: rebuild the weight element by element from the packed arrays
    conv, sc = make_conv((16, 24, 3, 2, 1, 2, 2, 12, 11), "bsr", (4, 4), 0.5)
    x = torch.randn(2, 16, 12, 11)
    ref = reference_conv.sparse_conv2d(x, sc.row_ptr, sc.col_idx, sc.values, sc.bias, 16, 24, (3, 3), (2, 2),
                                       (1, 1, 1, 1), (2, 2), 2, sc.rk)
    with torch.no_grad():
        assert_close(sc(x), ref)


@given(cin_g=st.integers(1, 12), cout_g=st.integers(1, 20), groups=st.sampled_from([1, 1, 2, 3]),
       kh=st.integers(1, 5), kw=st.integers(1, 5), s=st.integers(1, 3), p=st.integers(0, 2), d=st.integers(1, 2),
       h=st.integers(1, 12), w=st.integers(1, 12), n=st.integers(1, 3),
       block=st.sampled_from([None, (1, 1), (2, 3), (4, 4), (8, 8), (16, 16)]),
       sparsity=st.sampled_from([0.0, 0.5, 0.9, 1.0]), cl=st.booleans(),
       isa=st.sampled_from([p["isa"] for p in sp.ops.isa_paths()]), seed=st.integers(0, 2**16))
def test_property_random_geometry(cin_g, cout_g, groups, kh, kw, s, p, d, h, w, n, block, sparsity, cl, isa, seed):
    h, w = h + d * (kh - 1), w + d * (kw - 1)  # at least one output pixel without padding
    g = torch.Generator().manual_seed(seed)
    case = (cin_g * groups, cout_g * groups, (kh, kw), s, p, d, groups, h, w)
    fmt = "csr" if block is None else "bsr"
    conv, sc = make_conv(case, fmt, block, sparsity, g=g)
    x = torch.randn(n, cin_g * groups, h, w, generator=g)
    if cl:
        x = x.to(memory_format=torch.channels_last)
    sp.ops.set_isa(isa)
    try:
        # not dense PyTorch's float32 conv here: it segfaults inside oneDNN on e.g. a channels_last
        # (1, 16, 12, 1) input with a (5, 1) kernel, stride 2, padding 1, dilation 2, groups 2
        check(conv, sc, x, run_dense=False)
    finally:
        sp.ops.set_isa("best")


def test_formats_auto_dense_and_depthwise():
    conv, _ = make_conv((32, 32, 3, 1, 1, 1, 1, 8, 8), "bsr", (16, 16), 0.75)
    auto = SparseConv2d.from_dense(conv)
    assert auto.format == "bsr" and auto.block_size == (16, 16)
    conv_u, _ = make_conv((32, 32, 3, 1, 1, 1, 1, 8, 8), "csr", None, 0.9)
    assert SparseConv2d.from_dense(conv_u).format == "csr"
    assert SparseConv2d.from_dense(torch.nn.Conv2d(8, 8, 3)).format == "dense"
    dw = torch.nn.Conv2d(16, 16, 3, padding=1, groups=16)
    with torch.no_grad():
        dw.weight.mul_(torch.rand_like(dw.weight) > 0.8)
    assert SparseConv2d.from_dense(dw).format == "dense"  # depthwise stays dense under auto
    x = torch.randn(2, 16, 9, 9)
    for fmt in ("csr", "bsr", "dense"):  # but runs correctly when forced sparse
        assert_close(SparseConv2d.from_dense(dw, format=fmt)(x), expected(dw, x))
    for m in (auto, SparseConv2d.from_dense(conv, format="dense")):
        x = torch.randn(1, 32, 8, 8)
        assert_close(m(x), expected(conv, x))


def test_to_dense_round_trip_and_memory():
    conv, sc = make_conv((64, 64, 3, 1, 1, 1, 1, 8, 8), "bsr", (16, 16), 0.9)
    assert torch.equal(sc.to_dense(), conv.weight.detach())
    back = sc.to_conv()
    assert torch.equal(back.weight, conv.weight.detach())
    held = sum(b.numel() * b.element_size() for b in sc.buffers())
    assert held < 0.2 * conv.weight.numel() * 4
    assert not any(name == "weight" for name, _ in sc.named_buffers())
    assert "format=bsr" in repr(sc) and "block_size=(16, 16)" in repr(sc) and "density=0.1" in repr(sc)


def test_bad_inputs_raise():
    conv, sc = make_conv((8, 16, 3, 1, 1, 1, 1, 9, 9), "bsr", (4, 4), 0.5)
    with pytest.raises(ValueError, match="8"):
        sc(torch.randn(1, 9, 9, 9))
    with pytest.raises(ValueError, match="4-D|H, W"):
        sc(torch.randn(8, 9))
    with pytest.raises(TypeError, match="float32"):
        sc(torch.randn(1, 8, 9, 9, dtype=torch.float64))
    with pytest.raises(TypeError, match="float32"):
        sc(torch.ones(1, 8, 9, 9, dtype=torch.int64))
    with pytest.raises(ValueError, match="meta"):
        sc(torch.randn(1, 8, 9, 9, device="meta"))
    with pytest.raises(ValueError, match="smaller than"):
        SparseConv2d.from_dense(torch.nn.Conv2d(8, 8, 5), format="csr")(torch.randn(1, 8, 3, 3))
    with pytest.raises(TypeError):
        sc("not a tensor")
    with pytest.raises(ValueError, match="format"):
        SparseConv2d.from_dense(conv, format="coo")
    with pytest.raises(TypeError, match="Conv2d"):
        SparseConv2d.from_dense(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="block_size"):
        SparseConv2d.from_dense(conv, format="csr", block_size=(4, 4))
    with pytest.raises(TypeError, match="float32"):
        sc.double()
    with pytest.raises(TypeError, match="from_dense"):
        SparseConv2d(8, 8, 3)


def test_listed_in_kernel_table():
    for p in sp.ops.isa_paths():
        assert p["conv_kernels"].startswith("f32_conv2d_") and p["conv_kernels"].endswith(p["isa"])


@pytest.mark.parametrize("case", [(48, 32, 3, 2, 1, 1, 1, 41, 57),    # 3x3 stride 2, odd width: de-interleaved rows
                                  (40, 32, 1, 2, 0, 1, 1, 37, 35),    # 1x1 stride 2: one phase of four packed
                                  (32, 32, 3, 1, 1, 1, 1, 45, 39),    # stride 1 with padding: copied rows
                                  (32, 16, 5, 2, 3, 2, 1, 43, 47),    # dilation 2, padding 3, stride 2
                                  (24, 16, (3, 5), (1, 2), (2, 1), 1, 1, 40, 61),
                                  (20, 16, 3, 1, 1, 1, 1, 41, 13)])   # channels not a multiple of 8
@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("cl", [False, True])
def test_band_packing_at_the_end_of_memory(isa, case, threads, cl):
    # more than one thread and a tall output: the input is packed band by band right before its rows are
    # computed (with stride 2, every other column into each phase; channels_last inputs by 8x8 transposes);
    # the input's last row ends where the tensor's memory ends, so a packer that read past a row would read
    # past the allocation
    conv, _ = make_conv(case, "bsr", (16, 16), 0.5)
    sc = SparseConv2d.from_dense(conv, format="bsr", block_size=(16, 16), num_threads=threads)
    cin, H, W = case[0], case[7], case[8]
    big = torch.randn(cin * H * W + 5)
    x = big[-cin * H * W:]
    x = x.view(1, H, W, cin).permute(0, 3, 1, 2) if cl else x.view(1, cin, H, W)
    check(conv, sc, x)


@pytest.mark.parametrize("stride", [1, 2, (2, 1), (1, 3), 4])
@pytest.mark.parametrize("act", ["none", "relu", "gelu", "silu"])
@pytest.mark.parametrize("fmt,block", [("csr", None), ("bsr", (16, 16)), ("bsr", (3, 5))])
def test_channels_last_1x1_as_linear(isa, act, fmt, block, stride, monkeypatch):
    # a 1x1 conv on a channels_last input runs the Linear kernels over the pixels (with a stride: over the
    # pixels it keeps, copied out): the same values, the activation fused, the output channels_last like
    # PyTorch's (an output channel count that leaves a partial block row, two images, odd sizes)
    conv, _ = make_conv((40, 19, 1, stride, 0, 1, 1, 9, 7), fmt, block, 0.6)
    sc = SparseConv2d.from_dense(conv, format=fmt, block_size=block, activation=act)
    x = torch.randn(2, 40, 9, 7).contiguous(memory_format=torch.channels_last)
    calls = []
    linear = sp.nn._C.spmm
    monkeypatch.setattr(sp.nn._C, "spmm", lambda *a: calls.append((a[9], a[1])) or linear(*a))
    with torch.no_grad():
        out = sc(x)
        again = sc(x)  # stride 1: through the arguments the first call kept (_cl_fast)
    pixels = out.shape[0] * out.shape[2] * out.shape[3]
    assert calls == [(pixels, 40)] * 2  # the Linear kernel, over the kept pixels
    assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
    assert_close(out, sp.ops.apply_activation(expected(conv, x), act))
    assert torch.equal(again, out)


def test_channels_last_1x1_kept_arguments_follow_the_layer():
    # the repeat call of a channels_last 1x1 conv goes straight to the kernel with the arguments of the first call
    # of that input shape; whatever changes the layer (a new bias, a new pattern loaded in place, the activation,
    # the thread setting, another input shape, a gradient) is followed, never a stale pointer or result
    torch.manual_seed(0)
    conv, _ = make_conv((32, 48, 1, 1, 0, 1, 1, 6, 5), "bsr", (16, 16), 0.5)
    sc = SparseConv2d.from_dense(conv, format="bsr", block_size=(16, 16))
    x = torch.randn(2, 32, 6, 5).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert_close(sc(x), expected(conv, x))
        assert "_cache_clplan" in sc.__dict__
        conv.bias.add_(1.0)
        sc.bias = torch.nn.Parameter(conv.bias.detach().clone())
        assert_close(sc(x), expected(conv, x))
        other, _ = make_conv((32, 48, 1, 1, 0, 1, 1, 6, 5), "bsr", (16, 16), 0.8)
        other.bias.copy_(conv.bias)
        sc.load_state_dict(SparseConv2d.from_dense(other, format="bsr", block_size=(16, 16)).state_dict())
        assert_close(sc(x), expected(other, x))
        sc.activation = "relu"
        assert_close(sc(x), torch.relu(expected(other, x)))
        sc.num_threads = 1
        assert_close(sc(x), torch.relu(expected(other, x)))
        x2 = torch.randn(1, 32, 4, 7).contiguous(memory_format=torch.channels_last)
        assert_close(sc(x2), torch.relu(expected(other, x2)))
        assert_close(sc(x), torch.relu(expected(other, x)))
    xg = x.clone().requires_grad_(True)
    sc(xg).sum().backward()
    assert xg.grad is not None and xg.grad.shape == x.shape
    # forward_residual (a ResNet block's end) keeps them too: the residual and activation in the store
    sc = SparseConv2d.from_dense(conv, format="bsr", block_size=(16, 16))
    res = torch.randn(2, 48, 6, 5).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        for _ in range(2):
            assert_close(sc.forward_residual(x, res, "relu"), torch.relu(expected(conv, x) + res))
        assert "_cache_clplan" in sc.__dict__
        assert_close(sc.forward_residual(x, res.contiguous(), "relu"), torch.relu(expected(conv, x) + res))
        assert_close(sc.forward_residual(x, res, "gelu"), F.gelu(expected(conv, x) + res))
        assert_close(sc(x), expected(conv, x))


def test_channels_last_1x1_with_padding_keeps_no_arguments():
    # a padded 1x1 conv (reflect) pads first: the kernel sees the padded copy, whose size an unpadded input may
    # have on a later call; no arguments are kept for it, every call pads
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(32, 48, 1, padding=1, padding_mode="reflect")
    with torch.no_grad():
        conv.weight.mul_(block_mask_conv(48, 32, (16, 16), 0.5, None)[:, :, None, None])
    sc = SparseConv2d.from_dense(conv, format="bsr", block_size=(16, 16))
    with torch.no_grad():
        for hw in ((6, 5), (8, 7), (6, 5), (8, 7)):
            x = torch.randn(1, 32, *hw).contiguous(memory_format=torch.channels_last)
            assert_close(sc(x), conv(x))
    assert "_cache_clplan" not in sc.__dict__


@pytest.mark.parametrize("kernel", list(sp.ops.KERNELS))
@pytest.mark.parametrize("block,cin,want", [((16, 16), 64, 16), ((8, 8), 48, 8), ((4, 4), 20, 4), ((16, 16), 40, 8),
                                            ((16, 4), 36, 4), ((3, 5), 40, 1), ((16, 2), 32, 1)])
def test_channels_last_1x1_column_groups(isa, kernel, block, cin, want):
    # the Linear route reads a 1x1 weight kept in aligned runs of 16 / 8 / 4 input channels as (rk x c) blocks
    # of the same arrays (values untouched); other patterns stay one-column blocks. Same values either way,
    # every kernel variant convert() may pin; an in-place change of the pattern (load_state_dict) is followed.
    from sparseprune.nn import _column_groups
    g = torch.Generator().manual_seed(cin + block[1])
    conv, sc = make_conv((cin, 24, 1, 1, 0, 1, 1, 6, 5), "bsr", block, 0.5, g=g)
    sc.kernel = kernel
    rp, ci, c = _column_groups(sc.row_ptr, sc.col_idx, cin)
    assert c == want
    if c > 1:  # the grouped arrays expand back to the stored ones
        assert torch.equal((ci.long()[:, None] * c + torch.arange(c)).flatten(), sc.col_idx.long())
        assert torch.equal(rp.long() * c, sc.row_ptr.long())
        assert ci.dtype == sc.col_idx.dtype and rp.dtype == sc.row_ptr.dtype
    x = torch.randn(2, cin, 6, 5).contiguous(memory_format=torch.channels_last)
    check(conv, sc, x)
    conv2, sc2 = make_conv((cin, 24, 1, 1, 0, 1, 1, 6, 5), "bsr", block, 0.5, g=g)  # same block count
    if sc2.col_idx.shape == sc.col_idx.shape and not torch.equal(sc2.col_idx, sc.col_idx):
        names = ("row_ptr", "col_idx", "values", "bias")
        saved = {n: getattr(sc, n).detach().clone() for n in names}
        with torch.no_grad():
            sc.load_state_dict(sc2.state_dict())  # new arrays
        check(conv2, sc, x)
        with torch.no_grad():  # the first pattern back, in place (the same addresses)
            for n in names:
                getattr(sc, n).copy_(saved[n])
        check(conv, sc, x)


def test_column_groups_refuses_partial_runs():
    from sparseprune.nn import _column_groups
    rp = torch.tensor([0, 16, 24], dtype=torch.int32)
    ci = torch.cat([torch.arange(16), torch.arange(16, 24)]).to(torch.int32)  # row 1: a run of 8 only
    assert _column_groups(rp, ci, 32)[2] == 8
    ci[-1] = 30  # a gap: no aligned run of 4 in row 1
    assert _column_groups(rp, ci, 32)[2] == 1
    ci = torch.arange(4, 28).to(torch.int32)  # runs of 16 not aligned to 16 (but to 4)
    assert _column_groups(torch.tensor([0, 24], dtype=torch.int32), ci, 32)[2] == 4
    assert _column_groups(rp, torch.cat([torch.arange(16), torch.arange(16, 24)]).to(torch.int32), 36)[2] == 4
    empty = _column_groups(torch.zeros(3, dtype=torch.int32), torch.zeros(0, dtype=torch.int32), 32)
    assert empty[2] == 16 and empty[1].numel() == 0
