"""Hugging Face Conv1D (GPT-2's Linear, weight stored as (in, out)): pruned as the Linear of weight.T, converted to
a SparseLinear of weight.T, saved and loaded; a pruner that finds no layer to prune says so."""
import copy
import importlib
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch import nn

import sparseprune as sp
from sparseprune.prune import masks

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402
from test_conv1d_criteria import linearized  # noqa: E402

decide_mod = importlib.import_module("sparseprune.convert.decide")
registry = importlib.import_module("sparseprune.convert.registry")

pytestmark = pytest.mark.usefixtures("one_thread")

SUBLAYERS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
NAMES = [f"h.{i}.{s}" for i in range(2) for s in SUBLAYERS]


def gpt2(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=100, n_layer=2, n_embd=64, n_head=4, n_positions=64,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2Model(cfg).eval()


def ids(seed: int = 1, batch: int = 3, length: int = 7) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, 100, (batch, length), generator=g)}


def out(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).last_hidden_state




@pytest.fixture
def timing(monkeypatch):
    """``timing(rule)``: convert's per-layer timing returns ``rule(label)`` seconds for each candidate (each call
    still runs once), so the keep-if-faster choice is fixed whatever the machine's load."""
    def install(rule):
        def fake(calls, *a, **k):
            for fn in calls.values():
                fn()
            return {lab: rule(lab) for lab in calls}
        monkeypatch.setattr(decide_mod, "time_calls", fake)
    return install


def sparse_wins(lab):
    return 1.0 if lab == "dense" else 0.1


def int8_wins(lab):
    return 1.0 if lab == "dense" else 0.01 if "int8" in lab else 0.1


def dense_wins(lab):
    return 0.1 if lab == "dense" else 1.0


