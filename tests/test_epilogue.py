"""Fused epilogues (issue #15): bias + ReLU / GELU (erf and tanh) / SiLU applied in the kernels' store.

Every kernel path (fp32 spmm per ISA, sparse conv, int8 / bf16 qspmm per ISA) is compared with PyTorch's own
activation applied to the unfused result; convert() fuses only the pairs it can prove, and the fusion
survives save / load into a fresh architecture."""
import importlib

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import sparseprune as sp
from sparseprune import ops, quant
from sparseprune._ext import _C

from helpers import block_sparse_weight

pytestmark = pytest.mark.usefixtures("one_thread")

ACTS = [a for a in ops.ACTIVATIONS if a != "none"]
FP32_ISAS = [p["isa"] for p in ops.isa_paths()]
QPATHS = [(p["dtype"], p["isa"]) for p in quant.qisa_paths()]


def _ref(x, w, b, act):
    return ops.apply_activation(F.linear(x.double(), w.double(), b.double() if b is not None else None), act)


def _layer(m, k, block, sparsity, bias=True, scale=1.0):
    lin = nn.Linear(k, m, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(block_sparse_weight(m, k, block, sparsity) * scale)
        if bias:
            lin.bias.mul_(scale)
    return lin


@settings(max_examples=40, deadline=None)
@given(isa=st.sampled_from(FP32_ISAS), act=st.sampled_from(ACTS),
       fmt=st.sampled_from([("csr", None), ("bsr", (16, 16)), ("bsr", (4, 4)), ("bsr", (8, 1)), ("bsr", (1, 4))]),
       n=st.sampled_from([1, 2, 3, 17, 40]), k=st.integers(1, 70), m=st.integers(1, 70),
       sparsity=st.sampled_from([0.0, 0.5, 0.9, 1.0]), bias=st.booleans(), scale=st.sampled_from([0.1, 1.0, 8.0]))
def test_fused_linear_matches_pytorch_activation(isa, act, fmt, n, k, m, sparsity, bias, scale):
    ops.set_isa(isa)
    try:
        fmt_name, block = fmt
        lin = _layer(m, k, block or (1, 1), sparsity, bias, scale)
        x = torch.randn(n, k) * scale
        layer = sp.SparseLinear.from_dense(lin, format=fmt_name, block_size=block, activation=act)
        with torch.no_grad():
            y = layer(x)
        want = _ref(x, lin.weight, lin.bias, act)
        torch.testing.assert_close(y.double(), want, rtol=2e-5, atol=2e-5 * max(1.0, scale * scale * k ** 0.5))
    finally:
        ops.set_isa("best")


@pytest.mark.parametrize("act", ACTS)
def test_vector_activations_accurate_over_a_wide_range(isa, act):
    """Identity weights: the output is act(x) itself, over [-30, 30] (exp saturates, erfc underflows),
    and at far-tail values up to +-3e38."""
    n = 64
    x = torch.linspace(-30, 30, n * 16).reshape(n, 16)
    x[0, :6] = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 1e-6, -1e-6])
    # far tails: erfc / exp(-k) would leave the normal range there (GELU caps its erfc argument)
    x[1, :10] = torch.tensor([12.0, -12.0, 13.0, -13.0, 100.0, -100.0, 1e4, -1e4, 3e38, -3e38])
    lin = nn.Linear(16, 16, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.eye(16))
    for fmt, block in (("bsr", (16, 16)), ("csr", None)):
        layer = sp.SparseLinear.from_dense(lin, format=fmt, block_size=block, activation=act)
        with torch.no_grad():
            y = layer(x).double()
        want = ops.apply_activation(x.double(), act)
        err = (y - want).abs()
        assert float((err / want.abs().clamp_min(1.0)).max()) < 2e-6, (fmt, act, float(err.max()))


