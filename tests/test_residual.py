"""A ResNet block's end as one call: SparseConv2d.forward_residual (the residual and the activation in the
conv kernel's store) and convert(residual=True) on Hugging Face ResNet blocks.

Reference: PyTorch's conv2d on the masked weight, plus the residual, then the activation."""
import importlib

import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings, strategies as st

import sparseprune as sp
from sparseprune import ops

pytestmark = pytest.mark.usefixtures("one_thread")
residual_mod = importlib.import_module("sparseprune.convert.residual")


def _conv(cin, cout, k, s, p, d, block, sparsity, seed, bias=True):
    g = torch.Generator().manual_seed(seed)
    conv = nn.Conv2d(cin, cout, k, s, p, d, bias=bias)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g))
        r, c = block
        keep = (torch.rand((cout + r - 1) // r, (cin + c - 1) // c, 1, 1, generator=g) > sparsity).float()
        conv.weight.mul_(keep.repeat_interleave(r, 0)[:cout].repeat_interleave(c, 1)[:, :cin])
    return conv


def _no_torch_epilogue(monkeypatch):
    """The kernel path applies the residual and activation itself: PyTorch's activation must not be called."""
    def boom(*a, **k):
        raise AssertionError("the residual went to PyTorch's fallback")
    monkeypatch.setattr(ops, "apply_activation", boom)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cin=st.integers(1, 20), cout=st.integers(1, 20), k=st.sampled_from([1, 3]), s=st.integers(1, 2),
       d=st.integers(1, 2), h=st.integers(3, 12), w=st.integers(3, 12), n=st.integers(1, 2),
       act=st.sampled_from(["none", "relu", "gelu", "silu"]), cl=st.booleans(), bias=st.booleans(),
       sparsity=st.floats(0.0, 0.95), seed=st.integers(0, 2 ** 16))
def test_forward_residual_matches_torch(isa, cin, cout, k, s, d, h, w, n, act, cl, bias, sparsity, seed):
    p = k // 2
    if h + 2 * p < d * (k - 1) + 1 or w + 2 * p < d * (k - 1) + 1:
        return
    conv = _conv(cin, cout, k, s, p, d, (4, 1), sparsity, seed, bias)
    sc = sp.SparseConv2d.from_dense(conv, format="bsr", block_size=(4, 1))
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(n, cin, h, w, generator=g)
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        y = conv(x)
        r = torch.randn(y.shape, generator=g).contiguous(memory_format=torch.channels_last if cl else
                                                         torch.contiguous_format)
        if r.stride() != y.stride():  # the kernel takes a residual laid out as its output
            r = torch.empty_like(y).copy_(r)
        ref = ops.apply_activation(y.double() + r.double(), act)
        mp = pytest.MonkeyPatch()
        try:
            _no_torch_epilogue(mp)
            got = sc.forward_residual(x, r, act)
        finally:
            mp.undo()
    assert got.shape == ref.shape and got.stride() == y.stride()
    torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("case", ["dense_format", "own_activation", "strided_residual", "broadcast", "grad", "int8"])
def test_forward_residual_fallbacks_compute_the_same(case):
    conv = _conv(16, 16, 3, 1, 1, 1, (8, 8), 0.6, 0)
    kw = {"format": "bsr", "block_size": (8, 8)}
    x = torch.randn(2, 16, 9, 9)
    with torch.no_grad():
        y = conv(x)
    r = torch.randn_like(y)
    act, grad = "relu", False
    if case == "dense_format":
        kw["format"] = "dense"
    elif case == "own_activation":
        kw["activation"] = "relu"
        y = torch.relu(y)
    elif case == "strided_residual":
        r = torch.randn(2, 16, 9, 18)[..., ::2]
    elif case == "broadcast":
        r = torch.randn(1, 16, 1, 1)
    elif case == "grad":
        grad = True
    elif case == "int8":
        kw["weight_dtype"] = torch.int8
    sc = sp.SparseConv2d.from_dense(conv, **kw)
    with torch.set_grad_enabled(grad):
        xx = x.clone().requires_grad_(grad)
        got = sc.forward_residual(xx, r, act)
    if grad:
        got.sum().backward()
        assert xx.grad is not None
    tol = 0.05 if case == "int8" else 1e-5
    torch.testing.assert_close(got.detach(), torch.relu(y + r), rtol=tol, atol=tol * 10)


def _resnet(layer_type):
    T = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = T.ResNetModel(T.ResNetConfig(embedding_size=16, hidden_sizes=[32, 32], depths=[2, 1],
                                         layer_type=layer_type)).eval()
    sp.prune_blocks(model, sparsity=0.7, block_size=(8, 8), dense_first_last=False)
    return model, torch.randn(2, 3, 32, 32)


@pytest.fixture
def timed_faster(fake_timing, sparse_layers_win):
    """``timed_faster(True)``: convert times the fused form faster; ``timed_faster(False)``: as fast. Every layer's
    sparse candidates time faster than dense too (tiny convolutions may really not be): the pass under test needs
    sparse blocks to fuse."""
    return lambda fused_faster: fake_timing(residual_mod, {"separate": 2.0 if fused_faster else 1.0, "fused": 1.0})


@pytest.mark.parametrize("layer_type", ["bottleneck", "basic"])
@pytest.mark.parametrize("faster", [True, False])
def test_convert_fuses_hf_resnet_blocks_where_faster(timed_faster, monkeypatch, layer_type, faster):
    timed_faster(faster)
    model, x = _resnet(layer_type)
    fast = sp.convert(model, x, time_budget=2.0, end_to_end=False, margin=0.0)
    rows = sp.summary(fast, print_fn=None).totals["residual"]
    sparse_ends = [n for n, m in fast.named_modules() if residual_mod.fusable(m) is not None]
    assert [r["block"] for r in rows] == sparse_ends and sparse_ends  # every candidate checked, none missed
    fused = [n for n, m in fast.named_modules() if residual_mod.KIND_ATTR in m.__dict__]
    assert fused == (sparse_ends if faster else [])
    assert not any(residual_mod.KIND_ATTR in m.__dict__ for m in model.modules())  # source untouched
    with torch.no_grad():
        torch.testing.assert_close(fast(x).last_hidden_state, model(x).last_hidden_state, rtol=1e-4, atol=1e-4)
    if faster:  # the fused forward really takes the one-call path
        mp = pytest.MonkeyPatch()
        calls = []
        orig = sp.SparseConv2d.forward_residual
        mp.setattr(sp.SparseConv2d, "forward_residual", lambda self, *a: calls.append(1) or orig(self, *a))
        try:
            with torch.no_grad():
                fast(x)
        finally:
            mp.undo()
        assert len(calls) == len(fused)


def test_residual_false_and_dense_layers_leave_blocks_alone(timed_faster, monkeypatch):
    timed_faster(True)
    model, x = _resnet("bottleneck")
    fast = sp.convert(model, x, time_budget=1.0, end_to_end=False, residual=False)
    assert not any(residual_mod.KIND_ATTR in m.__dict__ for m in fast.modules())
    dense = sp.convert(model, x, time_budget=1.0, end_to_end=False, formats=("dense",))
    assert not sp.summary(dense, print_fn=None).totals["residual"]


def test_fused_block_falls_back_when_its_conv_is_made_dense_again(timed_faster, monkeypatch):
    """The end-to-end check swaps dense twins in for the sparse layers: the fused block must still compute."""
    timed_faster(True)
    model, x = _resnet("bottleneck")
    fast = sp.convert(model, x, time_budget=2.0, end_to_end=False, margin=0.0)
    name = next(n for n, m in fast.named_modules() if residual_mod.KIND_ATTR in m.__dict__)
    last = fast.get_submodule(name).layer[-1]
    last.convolution = last.convolution.to_dense_module()
    with torch.no_grad():
        torch.testing.assert_close(fast(x).last_hidden_state, model(x).last_hidden_state, rtol=1e-4, atol=1e-4)


def test_save_load_fuses_the_fresh_blocks_again(timed_faster, tmp_path, monkeypatch):
    timed_faster(True)
    model, x = _resnet("bottleneck")
    fast = sp.convert(model, x, time_budget=2.0, end_to_end=False, margin=0.0)
    fused = [n for n, m in fast.named_modules() if residual_mod.KIND_ATTR in m.__dict__]
    assert fused
    sp.save(fast, tmp_path / "m.sp")
    T = pytest.importorskip("transformers")
    torch.manual_seed(1)
    fresh = T.ResNetModel(T.ResNetConfig(embedding_size=16, hidden_sizes=[32, 32], depths=[2, 1],
                                         layer_type="bottleneck"))
    loaded = sp.load(tmp_path / "m.sp", fresh)
    assert [n for n, m in loaded.named_modules() if residual_mod.KIND_ATTR in m.__dict__] == fused
    with torch.no_grad():
        assert torch.equal(loaded(x).last_hidden_state, fast(x).last_hidden_state)


@pytest.mark.parametrize("rows", [
    [{"block": "b", "kept": 1, "separate_ms": 1.0, "fused_ms": 0.5}],
    [{"block": "b", "kept": True, "separate_ms": 1.0}],
    [{"block": ["b"], "kept": True, "separate_ms": 1.0, "fused_ms": 0.5}],
    "b",
])
def test_a_malformed_residual_report_is_refused(rows):
    from sparseprune.convert import check_report
    with pytest.raises(ValueError, match="residual"):
        check_report({"layers": [], "residual": rows})


def test_a_report_naming_other_modules_fuses_nothing():
    """Only names come from a file; a name that is not a fusable block is ignored."""
    model, _ = _resnet("bottleneck")
    before = dict(model.named_modules())
    importlib.import_module("sparseprune.io")._reinstall(model, {"residual": [
        {"block": "embedder", "kept": True, "separate_ms": 1.0, "fused_ms": 0.5},
        {"block": "no.such", "kept": True, "separate_ms": 1.0, "fused_ms": 0.5}]})
    after = dict(model.named_modules())
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)