# -- pruning ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sparsity", [0.5, 0.75])
def test_prune_blocks_on_weight_t(sparsity):
    m = gpt2()
    r, c = 32, 4  # not square: blocks taken on the stored (in, out) weight would be 4 x 32 on weight.T
    sp.prune_blocks(m, sparsity=sparsity, block_size=(r, c), dense_first_last=False)
    for name in NAMES:
        conv = m.get_submodule(name)
        mask = masks.get_mask(conv)
        assert mask is not None and mask.shape == conv.weight.shape, name
        w = conv.weight.detach().t()  # (out, in)
        assert (w == 0).float().mean().item() == sparsity, name
        o, i = w.shape
        nz = (w != 0).reshape(o // r, r, i // c, c).permute(0, 2, 1, 3).reshape(o // r, i // c, -1)
        assert bool((nz.all(-1) | ~nz.any(-1)).all()), f"{name}: a {r}x{c} block of weight.T is partly pruned"
        assert torch.equal(mask.t(), w != 0)


def test_prune_nm_groups_along_input_features():
    m = gpt2()
    sp.prune_nm(m, n=2, m=4, dense_first_last=False)
    for name in NAMES:
        w = m.get_submodule(name).weight.detach().t()  # (out, in): groups of 4 consecutive input features
        kept = (w != 0).reshape(w.shape[0], -1, 4).sum(-1)
        assert bool((kept == 2).all()), name


def test_prune_unstructured_sparsity_and_default_selection():
    m = gpt2()
    sp.prune_unstructured(m, sparsity=0.6)
    got = sp.prune.layer_sparsity(m)
    assert set(NAMES) <= set(got)
    # dense_first_last (the default without layers=) keeps the last layer dense, as for a Linear
    assert got["h.1.mlp.c_proj"] == 0.0 and not sp.prune.is_masked(m.get_submodule("h.1.mlp.c_proj"))
    for name in NAMES[:-1]:
        assert got[name] == pytest.approx(0.6, abs=1e-4), name
    assert list(sp.prune.select_layers(m, layers="h.0.attn.*")) == ["h.0.attn.c_attn", "h.0.attn.c_proj"]


@pytest.mark.parametrize("how", [
    dict(fn="blocks", kw=dict(sparsity=0.5, block_size=(32, 4))),
    dict(fn="blocks", kw=dict(sparsity=0.6, block_size=(16, 16), scope="global")),
    dict(fn="unstructured", kw=dict(sparsity=0.7)),
    dict(fn="nm", kw=dict(n=1, m=4)),
    dict(fn="unstructured", kw=dict(sparsity=0.5, importance="wanda")),
    dict(fn="unstructured", kw=dict(sparsity=0.5, importance="sparsegpt")),
    dict(fn="nm", kw=dict(n=2, m=4, importance="sparsegpt")),
])
def test_conv1d_prunes_as_the_linear_of_its_transpose(how):
    """Every pruner gives a Conv1D the transpose of what it gives the equivalent nn.Linear (weight.T)."""
    fn = {"blocks": sp.prune_blocks, "unstructured": sp.prune_unstructured, "nm": sp.prune_nm}[how["fn"]]
    kw = dict(how["kw"], dense_first_last=False)
    if kw.get("importance") in ("wanda", "sparsegpt"):
        kw["calibration"] = [ids(2), ids(3)]
    m = gpt2()
    lin = linearized(m)
    fn(m, **kw)
    fn(lin, **kw)
    for name in NAMES:
        c, li = m.get_submodule(name), lin.get_submodule(name)
        assert torch.equal(masks.get_mask(c).t(), masks.get_mask(li)), name
        torch.testing.assert_close(c.weight.detach().t(), li.weight.detach(), rtol=1e-5, atol=1e-6)


def test_pruned_model_equals_dense_reference_on_masked_weights():
    m = gpt2()
    ref = copy.deepcopy(m)
    sp.prune_blocks(m, sparsity=0.75, block_size=(16, 16), dense_first_last=False)
    with torch.no_grad():
        for name in NAMES:
            ref.get_submodule(name).weight.mul_(masks.get_mask(m.get_submodule(name)))
    x = ids()
    torch.testing.assert_close(out(m, x), out(ref, x), rtol=0, atol=0)
    # one Conv1D by hand: x @ (W * mask) + b, the Linear F.linear(x, (W * mask).T, b)
    c = m.get_submodule("h.0.mlp.c_fc")
    h = torch.randn(5, 64)
    wm = c.weight.detach() * masks.get_mask(c)
    torch.testing.assert_close(c(h), F.linear(h, wm.t(), c.bias))
    # the mask survives training: an optimizer step cannot revive a pruned weight
    m.train()
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    m(**x).last_hidden_state.pow(2).mean().backward()
    opt.step()
    for name in NAMES:
        conv = m.get_submodule(name)
        assert bool((conv.weight.detach()[~masks.get_mask(conv)] == 0).all()), name


# -- convert --------------------------------------------------------------------------------------------
def pruned_gpt2(**kw):
    m = gpt2()
    sp.prune_blocks(m, sparsity=0.8, block_size=(16, 16), dense_first_last=False, **kw)
    return m


def test_convert_fp32_matches_pruned_model(timing):
    timing(sparse_wins)
    m, x = pruned_gpt2(), ids()
    fast = sp.convert(m, x, cache=False, end_to_end=False)
    torch.testing.assert_close(out(fast, x), out(m, x), rtol=1e-4, atol=1e-5)
    rows = {r["name"]: r for r in sp.summary(fast, print_fn=None)}
    for name in NAMES:
        mod = fast.get_submodule(name)
        assert isinstance(mod, sp.SparseLinear) and mod.format == "bsr", name
        w = m.get_submodule(name).weight.detach()
        assert (mod.in_features, mod.out_features) == tuple(w.shape)
        assert rows[name]["type"] == "Conv1D" and rows[name]["format"] != "dense"
        assert rows[name]["shape"] == [w.shape[1], w.shape[0]]
    assert sp.summary(fast, print_fn=None).totals["sparse_layers"] == len(NAMES)


def test_convert_fuses_the_activation_after_a_conv1d(timing, tmp_path):
    # (GPT-2's own NewGELUActivation is not fused: the proof rejects it for an nn.Linear producer as well)
    timing(sparse_wins)
    torch.manual_seed(4)
    m = nn.Sequential(Conv1D(64, 32), nn.GELU(approximate="tanh"), Conv1D(16, 64))
    sp.prune_blocks(m, sparsity=0.75, block_size=(16, 16), dense_first_last=False)
    x = torch.randn(6, 32)
    fast = sp.convert(m, x, cache=False, end_to_end=False)
    assert isinstance(fast[0], sp.SparseLinear) and fast[0].activation == "gelu_tanh"
    assert isinstance(fast[1], nn.Identity)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), m(x), rtol=1e-4, atol=1e-5)
    sp.save(fast, tmp_path / "f.sp")
    loaded = sp.load(tmp_path / "f.sp", nn.Sequential(Conv1D(64, 32), nn.GELU(approximate="tanh"), Conv1D(16, 64)))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), fast(x), rtol=0, atol=0)