def test_relu_keeps_nan_and_fused_values_exact(isa):
    lin = nn.Linear(16, 16)
    x = torch.randn(5, 16)
    x[1, 3] = float("nan")
    layer = sp.SparseLinear.from_dense(lin, format="bsr", block_size=(16, 16), activation="relu")
    plain = sp.SparseLinear.from_dense(lin, format="bsr", block_size=(16, 16))
    with torch.no_grad():
        y, y0 = layer(x), torch.relu(plain(x))
    assert torch.isnan(y[1]).all() and torch.equal(y[0], y0[0])
    assert torch.equal(torch.nan_to_num(y, 7.0), torch.nan_to_num(y0, 7.0))


@pytest.mark.parametrize("path", QPATHS, ids=[f"{d}-{i}" for d, i in QPATHS])
@pytest.mark.parametrize("act", ACTS)
def test_fused_quantized_matches_unfused(path, act):
    """int8 / bf16: the fused store equals PyTorch's activation on the unfused kernel's output."""
    kind, isa = path
    ops.set_isa(isa)
    try:
        dtype = {"int8": torch.int8, "bf16": torch.bfloat16}[kind]
        for (n, k, m, block) in ((37, 64, 48, (16, 16)), (1, 32, 20, (1, 4)), (30, 40, 33, (4, 4))):
            lin = _layer(m, k, block, 0.5, scale=3.0)
            x = torch.randn(n, k) * 3
            fused = sp.SparseLinear.from_dense(lin, format="bsr", block_size=block, weight_dtype=dtype, activation=act)
            plain = sp.SparseLinear.from_dense(lin, format="bsr", block_size=block, weight_dtype=dtype)
            with torch.no_grad():
                y, y0 = fused(x), ops.apply_activation(plain(x), act)
            torch.testing.assert_close(y, y0, rtol=1e-5, atol=1e-5)
    finally:
        ops.set_isa("best")


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("channels_last", [False, True])
def test_fused_conv_matches_pytorch_activation(isa, act, channels_last):
    conv = nn.Conv2d(12, 24, 3, padding=1, stride=2)
    with torch.no_grad():
        conv.weight.mul_((torch.rand(24, 1, 1, 1) > 0.5).float())
    x = torch.randn(2, 12, 11, 9)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    for fmt, block in (("bsr", (8, 1)), ("csr", None)):
        layer = sp.SparseConv2d.from_dense(conv, format=fmt, block_size=block, activation=act)
        with torch.no_grad():
            y = layer(x)
            want = ops.apply_activation(conv(x), act)
        torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("act", ACTS)