def test_torch_save_of_a_converted_resnet_after_a_forward(timed_faster, tmp_path, monkeypatch):
    """torch.save pickles with protocol 2: per-input caches are dropped, and a fused block comes back with its
    fused forward (bound to the loaded block, not the saved one)."""
    timed_faster(True)
    model, x = _resnet("bottleneck")
    fast = sp.convert(model, x, time_budget=2.0, end_to_end=False, margin=0.0)
    with torch.no_grad():
        want = fast(x).last_hidden_state  # fills the conv plans' caches
    assert any("_cache_conv_plan" in m.__dict__ for m in fast.modules())
    torch.save(fast, tmp_path / "m.pt")
    back = torch.load(tmp_path / "m.pt", weights_only=False)
    fused = [n for n, m in fast.named_modules() if residual_mod.KIND_ATTR in m.__dict__]
    assert fused
    for n in fused:
        m = back.get_submodule(n)
        assert type(m.__dict__["forward"]) is residual_mod.BoundForward and m.forward.__self__ is m
    with torch.no_grad():
        assert torch.equal(back(x).last_hidden_state, want)


def test_fused_block_output_check_uses_the_quantized_criterion_only_for_quantized_blocks():
    """A block holding int8 layers may differ by one int8 rounding step after a last-bit change upstream:
    the check is then the relative L2 error against the quantized tolerance; float blocks keep the strict one."""
    fp = nn.Sequential(nn.Linear(8, 8))
    q = nn.Sequential(nn.Linear(8, 8))
    q[0].weight_dtype = "int8"  # what a quantized sparse layer reports
    ref = torch.randn(4, 16, 8)
    flip = ref.clone()
    flip[0, 0, 0] += 4e-3 * ref.abs().max()  # one rounding step of an int8 activation, far above 1e-4
    garbage = torch.randn_like(ref)
    assert not residual_mod._matches(flip, ref, fp, 1e-4, 0.25)
    assert residual_mod._matches(flip, ref, q, 1e-4, 0.25)
    assert not residual_mod._matches(garbage, ref, q, 1e-4, 0.25)
    assert not residual_mod._matches(flip, ref, q, 1e-4, None)  # no quantized tolerance given: the strict check
    assert residual_mod._matches(ref.clone(), ref, fp, 1e-4, 0.25)


