"""The float32 conv kernel's kept call (``SparseConv2d._conv_fast`` / ``_C.ConvCall``): the second eager call of
an input shape and strides goes straight to the kernel with the arguments of the first. It must give what the
general route gives for every input, residual and setting that reaches it, and fall back (never compute with
stale arguments) when the input's strides, the arrays, the activation, the thread setting or the padding change.
References are dense PyTorch on the same weights."""
import pytest
import sparseprune as sp
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from sparseprune import _C
from torch import nn

pytestmark = pytest.mark.usefixtures("one_thread")


def _conv(cin, cout, k, seed=0, stride=1, padding=None, groups=1, bias=True, keep=0.5, padding_mode="zeros"):
    g = torch.Generator().manual_seed(seed)
    conv = nn.Conv2d(cin, cout, k, stride, k // 2 if padding is None else padding, groups=groups, bias=bias,
                     padding_mode=padding_mode)
    rows, cols = -(-cout // 16), -(-(cin // groups) // 16)
    m = (torch.rand(rows, cols, generator=g) < keep).float()
    m = m.repeat_interleave(16, 0)[:cout].repeat_interleave(16, 1)[:, : cin // groups, None, None]
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * m)
        if bias:
            conv.bias.copy_(torch.randn(cout, generator=g))
    return conv


def _close(y, ref):
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4 * max(1.0, ref.abs().max().item()))


def _kept(m):
    return m.__dict__.get("_cache_convcall") is not None


def test_second_call_takes_the_kept_call_and_matches():
    conv = _conv(32, 48, 3)
    m = sp.SparseConv2d.from_dense(conv, format="bsr", block_size=(16, 16))
    x = torch.randn(2, 32, 9, 7)
    with torch.no_grad():
        ref = conv(x)
        _close(m(x), ref)
        assert _kept(m)
        calls = []
        orig = m._conv_fast

        def spy(*a, **k):
            y = orig(*a, **k)
            calls.append(y is not None)
            return y

        m._conv_fast = spy
        for _ in range(3):
            _close(m(x), ref)
        assert calls == [True] * 3
        # a new input of the same shape: the kept call reads it, not the first one
        x2 = torch.randn(2, 32, 9, 7)
        _close(m(x2), conv(x2))


@settings(max_examples=25, deadline=None)
@given(cin=st.sampled_from([3, 16, 33]), cout=st.sampled_from([1, 16, 40]), k=st.sampled_from([1, 3, 5]),
       stride=st.sampled_from([1, 2]), hw=st.tuples(st.integers(1, 11), st.integers(1, 11)),
       n=st.integers(1, 3), bias=st.booleans(), keep=st.sampled_from([0.0, 0.3, 1.0]), seed=st.integers(0, 99),
       act=st.sampled_from(["none", "relu", "gelu"]))
def test_kept_call_matches_dense_on_repeat_calls(cin, cout, k, stride, hw, n, bias, keep, seed, act):
    """Random geometry (odd sizes, one pixel, all-zero and full weights): every call after the first goes
    through the kept call and gives dense PyTorch's result for a fresh input."""
    conv = _conv(cin, cout, k, seed, stride=stride, bias=bias, keep=keep)
    m = sp.SparseConv2d.from_dense(conv, format="bsr", block_size=(16, 1) if cin < 16 else (16, 16))
    m.activation = act
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _ in range(3):
            x = torch.randn(n, cin, *hw, generator=g)
            ref = conv(x)
            ref = {"none": ref, "relu": F.relu(ref), "gelu": F.gelu(ref)}[act]
            _close(m(x), ref)


def test_other_strides_of_the_same_shape_are_not_read_with_the_kept_call():
    conv = _conv(32, 32, 3)
    m = sp.SparseConv2d.from_dense(conv, format="bsr", block_size=(16, 16))
    base = torch.randn(2, 32, 8, 10)
    views = [base, base.transpose(2, 3).contiguous().transpose(2, 3), base.contiguous(memory_format=torch.channels_last),
             torch.randn(2, 32, 8, 20)[..., ::2], torch.randn(2, 32, 10, 8).permute(0, 1, 3, 2)]
    with torch.no_grad():
        for _ in range(2):
            for x in views:
                _close(m(x), conv(x))