def test_convert_measured_and_heuristic_match_pruned_model():
    m, x = pruned_gpt2(), ids()
    fast = sp.convert(m, x, time_budget=2.0)  # whatever the timings choose, outputs match (checked by convert too)
    torch.testing.assert_close(out(fast, x), out(m, x), rtol=1e-4, atol=1e-5)
    heur = sp.convert(m)  # no example inputs: choose_format picks BSR for a 16x16 pattern at 80%
    torch.testing.assert_close(out(heur, x), out(m, x), rtol=1e-4, atol=1e-5)
    rows = {r["name"]: r for r in sp.summary(heur, print_fn=None)}
    assert all(rows[n]["format"] == "bsr" and rows[n]["block"] == [16, 16] for n in NAMES)


def test_convert_int8_matches_pruned_model_and_round_trips(timing, tmp_path):
    timing(int8_wins)
    m, x = pruned_gpt2(), ids()
    fast = sp.convert(m, x, cache=False, end_to_end=False, weight_dtypes=(torch.float32, torch.int8))
    for name in NAMES:
        assert fast.get_submodule(name).weight_dtype == "int8", name
    ref, got = out(m, x), out(fast, x)
    assert float((got - ref).norm() / ref.norm()) < 0.05
    sp.save(fast, tmp_path / "q.sp")
    loaded = sp.load(tmp_path / "q.sp", gpt2(seed=5))
    assert all(loaded.get_submodule(n).weight_dtype == "int8" for n in NAMES)
    torch.testing.assert_close(out(loaded, x), got, rtol=0, atol=0)


@pytest.mark.parametrize("fmt, block, dtype", [
    ("dense", None, torch.float32), ("csr", None, torch.float32), ("bsr", (16, 16), torch.float32),
    ("bsr", (4, 8), torch.float32), ("bsr", (16, 16), torch.int8), ("bsr", (16, 16), torch.bfloat16),
    ("dense", None, torch.bfloat16)])
def test_conv1d_converter_every_format(fmt, block, dtype):
    torch.manual_seed(3)
    c = Conv1D(48, 40)  # nf = 48 outputs, nx = 40 inputs: weight (40, 48)
    with torch.no_grad():
        c.bias.normal_()
    sp.prune_blocks(nn.Sequential(c), sparsity=0.7, block_size=(8, 8), dense_first_last=False, misfit="shrink")
    assert sp.prune.is_masked(c)
    cv = registry.converter_for(c)
    assert cv is not None and cv.sparse_type is sp.SparseLinear
    assert tuple(cv.pattern(c).shape) == (48, 40)
    args = () if dtype == torch.float32 else (dtype,)
    s = cv.build(c, fmt, block, None, *args)
    assert isinstance(s, sp.SparseLinear) and (s.in_features, s.out_features) == (40, 48) and s.format == fmt
    x = torch.randn(2, 5, 40)
    with torch.no_grad():
        ref, got = c(x), s(x)
    if dtype == torch.float32:
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    else:
        assert float((got - ref).norm() / ref.norm()) < 0.05
    fused = sp.SparseLinear.from_dense(registry._conv1d_as_linear(c), format=fmt,
                                       block_size=block if fmt == "bsr" else None, weight_dtype=dtype,
                                       activation="gelu_tanh")
    want = F.gelu(ref, approximate="tanh")
    with torch.no_grad():
        err = float((fused(x) - want).norm() / want.norm())
    assert err < (1e-5 if dtype == torch.float32 else 0.05)


def test_dense_choice_keeps_a_plain_conv1d(timing):
    timing(dense_wins)
    m, x = pruned_gpt2(), ids()
    fast = sp.convert(m, x, cache=False, end_to_end=False)
    for name in NAMES:
        mod, src = fast.get_submodule(name), m.get_submodule(name)
        assert type(mod) is Conv1D and not sp.prune.is_masked(mod) and not mod._forward_pre_hooks, name
        assert torch.equal(mod.weight, src.weight) and torch.equal(mod.bias, src.bias)
    torch.testing.assert_close(out(fast, x), out(m, x), rtol=0, atol=0)
    rows = {r["name"]: r for r in sp.summary(fast, print_fn=None)}
    assert all(rows[n]["format"] == "dense" and rows[n]["type"] == "Conv1D" for n in NAMES)


