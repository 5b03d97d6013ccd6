"""What a probe found in the kept kernel calls (``_cache_convcall``, ``_cache_clplan``, ``_cache_qplanes``,
``_cache_qcall``, ``_cache_fcall``) and the routes around them, each a case that once crashed or gave a wrong
answer:

- an array replaced, checked on another route (a call with autograd on), edited while it was not the module's
  and put back at its old address reached the kernel unchecked (segfault): a plan now stands only while the
  arrays checked last are its own;
- ``bias.data = ...`` with a strided / shorter / other-dtype tensor at the plan's address was read as it was;
- a conv's stride / dilation changed after a first call was ignored for an input of the same shape;
- a lazily negated input (``z.conj().imag``, ``torch._neg_view``) was read as its memory (that is, -x);
- geometry changed without ``validate()`` (``groups``, ``kernel_size``) segfaulted.
References are dense PyTorch on the same weights."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparseprune as sp
from sparseprune import ops

pytestmark = pytest.mark.usefixtures("one_thread")


def _conv(cin=32, cout=48, k=3, seed=0, stride=1):
    g = torch.Generator().manual_seed(seed)
    conv = nn.Conv2d(cin, cout, k, stride, k // 2)
    keep = (torch.rand(cout // 16, cin // 16, generator=g) < 0.5).float()
    keep[:, 0] = 1
    mask = keep.repeat_interleave(16, 0).repeat_interleave(16, 1)[:, :, None, None]
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * mask)
        conv.bias.copy_(torch.randn(cout, generator=g))
    return conv


def _linear(i=64, o=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(i, o)
    keep = (torch.rand(o // 16, i // 16, generator=g) < 0.5).float()
    keep[:, 0] = 1
    with torch.no_grad():
        lin.weight.copy_(torch.randn(o, i, generator=g) * keep.repeat_interleave(16, 0).repeat_interleave(16, 1))
        lin.bias.copy_(torch.randn(o, generator=g))
    return lin


def _close(y, ref, tol=1e-4):
    assert y.shape == ref.shape
    torch.testing.assert_close(y, ref, rtol=tol, atol=tol * max(1.0, ref.abs().max().item()))


# (name, module factory, input factory, tolerance): every kept-call route
ROUTES = [
    ("conv_nchw", lambda: sp.SparseConv2d.from_dense(_conv(), format="bsr", block_size=(16, 16)),
     lambda: torch.randn(2, 32, 7, 6), 1e-4, lambda: _conv()),
    ("conv_cl_1x1", lambda: sp.SparseConv2d.from_dense(_conv(k=1), format="bsr", block_size=(16, 16)),
     lambda: torch.randn(2, 32, 7, 6).contiguous(memory_format=torch.channels_last), 1e-4, lambda: _conv(k=1)),
    ("conv_int8_planes", lambda: sp.SparseConv2d.from_dense(_conv(), format="bsr", block_size=(16, 16),
                                                            weight_dtype=torch.int8),
     lambda: torch.randn(2, 32, 7, 6), 6e-2, lambda: _conv()),
    ("linear_f32", lambda: sp.SparseLinear.from_dense(_linear(), format="bsr", block_size=(16, 16)),
     lambda: torch.randn(5, 64), 1e-4, lambda: _linear()),
    ("linear_int8", lambda: sp.SparseLinear.from_dense(_linear(), format="bsr", block_size=(16, 16),
                                                       weight_dtype=torch.int8),
     lambda: torch.randn(5, 64), 6e-2, lambda: _linear()),
]
IDS = [r[0] for r in ROUTES]


@pytest.mark.parametrize("route", ROUTES, ids=IDS)
def test_array_edited_while_replaced_and_put_back_is_checked(route):
    _, make, inp, _, _ = route
    m, x = make(), inp()
    with torch.no_grad():
        m(x), m(x)  # the kept call, built on col_idx A
    a = m.col_idx
    m.col_idx = a.clone()
    if m.weight_dtype == "float32":
        m(x)  # autograd on (the bias wants a gradient): the general route checks the clone
    else:
        with torch.no_grad():  # (quantized layers are inference-only) a strided input: the general route
            m(torch.empty(*x.shape[:-1], 2 * x.shape[-1])[..., ::2].copy_(x))
    a.fill_(30000)  # A edited while it is not the module's
    m.col_idx = a  # and put back: a replaced array, to be checked before a kernel reads it
    with torch.no_grad(), pytest.raises(ValueError):
        m(x)


@pytest.mark.parametrize("route", ROUTES, ids=IDS)
def test_bias_data_swapped_at_the_same_address(route):
    _, make, inp, tol, dense = route
    m, x, ref_mod = make(), inp(), dense()
    out = ref_mod.bias.shape[0]
    m.bias.requires_grad_(False)  # (an int32 .data needs a bias that wants no gradient)
    with torch.no_grad():
        big = torch.zeros(2 * out)
        big[:out] = ref_mod.bias
        m.bias.data = big[:out]
        m(x), m(x)
        # a valid float32 bias, strided, at the same address: the values it holds are used
        big[::2] = torch.arange(out, dtype=torch.float32)
        m.bias.data = big[::2]
        ref_mod.bias.copy_(torch.arange(out, dtype=torch.float32))
        _close(m(x), ref_mod(x), tol)
        _close(m(x), ref_mod(x), tol)
        for bad in (big[: out // 2], big[:out].view(torch.int32)):
            m.bias.data = bad
            with pytest.raises(ValueError, match="bias must be float32 of shape"):
                m(x)


@pytest.mark.parametrize("attr,value", [("stride", (2, 2)), ("dilation", (2, 2)), ("padding", (2, 2))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.int8])
def test_conv_geometry_changed_after_a_call_is_honoured(attr, value, dtype):
    conv = _conv()
    m = sp.SparseConv2d.from_dense(conv, format="bsr", block_size=(16, 16), weight_dtype=dtype)
    x = torch.randn(2, 32, 11, 11)
    tol = 1e-4 if dtype == torch.float32 else 6e-2
    with torch.no_grad():
        _close(m(x), conv(x), tol)
        _close(m(x), conv(x), tol)
        setattr(m, attr, value)
        setattr(conv, attr, value)
        for _ in range(2):
            _close(m(x), conv(x), tol)


@pytest.mark.parametrize("attr,value", [("groups", 2), ("kernel_size", (1, 1))])
def test_conv_geometry_changed_without_validate_is_refused(attr, value):
    m = sp.SparseConv2d.from_dense(_conv(), format="bsr", block_size=(16, 16))
    x = torch.randn(1, 32, 6, 6)
    with torch.no_grad():
        m(x), m(x)
        setattr(m, attr, value)
        with pytest.raises(ValueError):
            m(x)
    m2 = sp.SparseConv2d.from_dense(_conv(), format="bsr", block_size=(16, 16))
    setattr(m2, attr, value)  # before any call
    with torch.no_grad(), pytest.raises(ValueError):
        m2(x)


def _neg_view(t):
    return torch._neg_view(t)


@pytest.mark.parametrize("route", ROUTES, ids=IDS)
def test_lazily_negated_inputs(route):
    _, make, inp, tol, dense = route
    m, ref_mod = make(), dense()
    x = inp()
    with torch.no_grad():
        for _ in range(3):  # first call, kept call, kept call
            xn = _neg_view(x)
            assert xn.is_neg()
            _close(m(xn), ref_mod(-x), tol)
        z = torch.complex(torch.randn(x.shape), x).contiguous()
        if x.is_contiguous():
            _close(m(z.conj().imag), ref_mod(-x), tol)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_lazily_negated_residual(layout):
    conv = _conv(32, 32, 1 if layout == "channels_last" else 3)
    m = sp.SparseConv2d.from_dense(conv, format="bsr", block_size=(16, 16))
    x = torch.randn(2, 32, 6, 5)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = x.contiguous(memory_format=fmt)
    with torch.no_grad():
        r = torch.randn(conv(x).shape).contiguous(memory_format=fmt)
        for _ in range(3):
            _close(m.forward_residual(x, _neg_view(r), "relu"), F.relu(conv(x) - r))
            _close(m.forward_residual(_neg_view(x), r, "relu"), F.relu(conv(-x) + r))


def test_lazily_negated_tensors_in_the_other_kernels():
    x = torch.randn(2, 8, 9, 9)
    pool = sp.nn.MaxPool2d(3, 2, 1)
    with torch.no_grad():
        torch.testing.assert_close(pool(_neg_view(x)), F.max_pool2d(-x, 3, 2, 1))
        q, k, v = (torch.randn(1, 5, 2, 8) for _ in range(3))
        want = F.scaled_dot_product_attention(-q.transpose(1, 2), k.transpose(1, 2), -v.transpose(1, 2))
        got = ops.attention(_neg_view(q), k, _neg_view(v))
        if got is not None:
            torch.testing.assert_close(got, want.transpose(1, 2).reshape(1, 5, 16), rtol=1e-5, atol=1e-5)
        ln = nn.LayerNorm(16)
        h, r = torch.randn(3, 16), torch.randn(3, 16)
        torch.testing.assert_close(ops.add_layer_norm(_neg_view(h), r, ln), ln(-h + r))
        torch.testing.assert_close(ops.add_layer_norm(h, _neg_view(r), ln), ln(h - r))


@pytest.mark.parametrize("dtype", [torch.float32, torch.int8, torch.bfloat16])
def test_linear_sizes_changed_without_validate(dtype):
    """``out_features`` changed after a kept call, no validate(): a clear error (the kept call wrote 80 columns of
    a 64-row pattern: uninitialised output; the int8 / bf16 one ignored in_features: heap corruption)."""
    m = sp.SparseLinear.from_dense(_linear(), format="bsr", block_size=(16, 16), weight_dtype=dtype)
    m.bias = None
    x = torch.randn(5, 64)
    with torch.no_grad():
        m(x), m(x)
        m.out_features = 80
        with pytest.raises(ValueError):
            m(x)
        m.out_features = 48
        m.in_features = 32
        with pytest.raises(ValueError):
            m(torch.randn(5, 32))


def test_meta_bias_after_none_is_refused():
    m = sp.SparseLinear.from_dense(_linear(), format="bsr", block_size=(16, 16))
    m.bias = None
    x = torch.randn(5, 64)
    with torch.no_grad():
        m(x), m(x)
        m.bias = nn.Parameter(torch.empty(48, device="meta"))  # data_ptr() 0: read as "no bias" by the kept call
        with pytest.raises(ValueError, match="one device"):
            m(x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.int8])
def test_shared_group_sees_replaced_index_and_scale_arrays(dtype):
    from sparseprune import shared

    class QKV(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v = (sp.SparseLinear.from_dense(_linear(seed=s), format="bsr", block_size=(16, 16),
                                                                 weight_dtype=dtype) for s in range(3))

        def forward(self, x):
            return self.q(x), self.k(x), self.v(x)

    model = QKV()
    other = sp.SparseLinear.from_dense(_linear(seed=7), format="bsr", block_size=(16, 16), weight_dtype=dtype)
    x = torch.randn(5, 64)
    with torch.no_grad():
        shared.group_shared_inputs(model, x)
        model(x)
        names = ["col_idx", "row_ptr", "values"] + (["scales", "compensation"] if dtype == torch.int8 else [])
        for n in names:  # the k layer's pattern replaced array by array with another one's
            setattr(model.k, n, getattr(other, n).clone())
        model.k.bias = nn.Parameter(other.bias.detach().clone())
        got = model(x)[1]
        want = other(x)
    _close(got, want, 1e-4 if dtype == torch.float32 else 6e-2)