@pytest.mark.parametrize("k", [1, 3])
def test_arrays_replaced_or_edited_in_place_are_seen(k):
    a, b = _conv(64, 48, k, seed=1), _conv(64, 48, k, seed=2)
    m = sp.SparseConv2d.from_dense(a, format="bsr", block_size=(16, 16))
    o = sp.SparseConv2d.from_dense(b, format="bsr", block_size=(16, 16))
    x = torch.randn(1, 64, 7, 6)
    with torch.no_grad():
        m(x), m(x)
        m.load_state_dict(o.state_dict())  # new arrays (other sizes): a new kept call
        _close(m(x), b(x))
        _close(m(x), b(x))
        a2 = _conv(64, 48, k, seed=1)
        with torch.no_grad():
            a2.weight.mul_(3.0)
        o2 = sp.SparseConv2d.from_dense(a2, format="bsr", block_size=(16, 16))
        m = sp.SparseConv2d.from_dense(a, format="bsr", block_size=(16, 16))
        m(x), m(x)
        m.values.data.copy_(o2.values)  # same pattern, values edited in place (address kept)
        _close(m(x), a2(x) - a2.bias.view(1, -1, 1, 1) + a.bias.view(1, -1, 1, 1))


def test_bad_arrays_after_a_kept_call_are_refused():
    conv = _conv(32, 48, 3)
    m = sp.SparseConv2d.from_dense(conv, format="bsr", block_size=(16, 16))
    x = torch.randn(1, 32, 5, 5)
    with torch.no_grad():
        m(x), m(x)
        m.col_idx.data = torch.full_like(m.col_idx.data, 30000)
        with pytest.raises(ValueError):
            m(x)


def test_settings_changed_between_calls():
    conv = _conv(32, 48, 3)
    m = sp.SparseConv2d.from_dense(conv, format="bsr", block_size=(16, 16))
    x = torch.randn(1, 32, 6, 6)
    with torch.no_grad():
        ref = conv(x)
        _close(m(x), ref)
        _close(m(x), ref)
        m.activation = "relu"
        _close(m(x), F.relu(ref))
        m.activation = "none"
        m.num_threads = 2
        _close(m(x), ref)
        m.bias = None
        _close(m(x), ref - conv.bias.view(1, -1, 1, 1))
    # with a gradient wanted the kept call is not taken
    x.requires_grad_(True)
    y = m(x)
    y.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_padding_mode_input_of_the_padded_size():
    """A reflect-padded layer pads its input before the kernel: an unpadded input of the padded size must not be
    computed with arguments kept for the padded copy (no plan is kept for such layers)."""
    conv = _conv(16, 16, 3, padding=1, padding_mode="reflect")
    m = sp.SparseConv2d.from_dense(conv, format="bsr", block_size=(16, 16))
    with torch.no_grad():
        for hw in [(6, 6), (8, 8), (6, 6), (8, 8)]:
            x = torch.randn(1, 16, *hw)
            _close(m(x), conv(x))


@pytest.mark.parametrize("layout", ["nchw", "strided"])
def test_forward_residual_through_the_kept_call(layout):
    conv = _conv(32, 32, 3)
    m = sp.SparseConv2d.from_dense(conv, format="bsr", block_size=(16, 16))
    x = torch.randn(2, 32, 6, 5)
    with torch.no_grad():
        ref = conv(x)
        m(x)
        for _ in range(2):
            r = torch.randn(ref.shape)
            if layout == "strided":
                r = torch.randn(2, 32, 6, 10)[..., ::2]
            _close(m.forward_residual(x, r, "relu"), F.relu(ref + r))
            with pytest.raises(TypeError, match="residual must be a Tensor"):
                m.forward_residual(x, None)


def test_conv_call_refuses_bad_operands():
    conv = _conv(16, 16, 3)
    m = sp.SparseConv2d.from_dense(conv, format="bsr", block_size=(16, 16))
    x = torch.randn(1, 16, 4, 4)
    with torch.no_grad():
        m(x), m(x)
    call = m.__dict__["_cache_convcall"][9]
    with pytest.raises(ValueError, match="null dense operand"):
        call(0, 0, 1, 0)
    with pytest.raises(ValueError, match="misaligned residual"):
        y = torch.empty(1, 16, 4, 4)
        call(x.data_ptr(), y.data_ptr(), 1, y.data_ptr() + 1)
    with pytest.raises(ValueError, match="conv geometry"):
        _C.ConvCall([1] * 23, 16, m.row_ptr.data_ptr(), m.col_idx.data_ptr(), True, m.values.data_ptr(), 0, 0)
