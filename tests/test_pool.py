"""sparseprune.nn.MaxPool2d (NCHW float32 max pooling on our kernel) and convert(pools=True).

The reference is PyTorch's own max pooling on the same input; NaN, +-inf and signed zeros included."""
import importlib

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import sparseprune as sp
from sparseprune import ops
from sparseprune._ext import _C
from sparseprune.nn import MaxPool2d

pytestmark = pytest.mark.usefixtures("one_thread")
pools_mod = importlib.import_module("sparseprune.convert.pools")


def _same(a, b):
    """Equal values, NaN where the reference has NaN (signed zeros compare equal, as in torch)."""
    return a.shape == b.shape and bool(((a == b) | (a.isnan() & b.isnan())).all())


def _input(shape, seed, specials):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    if specials and x.numel():
        flat = x.view(-1)
        idx = torch.randint(0, flat.numel(), (max(1, flat.numel() // 20),), generator=g)
        vals = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0])
        flat[idx] = vals[torch.randint(0, len(vals), idx.shape, generator=g)]
    return x


@settings(max_examples=120, deadline=None)
@given(n=st.integers(1, 2), c=st.integers(1, 5), h=st.integers(1, 13), w=st.integers(1, 13),
       kh=st.integers(1, 4), kw=st.integers(1, 4), sh=st.integers(1, 3), sw=st.integers(1, 3),
       dh=st.integers(1, 2), dw=st.integers(1, 2), ceil=st.booleans(), pad_frac=st.floats(0, 1),
       stride_none=st.booleans(), specials=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_matches_torch_on_every_geometry(n, c, h, w, kh, kw, sh, sw, dh, dw, ceil, pad_frac, stride_none, specials,
                                         seed):
    ph, pw = int(pad_frac * (kh // 2)), int(pad_frac * (kw // 2))
    stride = None if stride_none else (sh, sw)
    x = _input((n, c, h, w), seed, specials)
    kw_args = dict(kernel_size=(kh, kw), stride=stride, padding=(ph, pw), dilation=(dh, dw), ceil_mode=ceil)
    ref_mod, ours = nn.MaxPool2d(**kw_args), MaxPool2d(**kw_args)
    try:
        ref = ref_mod(x)
    except RuntimeError:  # a window larger than the padded input: ours refuses with PyTorch's own error
        assert ops.maxpool2d_eager(x, (kh, kw), stride, (ph, pw), (dh, dw), ceil) is None
        with pytest.raises(RuntimeError):
            ours(x)
        return
    got = ops.maxpool2d_eager(x, (kh, kw), stride, (ph, pw), (dh, dw), ceil)
    assert got is not None  # the kernel ran: not PyTorch's fallback
    assert _same(got, ref)
    assert _same(ours(x), ref)
    assert _same(ours(x[0]), ref_mod(x[0]))  # (C, H, W)


def test_resnet_stem_pool_and_threads():
    x = torch.relu(torch.randn(2, 64, 112, 112))
    ref = F.max_pool2d(x, 3, 2, 1)
    for nt in (1, 2, 3):
        assert torch.equal(ops.maxpool2d_eager(x, 3, 2, 1, 1, False, nt), ref)
    m = MaxPool2d(3, 2, 1)
    m.num_threads = 2
    assert torch.equal(m(x), ref)


def test_windows_entirely_in_padding_give_minus_inf_as_torch():
    x = torch.randn(1, 2, 1, 1)  # kernel 2 with padding 1 and dilation 2: some windows miss the pixel
    for ceil in (False, True):
        ref = F.max_pool2d(x, 2, 1, 1, 2, ceil)
        assert _same(ops.maxpool2d_eager(x, 2, 1, 1, 2, ceil), ref)


@pytest.mark.parametrize("case", ["channels_last", "float64", "indices", "grad", "empty", "strided"])
def test_other_inputs_go_to_torch_unchanged(case):
    x = torch.randn(2, 3, 9, 9)
    m, ref_m = MaxPool2d(3, 2, 1), nn.MaxPool2d(3, 2, 1)
    if case == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif case == "float64":
        x = x.double()
    elif case == "indices":
        m, ref_m = MaxPool2d(3, 2, 1, return_indices=True), nn.MaxPool2d(3, 2, 1, return_indices=True)
        y, i = m(x)
        ry, ri = ref_m(x)
        assert torch.equal(y, ry) and torch.equal(i, ri)
        return
    elif case == "grad":
        a = x.clone().requires_grad_()
        b = x.clone().requires_grad_()
        m(a).sum().backward()
        ref_m(b).sum().backward()
        assert torch.equal(a.grad, b.grad)
        return
    elif case == "empty":
        x = torch.randn(0, 3, 9, 9)
    elif case == "strided":
        x = torch.randn(2, 3, 9, 18)[..., ::2]
    assert ops.maxpool2d_eager(x, 3, 2, 1, 1, False) is None
    assert torch.equal(m(x), ref_m(x))


def test_from_module_copies_the_configuration_and_refuses_other_modules():
    src = nn.MaxPool2d((3, 2), (2, 1), (1, 0), (1, 2), ceil_mode=True).eval()
    new = MaxPool2d.from_module(src)
    assert type(new) is MaxPool2d and isinstance(new, nn.MaxPool2d) and not new.training
    assert (new.kernel_size, new.stride, new.padding, new.dilation, new.ceil_mode) == \
           (src.kernel_size, src.stride, src.padding, src.dilation, src.ceil_mode)
    assert repr(new).endswith(repr(src).split("(", 1)[1])
    with pytest.raises(TypeError, match="MaxPool2d"):
        MaxPool2d.from_module(nn.AvgPool2d(2))


@pytest.mark.parametrize("bad", [
    dict(planes=-1), dict(h=-1), dict(kh=0), dict(sw=0), dict(dh=0), dict(ph=-1), dict(h=0), dict(x=0),
    dict(h=1 << 40),
])
def test_binding_refuses_bad_geometry(bad):
    x, y = torch.zeros(64), torch.zeros(64)
    a = dict(x=x.data_ptr(), y=y.data_ptr(), planes=1, h=4, w=4, ho=2, wo=2, kh=2, kw=2, sh=2, sw=2, ph=0, pw=0,
             dh=1, dw=1, num_threads=1)
    a.update(bad)
    with pytest.raises(ValueError, match="maxpool2d"):
        _C.maxpool2d(*a.values())


class Stem(nn.Module):
    """A ResNet-like stem (dense conv, pool) and a pruned body."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.body = nn.Conv2d(16, 32, 3, padding=1)
        self.head = nn.Linear(32, 10)
        with torch.no_grad():
            w = self.body.weight
            w.mul_((torch.rand(w.shape[0] // 8, w.shape[1] // 8, 1, 1) > 0.7).float()
                   .repeat_interleave(8, 0).repeat_interleave(8, 1))

    def forward(self, x):
        x = self.pool(torch.relu(self.conv(x)))
        return self.head(self.body(x).mean((2, 3)))


@pytest.fixture
def timed_faster(fake_timing):
    """``timed_faster(True)``: convert times our pool faster than PyTorch's; ``timed_faster(False)``: as fast."""
    return lambda ours_faster: fake_timing(pools_mod, {"torch": 2.0 if ours_faster else 1.0, "ours": 1.0})


@pytest.mark.parametrize("faster", [True, False])
def test_convert_installs_the_pool_only_where_timed_faster(timed_faster, monkeypatch, faster):
    timed_faster(faster)
    model, x = Stem().eval(), torch.randn(2, 3, 32, 32)
    fast = sp.convert(model, x, time_budget=1.0, end_to_end=False)
    assert type(model.pool) is nn.MaxPool2d  # the source model is untouched
    assert (type(fast.pool) is MaxPool2d) is faster
    rows = sp.summary(fast, print_fn=None).totals["pools"]
    assert [(r["name"], r["kept"]) for r in rows] == [("pool", faster)]
    assert ("max pools on sparseprune's kernel (1): pool" in str(sp.summary(fast, print_fn=None))) is faster
    with torch.no_grad():
        assert torch.allclose(fast(x), model(x), atol=1e-5)


def test_convert_pools_false_and_channels_last_leave_torch_pools(timed_faster, monkeypatch):
    timed_faster(True)
    model, x = Stem().eval(), torch.randn(2, 3, 32, 32)
    assert type(sp.convert(model, x, time_budget=0.5, pools=False, end_to_end=False).pool) is nn.MaxPool2d
    assert type(sp.convert(model, x, time_budget=0.5, skip=["pool"], end_to_end=False).pool) is nn.MaxPool2d
    cl = model.to(memory_format=torch.channels_last)
    fast = sp.convert(cl, x.contiguous(memory_format=torch.channels_last), time_budget=0.5, end_to_end=False)
    assert type(fast.pool) is nn.MaxPool2d and not sp.summary(fast, print_fn=None).totals["pools"]


def test_save_load_restores_the_pool_from_the_fresh_architecture(timed_faster, tmp_path, monkeypatch):
    timed_faster(True)
    model, x = Stem().eval(), torch.randn(2, 3, 32, 32)
    fast = sp.convert(model, x, time_budget=1.0, end_to_end=False)
    assert type(fast.pool) is MaxPool2d
    sp.save(fast, tmp_path / "m.sp")
    loaded = sp.load(tmp_path / "m.sp", Stem())
    assert type(loaded.pool) is MaxPool2d and loaded.pool.kernel_size == 3 and loaded.pool.padding == 1
    with torch.no_grad():
        assert torch.equal(loaded(x), fast(x))


@pytest.mark.parametrize("rows", [
    [{"name": "pool", "kept": "yes", "torch_ms": 1.0, "ms": 0.5}],
    [{"name": 3, "kept": True, "torch_ms": 1.0, "ms": 0.5}],
    [{"name": "pool", "kept": True, "torch_ms": "1", "ms": 0.5}],
    [{"name": "pool", "kept": True, "torch_ms": 1.0, "ms": 0.5, "class": "os.system"}],
    {"pool": True},
])
def test_a_malformed_pools_report_is_refused(rows):
    from sparseprune.convert import check_report
    with pytest.raises(ValueError, match="pools"):
        check_report({"layers": [], "pools": rows})


def test_a_report_naming_a_non_pool_replaces_nothing(timed_faster, tmp_path, monkeypatch):
    """Only the names come from the file, and only a plain nn.MaxPool2d there is replaced."""
    timed_faster(True)
    model, x = Stem().eval(), torch.randn(2, 3, 32, 32)
    fast = sp.convert(model, x, time_budget=1.0, end_to_end=False)
    from sparseprune.convert import REPORT_ATTR
    rep = getattr(fast, REPORT_ATTR)
    rep["pools"] = [{"name": "conv", "kept": True, "torch_ms": 1.0, "ms": 0.5},
                    {"name": "no.such.module", "kept": True, "torch_ms": 1.0, "ms": 0.5}]
    sp.save(fast, tmp_path / "m.sp")
    loaded = sp.load(tmp_path / "m.sp", Stem())
    assert type(loaded.conv) is nn.Conv2d and type(loaded.pool) is nn.MaxPool2d


def test_export_traces_torchs_pool():
    """Under torch.export the module is PyTorch's max pooling (our kernel is eager only)."""
    m, x = MaxPool2d(3, 2, 1), torch.randn(1, 4, 10, 10)
    ep = torch.export.export(m, (x,))
    assert any("max_pool2d" in str(n.target) for n in ep.graph.nodes)
    assert torch.equal(ep.module()(x), F.max_pool2d(x, 3, 2, 1))