@pytest.mark.parametrize("block", [(8, 8), (16, 16)])
@pytest.mark.parametrize("cout", [20, 40])
@pytest.mark.parametrize("k,s,h,w", [(1, 1, 9, 13), (3, 1, 10, 21), (3, 2, 17, 19)])
@pytest.mark.parametrize("act", ["none", "relu", "gelu"])
def test_channels_last_output_through_the_transposing_store(isa, block, cout, k, s, h, w, act):
    """channels_last outputs of 8-channel tiles go out eight pixels at a time through a transpose (runs of 8
    valid columns of one output row; the rest pixel by pixel), with the residual and activation applied
    there: widths that leave partial runs, row wrap-around, stride 2, partial block rows (cout 20)."""
    conv = _conv(24, cout, k, s, k // 2, 1, block, 0.4, cout + k + s, True)
    sc = sp.SparseConv2d.from_dense(conv, format="bsr", block_size=block)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 24, h, w, generator=g).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        y = conv(x)
        r = torch.randn(y.shape, generator=g).contiguous(memory_format=torch.channels_last)
        ref = ops.apply_activation(y.double() + r.double(), act)
        torch.testing.assert_close(sc(x).double(), y.double(), rtol=1e-4, atol=1e-4)
        got = sc.forward_residual(x, r, act)
    assert got.stride() == y.stride()
    torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("act", ["none", "relu", "gelu"])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("block,cin,cout", [((16, 16), 48, 40), ((8, 8), 24, 20), ((4, 4), 12, 10), ((16, 16), 40, 19)])