def test_summary_of_an_unconverted_gpt2_lists_conv1d():
    m = pruned_gpt2()
    rows = {r["name"]: r for r in sp.summary(m, print_fn=None)}
    zeros = sp.prune.layer_sparsity(m)
    for name in NAMES:
        assert rows[name]["type"] == "Conv1D" and rows[name]["shape"] == list(m.get_submodule(name).weight.t().shape)
        assert rows[name]["density"] == pytest.approx(1 - zeros[name]) and rows[name]["density"] < 0.25, name
    assert sp.prune.sparsity(m) == pytest.approx(0.8, abs=0.02)


# -- save / load ----------------------------------------------------------------------------------------
def test_save_load_round_trip_converted(tmp_path, timing):
    timing(sparse_wins)
    m, x = pruned_gpt2(), ids()
    fast = sp.convert(m, x, cache=False, end_to_end=False)
    path = tmp_path / "gpt2.sp"
    sp.save(fast, path)
    loaded = sp.load(path, gpt2(seed=7))
    for name in NAMES:
        a, b = fast.get_submodule(name), loaded.get_submodule(name)
        assert type(a) is type(b) is sp.SparseLinear and a.format == b.format and a.activation == b.activation
    torch.testing.assert_close(out(loaded, x), out(fast, x), rtol=0, atol=0)
    rows = {r["name"]: r for r in sp.summary(loaded, print_fn=None)}
    assert all(rows[n]["type"] == "Conv1D" and rows[n]["format"] == "bsr" for n in NAMES)


def test_save_load_round_trip_mixed(tmp_path, timing):
    # attention layers sparse, MLP layers unpruned and kept as they are (Conv1D): both kinds in one file
    timing(sparse_wins)
    m, x = gpt2(), ids()
    sp.prune_blocks(m, sparsity=0.8, block_size=(16, 16), layers="h.*.attn.*")
    fast = sp.convert(m, x, cache=False, end_to_end=False)
    assert type(fast.get_submodule("h.0.mlp.c_fc")) is Conv1D
    assert isinstance(fast.get_submodule("h.0.attn.c_attn"), sp.SparseLinear)
    path = tmp_path / "gpt2m.sp"
    sp.save(fast, path)
    loaded = sp.load(path, gpt2(seed=5))
    assert type(loaded.get_submodule("h.1.mlp.c_proj")) is Conv1D
    assert isinstance(loaded.get_submodule("h.1.attn.c_proj"), sp.SparseLinear)
    torch.testing.assert_close(out(loaded, x), out(fast, x), rtol=0, atol=0)


def test_save_load_round_trip_masked_checkpoint(tmp_path):
    m, x = pruned_gpt2(), ids()
    path = tmp_path / "ckpt.sp"
    sp.save(m, path)
    loaded = sp.load(path, gpt2(seed=9))
    for name in NAMES:
        assert torch.equal(masks.get_mask(loaded.get_submodule(name)), masks.get_mask(m.get_submodule(name)))
    torch.testing.assert_close(out(loaded, x), out(m, x), rtol=0, atol=0)


def test_load_refuses_a_conv1d_of_another_size(tmp_path, timing):
    timing(sparse_wins)
    m, x = pruned_gpt2(), ids()
    fast = sp.convert(m, x, cache=False, end_to_end=False)
    assert isinstance(fast.get_submodule("h.0.mlp.c_fc"), sp.SparseLinear)
    path = tmp_path / "gpt2.sp"
    sp.save(fast, path)
    cfg = transformers.GPT2Config(vocab_size=100, n_layer=2, n_embd=64, n_head=4, n_positions=64, n_inner=128,
                                  bos_token_id=0, eos_token_id=0)
    with pytest.raises(ValueError, match=r"mlp\.c_fc in the file .*does not fit this architecture's Conv1D"):
        sp.load(path, transformers.GPT2Model(cfg))


# -- nothing to prune ----------------------------------------------------------------------------------
@pytest.mark.parametrize("fn", [lambda m: sp.prune_blocks(m, 0.5), lambda m: sp.prune_unstructured(m, 0.5),
                                lambda m: sp.prune_nm(m, 2, 4)])
def test_warns_when_no_layer_can_be_pruned(fn):
    m = nn.Sequential(nn.Embedding(10, 8), nn.Conv1d(8, 8, 3))
    with pytest.warns(UserWarning, match=r"pruned nothing.*Embedding, Conv1d"):
        assert fn(m) is m
    with pytest.warns(UserWarning, match=r"pruned nothing.*holds no weight of 2 or more dimensions"):
        fn(nn.Sequential())
    with warnings.catch_warnings():  # GPT-2 has layers to prune now: no such warning
        warnings.simplefilter("error")
        fn(gpt2())