def test_fused_layer_trains_and_traces_like_the_dense_pair(act):
    lin = _layer(24, 40, (8, 8), 0.5)
    layer = sp.SparseLinear.from_dense(lin, format="bsr", block_size=(8, 8), activation=act)
    x = torch.randn(6, 40, requires_grad=True)
    x0 = x.detach().clone().requires_grad_(True)
    layer(x).square().sum().backward()
    ops.apply_activation(lin(x0), act).square().sum().backward()
    torch.testing.assert_close(x.grad, x0.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(layer.bias.grad, lin.bias.grad, rtol=1e-4, atol=1e-5)
    with torch.no_grad():  # the registered op route (as under torch.compile / export) applies it too
        from torch.overrides import TorchFunctionMode

        class Passthrough(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                return func(*args, **(kwargs or {}))
        xd = x.detach()
        with Passthrough():
            assert ops.call_route(xd) == "op"
            y_op = layer(xd)
        torch.testing.assert_close(y_op, ops.apply_activation(lin(xd), act), rtol=1e-5, atol=1e-5)


def test_to_dense_module_keeps_the_activation():
    lin = _layer(16, 32, (16, 16), 0.5)
    layer = sp.SparseLinear.from_dense(lin, format="bsr", block_size=(16, 16), activation="gelu_tanh")
    dense = layer.to_dense_module()
    assert isinstance(dense, nn.Sequential) and isinstance(dense[1], nn.GELU) and dense[1].approximate == "tanh"
    x = torch.randn(3, 32)
    with torch.no_grad():
        torch.testing.assert_close(dense(x), layer(x), rtol=1e-5, atol=1e-5)
    assert "activation=gelu_tanh" in repr(layer)
    assert isinstance(sp.SparseLinear.from_dense(lin, format="bsr", block_size=(16, 16)).to_dense_module(), nn.Linear)


def test_bad_activations_are_refused(tmp_path):
    lin = nn.Linear(8, 8)
    with pytest.raises(ValueError, match="activation must be one of"):
        sp.SparseLinear.from_dense(lin, format="csr", activation="tanh")
    layer = sp.SparseLinear.from_dense(lin, format="csr")
    layer.activation = "softmax"
    with pytest.raises(ValueError, match="activation"):
        layer.validate()
    with pytest.raises(ValueError, match="fused activation code"):
        _C.spmm(8, 8, 1, 1, layer.row_ptr.data_ptr(), layer.col_idx.data_ptr(), False, layer.values.data_ptr(),
                torch.zeros(1, 8).data_ptr(), 1, 8, 0, torch.zeros(1, 8).data_ptr(), 8, 1, 9, 0, 0)
    # a saved file whose layer names an unknown activation does not load
    model = nn.Sequential(sp.SparseLinear.from_dense(lin, format="csr", activation="relu"))
    model[0].activation = "bogus"
    path = tmp_path / "m.sp"
    try:
        sp.save(model, path)
    except ValueError:
        return  # refused at save time: also fine
    with pytest.raises(ValueError, match="activation"):
        sp.load(path, nn.Sequential(nn.Linear(8, 8)))


# -- convert ------------------------------------------------------------------------------------------
class _MLP(nn.Module):
    def __init__(self, act, reuse=False):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(64, 128), act, nn.Linear(128, 64)
        self.reuse = reuse

    def forward(self, x):
        h = self.fc1(x)
        y = self.fc2(self.act(h))
        return y + h[..., :64] if self.reuse else y  # reuse: the pre-activation is needed twice


class _Shared(nn.Module):
    """One activation module applied after two layers: it must stay."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.act = nn.Linear(64, 64), nn.Linear(64, 64), nn.ReLU()

    def forward(self, x):
        return self.act(self.b(self.act(self.a(x))))


def _prune(model):
    sp.prune_blocks(model, 0.75, block_size=(16, 16), dense_first_last=False)
    return model


cv = importlib.import_module("sparseprune.convert")  # the package (sparseprune.convert is the function)
cv_decide = importlib.import_module("sparseprune.convert.decide")


@pytest.fixture
def sparse_wins(monkeypatch):
    """Timings faked so that every sparse candidate wins (the fusion, not the timing, is under test)."""
    def fake(fns, *a, **k):
        return {n: (1.0 if n == "dense" else 0.1) for n in fns}
    monkeypatch.setattr(cv_decide, "time_calls", fake)
    monkeypatch.setattr(cv, "time_calls", fake)


def _convert(model, x, **kw):
    kw.setdefault("time_budget", 2.0)
    return sp.convert(model, x, formats=("bsr",), end_to_end=False, **kw)


def test_convert_fuses_sequential_and_attribute_pairs(sparse_wins):
    torch.manual_seed(0)
    model = _prune(nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64), nn.ReLU(),
                                 _MLP(nn.SiLU()), _MLP(nn.GELU(approximate="tanh"))).eval())
    x = torch.randn(20, 64)
    c = _convert(model, x)
    fused = {f["layer"]: f["kind"] for f in sp.summary(c).totals["fused"]}
    assert fused == {"0": "gelu", "2": "relu", "4.fc1": "silu", "5.fc1": "gelu_tanh"}
    assert isinstance(c[1], nn.Identity) and c[0].activation == "gelu" and isinstance(c[4].act, nn.Identity)
    with torch.no_grad():
        torch.testing.assert_close(c(x), model(x), rtol=1e-4, atol=1e-5)
    assert "activations fused" in str(sp.summary(c))


def test_convert_leaves_unprovable_pairs_alone(sparse_wins):
    model = _prune(nn.Sequential(_MLP(nn.ReLU(), reuse=True), _Shared()).eval())
    x = torch.randn(20, 64)
    c = _convert(model, x)
    assert sp.summary(c).totals["fused"] == []
    assert isinstance(c[0].act, nn.ReLU) and isinstance(c[1].act, nn.ReLU)
    assert all(getattr(m, "activation", "none") == "none" for m in c.modules())
    with torch.no_grad():
        torch.testing.assert_close(c(x), model(x), rtol=1e-4, atol=1e-5)
    c2 = _convert(_prune(nn.Sequential(nn.Linear(64, 64), nn.ReLU()).eval()), x, fuse=False)
    assert sp.summary(c2).totals["fused"] == [] and isinstance(c2[1], nn.ReLU)


class _ConvBnRelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.convolution = nn.Conv2d(16, 32, 3, padding=1, bias=False)
        self.normalization = nn.BatchNorm2d(32)
        self.activation = nn.ReLU()

    def forward(self, x):
        return self.activation(self.normalization(self.convolution(x)))


def test_convert_fuses_conv_relu_after_batchnorm_folding(sparse_wins):
    model = nn.Sequential(_ConvBnRelu(), _ConvBnRelu().requires_grad_(False))
    model[1].convolution = nn.Conv2d(32, 32, 3, padding=1, bias=False)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    sp.prune_blocks(model, 0.5, block_size=(8, 8), dense_first_last=False)
    model.eval()
    x = torch.randn(2, 16, 12, 12)
    c = sp.convert(model, x, formats=("bsr",), end_to_end=False, time_budget=2.0)
    fused = {f["layer"]: f["kind"] for f in sp.summary(c).totals["fused"]}
    assert fused == {"0.convolution": "relu", "1.convolution": "relu"}
    with torch.no_grad():
        torch.testing.assert_close(c(x), model(x), rtol=1e-4, atol=1e-4)


def test_fused_model_saves_and_loads_into_a_fresh_architecture(tmp_path, sparse_wins):
    def arch():
        torch.manual_seed(1)
        return nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64), nn.ReLU()).eval()
    model = _prune(arch())
    x = torch.randn(9, 64)
    c = _convert(model, x)
    assert len(sp.summary(c).totals["fused"]) == 2
    path = tmp_path / "fused.sp"
    sp.save(c, path)
    back = sp.load(path, arch())
    assert isinstance(back[1], nn.Identity) and back[0].activation == "gelu"
    with torch.no_grad():
        assert torch.equal(back(x), c(x))
    # a fresh architecture with another activation in that place does not take the file
    other = nn.Sequential(nn.Linear(64, 128), nn.SiLU(), nn.Linear(128, 64), nn.ReLU()).eval()
    with pytest.raises(ValueError, match="does not fit"):
        sp.load(path, other)


def test_end_to_end_revert_puts_the_activations_back(monkeypatch):
    def fake(fns, *a, **k):  # every layer wins alone, the whole converted model loses
        if set(fns) == {"dense", "converted"}:
            return {"dense": 1.0, "converted": 2.0}
        return {n: (1.0 if n == "dense" else 0.1) for n in fns}
    monkeypatch.setattr(cv_decide, "time_calls", fake)
    monkeypatch.setattr(cv, "time_calls", fake)
    model = _prune(nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64)).eval())
    x = torch.randn(9, 64)
    c = sp.convert(model, x, formats=("bsr",), time_budget=2.0)
    assert sp.summary(c).totals["end_to_end_reverted"] and sp.summary(c).totals["fused"] == []
    assert isinstance(c[1], nn.GELU) and isinstance(c[0], nn.Linear)
    with torch.no_grad():
        torch.testing.assert_close(c(x), model(x))


def test_end_to_end_check_times_the_dense_twin_in_place_and_puts_the_model_back(monkeypatch):
    """The end-to-end check's dense model is the converted one with the dense layers (and the fused
    activation modules) swapped in for its calls: it computes the source model, and the converted
    modules are back afterwards, also when a call fails."""
    seen = {}

    def fake(fns, *a, **k):
        if set(fns) == {"dense", "converted"}:
            seen.update({n: fn() for n, fn in fns.items()})
            return {"dense": 1.0, "converted": 0.5}
        return {n: (1.0 if n == "dense" else 0.1) for n in fns}
    monkeypatch.setattr(cv_decide, "time_calls", fake)
    monkeypatch.setattr(cv, "time_calls", fake)
    model = _prune(nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64)).eval())
    x = torch.randn(9, 64)
    c = sp.convert(model, x, formats=("bsr",), time_budget=2.0)
    assert not sp.summary(c, print_fn=None).totals["end_to_end_reverted"]
    assert isinstance(c[0], sp.SparseLinear) and c[0].activation == "gelu" and isinstance(c[1], nn.Identity)
    with torch.no_grad():
        ref = model(x)
        torch.testing.assert_close(seen["dense"], ref, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(seen["converted"], ref, rtol=1e-4, atol=1e-5)
    pairs = [("0", nn.Linear(64, 128)), ("1", nn.ReLU()), ("2", nn.Linear(3, 3))]  # the last one fails
    before = [c[i] for i in range(3)]
    with pytest.raises(RuntimeError):
        cv._call_swapped(c, pairs, x)
    assert [c[i] for i in range(3)] == before


class _Untraceable(_ConvBnRelu):
    """Data-dependent control flow: fx cannot trace it, so pairs are proven by running the example."""

    def forward(self, x):
        if float(x.abs().sum()) >= 0:
            return self.activation(self.normalization(self.convolution(x)))
        return x


def test_convert_folds_and_fuses_in_models_fx_cannot_trace(sparse_wins):
    from sparseprune.fold import find_conv_bn_pairs
    model = nn.Sequential(_Untraceable(), _Untraceable())
    model[1].convolution = nn.Conv2d(32, 32, 3, padding=1, bias=False)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    sp.prune_blocks(model, 0.5, block_size=(8, 8), dense_first_last=False)
    model.eval()
    x = torch.randn(2, 16, 12, 12)
    assert find_conv_bn_pairs(model) == []  # no graph, not Sequential neighbours
    assert find_conv_bn_pairs(model, x) == [("0.convolution", "0.normalization"), ("1.convolution", "1.normalization")]
    c = sp.convert(model, x, formats=("bsr",), end_to_end=False, time_budget=2.0)
    t = sp.summary(c).totals
    assert len(t["folded"]) == 2 and {f["layer"] for f in t["fused"]} == {"0.convolution", "1.convolution"}
    with torch.no_grad():
        torch.testing.assert_close(c(x), model(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("act", ["relu", "gelu", "gelu_tanh", "silu"])
def test_fused_activation_at_infinities_matches_torch(isa, act):
    """-inf, +inf, huge and NaN pre-activations: the fused store gives what PyTorch's function gives (NaN for
    silu / gelu_tanh / gelu at -inf, as -inf / inf does; gelu(+inf) = inf; every ISA path alike)."""
    special = torch.tensor([-float("inf"), float("inf"), -1e30, 1e30, float("nan"), -0.0, 3.0, -3.0])
    lin = torch.nn.Linear(16, 16)
    with torch.no_grad():
        lin.weight.zero_()
        lin.bias.zero_()
        lin.weight[:, 0] = 1.0
    x = torch.zeros(len(special), 16)
    x[:, 0] = special
    for fmt, kw in (("bsr", {"block_size": (16, 16)}), ("csr", {})):
        m = sp.SparseLinear.from_dense(lin, format=fmt, activation=act, **kw)
        with torch.no_grad():
            got = m(x)[:, 0]
        want = ops.apply_activation(special, act)
        if act == "gelu":  # torch's own gelu(+inf) depends on its CPU path (inf on AVX2, NaN on AVX-512): the exact inf
            want[1] = float("inf")
        torch.testing.assert_close(got, want, equal_nan=True, rtol=1e-5, atol=1e-6)