@pytest.mark.parametrize("kernel", list(ops.KERNELS))
def test_channels_last_1x1_residual_in_the_linear_store(isa, kernel, block, cin, cout, stride, act, monkeypatch):
    # a 1x1 conv on channels_last input and residual runs the Linear kernels with the residual added in their
    # store (the broadcast family) or in one pass after them (the others): every kernel variant, stride 2,
    # block rows of 16 / 8 / 4 and a partial one, no PyTorch epilogue
    conv = _conv(cin, cout, 1, stride, 0, 1, block, 0.5, cin + cout)
    sc = sp.SparseConv2d.from_dense(conv, format="bsr", block_size=block)
    sc.kernel = kernel
    g = torch.Generator().manual_seed(cout)
    x = torch.randn(2, cin, 9, 7, generator=g).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        y = conv(x)
        r = torch.empty_like(y).copy_(torch.randn(y.shape, generator=g))
        ref = ops.apply_activation(y.double() + r.double(), act)
        calls = []
        kern, kern_res = sp._C.spmm, sp._C.spmm_res
        monkeypatch.setattr(sp._C, "spmm", lambda *a: calls.append(False) or kern(*a))
        monkeypatch.setattr(sp._C, "spmm_res", lambda *a: calls.append(True) or kern_res(*a))
        _no_torch_epilogue(monkeypatch)
        got = sc.forward_residual(x, r, act)
        again = sc.forward_residual(x, r, act)  # stride 1: through the arguments the first call kept
    assert calls == [True, True]  # the Linear route, residual in the kernel
    assert torch.equal(again, got)
    assert got.shape == ref.shape and got.stride() == y.stride()
    torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-4)


def test_channels_last_1x1_with_an_nchw_residual_takes_the_conv_kernel(monkeypatch):
    conv = _conv(32, 32, 1, 1, 0, 1, (16, 16), 0.5, 1)
    sc = sp.SparseConv2d.from_dense(conv, format="bsr", block_size=(16, 16))
    x = torch.randn(1, 32, 6, 5).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        y = conv(x)
        r = torch.randn(y.shape)  # NCHW: not the output's layout
        monkeypatch.setattr(ops, "spmm_eager", lambda *a, **k: pytest.fail("took the Linear route"))
        got = sc.forward_residual(x, r, "relu")
    torch.testing.assert_close(got, torch.relu(y + r), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("act", ["none", "relu", "silu"])
@pytest.mark.parametrize("geom", [(1, 1, 0, 1), (1, 2, 0, 1), (3, 1, 1, 1), (3, 2, 1, 1), (3, 1, 2, 2), (1, 1, 1, 1)],
                         ids=lambda g: "k{}s{}p{}d{}".format(*g))
@pytest.mark.parametrize("dtype", [torch.int8, torch.bfloat16])
def test_quantized_channels_last_residual_in_the_store(dtype, geom, act, monkeypatch):
    # int8 / bf16 conv on channels_last input and residual: the quantized kernel (over the kept pixels for a plain
    # 1x1 conv, over the implicit im2col rows otherwise) with the residual added in its store: the same numbers
    # as the conv, then + residual, then the activation (bit for bit without the activation and with ReLU)
    k, s, p, d = geom
    conv = _conv(48, 40, k, s, p, d, (16, 16), 0.5, 7)
    sc = sp.SparseConv2d.from_dense(conv, format="bsr", block_size=(16, 16), weight_dtype=dtype)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 48, 9, 7, generator=g).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        y = sc(x)
        r = torch.empty_like(y).copy_(torch.randn(y.shape, generator=g))
        want = ops.apply_activation(y + r, act)
        calls = []
        plain = (k, p, d) == (1, 0, 1)
        name = "qspmm_eager" if plain else "qconv_im2col_eager"
        kernel = getattr(sp.quant, name)
        monkeypatch.setattr(sp.quant, name,
                            lambda *a, **kw: calls.append(kw.get("residual") is not None) or kernel(*a, **kw))
        got = sc.forward_residual(x, r, act)
    assert calls == [True]
    assert got.shape == y.shape and got.stride() == y.stride()
    if act == "silu":
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    else:
        assert torch.equal(got, want)
    with torch.no_grad():  # an NCHW residual: PyTorch adds it (the same values)
        monkeypatch.setattr(sp.quant, name, kernel)
        torch.testing.assert_close(sc.forward_residual(x, r.contiguous(), act), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("act", ["identity", "gelu", "silu", "tanh"])
def test_fused_block_follows_an_activation_replaced_after_convert(timed_faster, act):
    """The fused end applies the block's activation as it is now (it applied the one fused at convert: ReLU after
    the activation was replaced by Identity, GELU or SiLU)."""
    timed_faster(True)
    model, x = _resnet("bottleneck")
    fast = sp.convert(model, x, time_budget=2.0, end_to_end=False, margin=0.0)
    fused = [n for n, m in fast.named_modules() if residual_mod.KIND_ATTR in m.__dict__]
    assert fused
    new = {"identity": nn.Identity, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}[act]
    with torch.no_grad():
        for n in fused:
            fast.get_submodule(n).activation = new()
            model.get_submodule(n).activation = new()
        torch.testing.assert_close(fast(x).last_hidden_state, model(x).last_hidden_state, rtol=1e-4, atol=1e-4)