# -- property: a bare Conv1D of any size ----------------------------------------------------------------
@settings(max_examples=20, deadline=None)
@given(nx=st.integers(1, 40), nf=st.integers(1, 40), sparsity=st.floats(0.0, 1.0),
       kind=st.sampled_from(["unstructured", "blocks", "nm"]), r=st.integers(1, 8), c=st.integers(1, 8),
       seed=st.integers(0, 2 ** 16))
def test_property_bare_conv1d(nx, nf, sparsity, kind, r, c, seed):
    torch.manual_seed(seed)
    conv = Conv1D(nf, nx)
    with torch.no_grad():
        conv.bias.normal_()
    if kind == "unstructured":
        sp.prune_unstructured(conv, sparsity, dense_first_last=False)
    elif kind == "blocks":
        sp.prune_blocks(conv, sparsity, block_size=(r, c), dense_first_last=False, misfit="shrink")
    else:
        sp.prune_nm(conv, n=min(r, c), m=max(r, c), dense_first_last=False)
    mask = masks.get_mask(conv)
    assert mask is not None and mask.shape == (nx, nf)
    w = conv.weight.detach()
    assert bool((w[~mask] == 0).all())
    keep = mask.t()  # (out, in)
    zeros = int((~keep).sum())
    if kind == "unstructured":
        assert zeros == round(sparsity * nx * nf)
    elif kind == "blocks":
        rr, cc = min(r, nf), min(c, nx)
        assert abs(zeros - sparsity * nx * nf) <= rr * cc / 2 + 1e-6
        for bi in range(math.ceil(nf / rr)):
            for bj in range(math.ceil(nx / cc)):
                blk = keep[bi * rr:(bi + 1) * rr, bj * cc:(bj + 1) * cc]
                assert bool(blk.all() or not blk.any())
    else:
        n, m_ = min(r, c), max(r, c)
        for j in range(0, nx, m_):
            grp = keep[:, j:j + m_]
            assert bool((grp.sum(1) == min(n, grp.shape[1])).all())
    x = torch.randn(3, nx)
    torch.testing.assert_close(conv(x), F.linear(x, (w * mask).t(), conv.bias))
    s = registry.converter_for(conv).build(conv, "csr", None, None)
    torch.testing.assert_close(s(x), conv(x), rtol=1e-4, atol=1e-5)


class _Conv1DLookalike(nn.Module):  # named Conv1D, not transformers': other arguments, and a scale of its own
    def __init__(self, nx, nf, scale):
        super().__init__()
        self.nf, self.scale = nf, scale
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.1)
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x):
        return self.scale * (x @ self.weight + self.bias)


_Conv1DLookalike.__name__ = _Conv1DLookalike.__qualname__ = "Conv1D"


def test_a_class_named_conv1d_outside_transformers_is_left_alone():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(32, 64), _Conv1DLookalike(64, 48, 3.0), nn.ReLU(), nn.Linear(48, 8)).eval()
    ref = copy.deepcopy(m)
    sp.prune_unstructured(m, sparsity=0.5, dense_first_last=False)
    assert torch.equal(m[1].weight, ref[1].weight)  # not pruned: not a layer the pruners know
    x = torch.randn(5, 32)
    with torch.no_grad():
        want = m(x)
        c = sp.convert(m, x, end_to_end=False, time_budget=2.0)
        torch.testing.assert_close(c(x), want, rtol=1e-4, atol=1e-5)
    assert type(c[1]) is _Conv1DLookalike and c[1].scale == 3.0


def test_pruning_a_tied_layer_warns_that_the_embedding_goes_with_it():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    m = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=100, n_layer=1, n_embd=64, n_head=4,
                                                             n_positions=32)).eval()
    assert m.lm_head.weight is m.transformer.wte.weight
    with pytest.warns(UserWarning, match=r"'lm_head' \(with 'transformer.wte'\).*shared"):
        sp.prune_unstructured(m, sparsity=0.5, dense_first_last=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the default keeps the head dense: nothing tied is pruned, no warning
        sp.prune_unstructured(transformers.GPT2LMHeadModel(m.config).eval(), sparsity=0.5)
