"""Arrays replaced or edited after a module was built, and the calls that keep kernel arguments between calls.

The kept-argument paths (``_cache_qcall``, ``_cache_fcall``, ``_cache_qplanes``, ``_cache_clplan`` and the
channels_last column groups) hold raw addresses and arrays derived from the packed ones. What they must never
do: read a bias or index array the kernels cannot use (a float64 or short bias, int64 or out-of-range column
indices: a clear error, not a heap over-read), compute with a pattern that is no longer the module's (a
pattern loaded or copied in place, even through ``.data``), or fail where the plain path works (inference
tensors, a bias taken over by ``torch.nn.utils.prune`` / ``parametrize``, ``torch.func.vmap``). References are
dense PyTorch on the same weights.
"""
import pytest
import torch
import torch.nn.functional as F
import torch.nn.utils.parametrize as parametrize
import torch.nn.utils.prune as prune
from torch import nn

import sparseprune as sp
from helpers import block_sparse_weight

pytestmark = pytest.mark.usefixtures("one_thread")

DTYPES = [torch.float32, torch.int8, torch.bfloat16]
TOL = {torch.float32: 1e-4, torch.int8: 6e-2, torch.bfloat16: 2e-2}


def _linear(i=96, o=64, seed=0, sparsity=0.5):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(i, o)
    with torch.no_grad():
        lin.weight.copy_(block_sparse_weight(o, i, (16, 16), sparsity, g))
        lin.bias.copy_(torch.randn(o, generator=g))
    return lin


def _conv(cin=32, cout=48, k=1, seed=0, blocks=None):
    """A conv whose (Cout, Cin) weight keeps 16x16 blocks: ``blocks[r]`` lists the input-channel blocks block
    row r keeps (the same for every tap), or random half of them."""
    g = torch.Generator().manual_seed(seed)
    conv = nn.Conv2d(cin, cout, k, padding=k // 2)
    keep = torch.zeros(cout // 16, cin // 16)
    if blocks is None:
        keep = (torch.rand(cout // 16, cin // 16, generator=g) < 0.5).float()
        keep[:, 0] = 1
    else:
        for r, cs in enumerate(blocks):
            keep[r, cs] = 1
    mask = keep.repeat_interleave(16, 0).repeat_interleave(16, 1)[:, :, None, None]
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * mask)
        conv.bias.copy_(torch.randn(cout, generator=g))
    return conv


def _close(y, ref, dtype):
    tol = TOL[dtype] * max(1.0, ref.abs().max().item())
    assert (y - ref).abs().max().item() <= tol


def _cl(x):
    return x.contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("how", ["param", "data"])
@pytest.mark.parametrize("bad", ["float64", "short", "long"])
def test_linear_bad_bias_is_refused_after_a_kept_call(dtype, how, bad):
    lin = _linear()
    m = sp.SparseLinear.from_dense(lin, format="bsr", block_size=(16, 16), weight_dtype=dtype)
    x = torch.randn(7, 96)
    new = {"float64": lin.bias.detach().double(), "short": torch.zeros(3), "long": torch.zeros(1000)}[bad]
    with torch.no_grad():
        m(x), m(x)  # the kept arguments exist
        good = m.bias
        if how == "param":
            m.bias = nn.Parameter(new)
        else:
            m.bias.data = new
        for inp in (x, x.reshape(1, 7, 96)):
            with pytest.raises(ValueError, match="bias must be float32 of shape"):
                m(inp)
        if how == "param":
            m.bias = good
        else:
            m.bias.data = lin.bias.detach().clone()
        _close(m(x), lin(x), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("how", ["attr", "data"])
def test_linear_bad_index_arrays_are_refused(dtype, how):
    lin = _linear()
    x = torch.randn(5, 96)
    cases = [("col_idx", lambda t: t.long(), TypeError), ("col_idx", lambda t: t + 100, ValueError),
             ("row_ptr", lambda t: t[:-1].clone(), ValueError), ("row_ptr", lambda t: t.flip(0), ValueError)]
    for name, f, err in cases:
        m = sp.SparseLinear.from_dense(lin, format="bsr", block_size=(16, 16), weight_dtype=dtype)
        with torch.no_grad():
            m(x)
            t = getattr(m, name)
            if how == "attr":
                setattr(m, name, f(t))
            else:
                t.data = f(t.data)
            with pytest.raises(err):
                m(x)


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_pattern_replaced_array_by_array(dtype):
    """A new pattern assigned one array at a time: inconsistent in between, used only once whole."""
    a, b = _linear(seed=1), _linear(seed=2, sparsity=0.7)
    m = sp.SparseLinear.from_dense(a, format="bsr", block_size=(16, 16), weight_dtype=dtype)
    o = sp.SparseLinear.from_dense(b, format="bsr", block_size=(16, 16), weight_dtype=dtype)
    x = torch.randn(9, 96)
    with torch.no_grad():
        m(x)
        for n, t in o._buffers.items():
            setattr(m, n, t.clone())
        m.bias = nn.Parameter(b.bias.detach().clone())
        torch.testing.assert_close(m(x), o(x), rtol=0, atol=0)
        _close(m(x), b(x), dtype)


@pytest.mark.parametrize("stride", [1, 2])
def test_channels_last_pattern_edited_in_place_through_data(stride):
    """The channels_last 1x1 route reads derived column groups: an in-place copy of another pattern through
    ``.data`` (which does not bump the version counter) must be seen."""
    a, b = _conv(64, 64, blocks=[[0, 1]] * 4), _conv(64, 64, seed=1, blocks=[[2, 3]] * 4)
    a.stride = b.stride = (stride, stride)
    m = sp.SparseConv2d.from_dense(a, format="bsr", block_size=(16, 16))
    o = sp.SparseConv2d.from_dense(b, format="bsr", block_size=(16, 16))
    x = _cl(torch.randn(1, 64, 6, 4))
    with torch.no_grad():
        _close(m(x), a(x), torch.float32)
        for n in ("row_ptr", "col_idx", "values", "bias"):
            getattr(m, n).data.copy_(getattr(o, n))
        _close(m(x), b(x), torch.float32)
        _close(m(x.contiguous()), b(x), torch.float32)
        r = _cl(torch.randn(b(x).shape))
        _close(m.forward_residual(x, r, "relu"), F.relu(b(x) + r), torch.float32)


def test_channels_last_load_state_dict_many_times():
    """Patterns of the same size loaded in turns: a new pattern's arrays may land at the old addresses."""
    convs = [_conv(64, 64, seed=s, blocks=[[s % 4, (s + 1) % 4]] * 4) for s in range(3)]
    mods = [sp.SparseConv2d.from_dense(c, format="bsr", block_size=(16, 16)) for c in convs]
    m = sp.SparseConv2d.from_dense(convs[0], format="bsr", block_size=(16, 16))
    x = _cl(torch.randn(1, 64, 3, 5))
    with torch.no_grad():
        for i in range(60):
            j = (i * 7) % 3
            m.load_state_dict(mods[j].state_dict())
            _close(m(x), convs[j](x), torch.float32)


@pytest.mark.parametrize("what", ["from_dense", "load_state_dict", "convert"])
def test_channels_last_conv_with_inference_tensors(what):
    conv = _conv(32, 48, blocks=[[0], [1], [0]])
    x = _cl(torch.randn(2, 32, 6, 5))
    if what == "from_dense":
        with torch.inference_mode():
            m = sp.SparseConv2d.from_dense(conv, format="bsr", block_size=(16, 16))
            ys = [m(x), m(x)]
    elif what == "load_state_dict":
        m = sp.SparseConv2d.from_dense(_conv(32, 48, seed=3), format="bsr", block_size=(16, 16))
        with torch.inference_mode():
            m.load_state_dict(sp.SparseConv2d.from_dense(conv, format="bsr", block_size=(16, 16)).state_dict())
        with torch.no_grad():
            ys = [m(x), m(x)]
    else:
        with torch.inference_mode():
            net = sp.convert(nn.Sequential(conv))
            assert isinstance(net[0], sp.SparseConv2d) and net[0].format == "bsr"
            ys = [net(x), net(x)]
    with torch.no_grad():
        for y in ys:
            _close(y, conv(x), torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["prune", "parametrize"])
def test_linear_bias_taken_over_by_prune_or_parametrize(dtype, kind):
    lin = _linear()
    m = sp.SparseLinear.from_dense(lin, format="bsr", block_size=(16, 16), weight_dtype=dtype)
    x = torch.randn(6, 96)
    with torch.no_grad():
        m(x)
    for mod in (m, lin):
        if kind == "prune":
            torch.manual_seed(0)
            prune.random_unstructured(mod, "bias", amount=0.5)
        else:
            parametrize.register_parametrization(mod, "bias", _Half())
    with torch.no_grad():
        for _ in range(2):
            _close(m(x), lin(x), dtype)
            _close(m(x.reshape(2, 3, 96)), lin(x).reshape(2, 3, 64), dtype)


class _Half(nn.Module):
    def forward(self, b):
        return b * 0.5


@pytest.mark.parametrize("dtype", [torch.float32, torch.int8])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("k", [1, 3])
def test_conv_bias_taken_over_by_prune(dtype, layout, k):
    conv = _conv(32, 48, k)
    m = sp.SparseConv2d.from_dense(conv, format="bsr", block_size=(16, 16), weight_dtype=dtype)
    x = torch.randn(2, 32, 6, 5)
    if layout == "channels_last":
        x = _cl(x)
    with torch.no_grad():
        m(x)
    for mod in (m, conv):
        torch.manual_seed(0)
        prune.random_unstructured(mod, "bias", amount=0.5)
    with torch.no_grad():
        for _ in range(2):
            _close(m(x), conv(x), dtype)
        r = torch.randn(conv(x).shape)
        if layout == "channels_last":
            r = _cl(r)
        _close(m.forward_residual(x, r, "relu"), F.relu(conv(x) + r), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.int8])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_conv_bad_bias_is_refused_after_a_kept_call(dtype, layout):
    conv = _conv(32, 48, 1)
    m = sp.SparseConv2d.from_dense(conv, format="bsr", block_size=(16, 16), weight_dtype=dtype)
    x = torch.randn(2, 32, 6, 5)
    if layout == "channels_last":
        x = _cl(x)
    with torch.no_grad():
        m(x), m(x)
        m.bias.data = torch.zeros(3)
        with pytest.raises(ValueError, match="bias must be float32 of shape"):
            m(x)
        with pytest.raises(ValueError, match="bias must be float32 of shape"):
            m.forward_residual(x, torch.zeros_like(x[:, :1]).expand(2, 48, 6, 5).contiguous())
        m.col_idx.data = m.col_idx.data.long()
        m.bias.data = conv.bias.detach().clone()
        with pytest.raises(TypeError, match="col_idx must be int16 or int32"):
            m(x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.int8])
def test_forward_residual_none_is_refused_every_time(dtype):
    m = sp.SparseConv2d.from_dense(_conv(32, 48, 3), format="bsr", block_size=(16, 16), weight_dtype=dtype)
    x = torch.randn(2, 32, 7, 9)
    with torch.no_grad():
        m(x)
        for _ in range(2):
            with pytest.raises(TypeError, match="residual must be a Tensor"):
                m.forward_residual(x, None)


@pytest.mark.parametrize("dtype", DTYPES)
def test_vmap_over_sparse_layers(dtype):
    lin = _linear()
    m = sp.SparseLinear.from_dense(lin, format="bsr", block_size=(16, 16), weight_dtype=dtype)
    x = torch.randn(3, 4, 96)
    with torch.no_grad():
        m(x[0])  # kept arguments exist: vmap must not reach them
        torch.testing.assert_close(torch.func.vmap(m)(x), torch.stack([m(t) for t in x]), rtol=0, atol=1e-6)
    if dtype != torch.bfloat16:
        conv = _conv(32, 48, 3)
        c = sp.SparseConv2d.from_dense(conv, format="bsr", block_size=(16, 16), weight_dtype=dtype)
        xs = torch.randn(3, 2, 32, 5, 5)
        with torch.no_grad():
            torch.testing.assert_close(torch.func.vmap(c)(xs), torch.stack([c(t) for t in xs]), rtol=0, atol=1e-5)
