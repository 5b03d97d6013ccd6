"""Hugging Face Conv1D (GPT-2's Linear, weight stored (in, out)) in the penalties, criteria, distill and convert's
bare-layer refusal: each gives a Conv1D exactly what it gives the nn.Linear of weight.T (transposed back)."""
import copy
import importlib

import pytest
import torch
from torch import nn

import sparseprune as sp
from sparseprune.prune import criteria as C
from sparseprune.prune import masks, regularize

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402

distill_mod = importlib.import_module("sparseprune.distill")

pytestmark = pytest.mark.usefixtures("one_thread")

SUBLAYERS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
NAMES = [f"h.{i}.{s}" for i in range(2) for s in SUBLAYERS]
BLOCK = (32, 4)  # not square: taken on the stored (in, out) weight it would group other weights


class Bare(nn.Module):
    """One Conv1D (nf = 48 outputs, nx = 40 inputs: weight (40, 48)) inside a module."""

    def __init__(self):
        super().__init__()
        self.c = Conv1D(48, 40)
        with torch.no_grad():
            self.c.bias.normal_()

    def forward(self, x):
        return self.c(x)


def bare(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return Bare()


def gpt2(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=100, n_layer=2, n_embd=64, n_head=4, n_positions=64,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2Model(cfg).eval()


def conv1d_names(model: nn.Module):
    return [n for n, m in model.named_modules() if isinstance(m, Conv1D)]


def linearized(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every Conv1D replaced by the nn.Linear it computes (weight.T)."""
    lin = copy.deepcopy(model)
    for name in conv1d_names(model):
        c = lin.get_submodule(name)
        new = nn.Linear(c.weight.shape[0], c.weight.shape[1])
        with torch.no_grad():
            new.weight.copy_(c.weight.t())
            new.bias.copy_(c.bias)
        parent, _, leaf = name.rpartition(".")
        setattr(lin.get_submodule(parent) if parent else lin, leaf, new)
    return lin


def batch(model: nn.Module, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    if isinstance(model, Bare):
        return torch.randn(3, 5, 40, generator=g)
    return {"input_ids": torch.randint(0, 100, (3, 7), generator=g)}


def run(model: nn.Module, b) -> torch.Tensor:
    out = model(**b) if isinstance(b, dict) else model(b)
    return out if isinstance(out, torch.Tensor) else out.last_hidden_state


def twins(kind: str):
    m = bare() if kind == "bare" else gpt2()
    return m, linearized(m), conv1d_names(m)


def assert_transposed_masks(m, lin, names):
    for name in names:
        got, want = masks.get_mask(m.get_submodule(name)), masks.get_mask(lin.get_submodule(name))
        assert got is not None and want is not None, name
        assert torch.equal(got.t(), want), name


# -- 1. penalties --------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["bare", "gpt2"])
@pytest.mark.parametrize("groups, block", [("blocks", BLOCK), ("blocks", (8, 5)), ("channels", None),
                                           ("in_channels", None)])
@pytest.mark.parametrize("normalize", [True, False])
def test_penalties_equal_the_linear_twins(kind, groups, block, normalize):
    m, lin, names = twins(kind)
    kw = dict(groups=groups, block_size=block or (16, 16), normalize=normalize, dense_first_last=False)
    got, want = regularize.group_lasso(m, **kw), regularize.group_lasso(lin, **kw)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
    for fn in (regularize.l1_penalty, regularize.l2_penalty):
        torch.testing.assert_close(fn(m, dense_first_last=False), fn(lin, dense_first_last=False), rtol=1e-5, atol=0)
    (got + regularize.l1_penalty(m, dense_first_last=False)).backward()
    (want + regularize.l1_penalty(lin, dense_first_last=False)).backward()
    for name in names:
        g, gl = m.get_submodule(name).weight.grad, lin.get_submodule(name).weight.grad
        torch.testing.assert_close(g.t(), gl, rtol=1e-5, atol=1e-7)


def test_group_lasso_drives_the_linear_twins_blocks_to_zero():
    """A few steps of the penalty alone shrink the same (out, in) blocks of weight.T as of the Linear's weight."""
    m, lin, names = twins("bare")
    for net in (m, lin):
        opt = torch.optim.SGD(net.parameters(), lr=0.05)
        for _ in range(5):
            opt.zero_grad()
            regularize.group_lasso(net, block_size=(16, 8), dense_first_last=False).backward()
            opt.step()
    w, wl = m.c.weight.detach(), lin.c.weight.detach()
    torch.testing.assert_close(w.t(), wl, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(regularize.group_norms(w.t(), "blocks", (16, 8)),
                               regularize.group_norms(wl, "blocks", (16, 8)))


# -- 2. criteria ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["bare", "gpt2"])
@pytest.mark.parametrize("how", ["taylor", "movement"])
def test_gradient_scores_default_selection(kind, how):
    m, lin, names = twins(kind)
    sc, scl = C.GradientScores(m, kind=how), C.GradientScores(lin, kind=how)
    assert set(names) <= set(sc.modules)
    for net in (m, lin):
        for seed in (1, 2):
            net.zero_grad()
            run(net, batch(net, seed)).pow(2).mean().backward()
    for name in names:
        s, sl = sc.score(name, m.get_submodule(name)), scl.score(name, lin.get_submodule(name))
        assert s.shape == m.get_submodule(name).weight.shape  # the stored layout, as prune_* takes it
        torch.testing.assert_close(s.t(), sl, rtol=1e-4, atol=1e-9)
    sp.prune_blocks(m, sparsity=0.5, block_size=BLOCK, importance=sc, dense_first_last=False)
    sp.prune_blocks(lin, sparsity=0.5, block_size=BLOCK, importance=scl, dense_first_last=False)
    assert_transposed_masks(m, lin, names)
    sc.close()
    scl.close()


@pytest.mark.parametrize("kind", ["bare", "gpt2"])
def test_wanda_element_scores_and_running_wanda(kind):
    """criteria's wanda (column norms) and distill's running wanda, shaped like the stored weight."""
    m, lin, names = twins(kind)
    data = [batch(m, 1), batch(m, 2)]
    got = C.collect_activation_stats(m, {n: m.get_submodule(n) for n in names}, data)
    want = C.collect_activation_stats(lin, {n: lin.get_submodule(n) for n in names}, data)
    rw = distill_mod._RunningWanda({n: m.get_submodule(n) for n in names})
    rwl = distill_mod._RunningWanda({n: lin.get_submodule(n) for n in names})
    for net in (m, lin):
        for b in data:
            run(net, b)  # (grad enabled: the running statistics are gathered from training forwards)
    rw.close()
    rwl.close()
    for name in names:
        c, li = m.get_submodule(name), lin.get_submodule(name)
        s = C.element_scores("wanda", name, c, got[name])
        assert s.shape == c.weight.shape
        torch.testing.assert_close(s.t(), C.element_scores("wanda", name, li, want[name]), rtol=1e-5, atol=1e-7)
        r = rw(name, c)
        assert r.shape == c.weight.shape
        torch.testing.assert_close(r.t(), rwl(name, li), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(r, s, rtol=1e-5, atol=1e-7)
    # as an importance callable the running scores prune as the pruners' own wanda does
    sp.prune_unstructured(m, sparsity=0.5, importance=rw, dense_first_last=False)
    sp.prune_unstructured(lin, sparsity=0.5, importance=rwl, dense_first_last=False)
    assert_transposed_masks(m, lin, names)


# -- 3. distill ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("importance", ["wanda", "taylor", "movement"])
@pytest.mark.parametrize("pattern, kw", [("blocks", dict(block_size=BLOCK)), ("unstructured", {})])
def test_distill_gpt2_masks_are_the_linear_twins_transposed(importance, pattern, kw):
    m, lin, names = twins("gpt2")
    data = [batch(m, s) for s in range(1, 5)]
    run_kw = dict(sparsity=0.6, pattern=pattern, init="wanda", init_sparsity=0.2, importance=importance, steps=8,
                  prune_end=0.75, prune_events=3, lr=1e-3, calibration_batches=2, progress=False, **kw)
    sp.distill(m, data, **run_kw)
    sp.distill(lin, data, **run_kw)
    done = [n for n in names if masks.get_mask(m.get_submodule(n)) is not None]
    assert done == names[:-1]  # dense_first_last: the last layer stays dense, as the Linear twin's
    assert_transposed_masks(m, lin, done)
    assert len(m._sparseprune_distill["events"]) >= 2  # scheduled events after the initial mask
    assert sp.prune.sparsity(m) == pytest.approx(sp.prune.sparsity(lin))


def test_depth_ramp_lists_conv1d_layers():
    m, lin, names = twins("gpt2")
    ramp = sp.depth_ramp(m, 0.5, pattern=r"^h\.(\d+)\.")
    assert ramp == sp.depth_ramp(lin, 0.5, pattern=r"^h\.(\d+)\.")
    assert ramp == {n: (1.5 if n.startswith("h.0.") else 0.5) for n in names}
    data = [batch(m, s) for s in range(1, 3)]
    run_kw = dict(sparsity=0.5, pattern="unstructured", init="wanda", steps=2, layer_scale=ramp,
                  dense_first_last=False, progress=False)
    sp.distill(m, data, **run_kw)
    sp.distill(lin, data, **run_kw)
    assert_transposed_masks(m, lin, names)
    zeros = sp.prune.layer_sparsity(m)
    assert zeros["h.0.mlp.c_fc"] == pytest.approx(0.75) and zeros["h.1.mlp.c_fc"] == pytest.approx(0.25)


# -- 4. convert ----------------------------------------------------------------------------------------
def test_convert_refuses_a_bare_conv1d_with_a_way_that_works():
    conv = bare().c
    sp.prune_blocks(nn.Sequential(conv), sparsity=0.75, block_size=(8, 8), dense_first_last=False)
    x = torch.randn(4, 40)
    with pytest.raises(ValueError, match=r"single Hugging Face Conv1D.*wrap it \(nn\.Sequential\(layer\)\).*"
                                         r"SparseLinear\.from_dense takes an nn\.Linear, not a Conv1D"):
        sp.convert(conv, x)
    with pytest.raises(TypeError):  # what the message must not send the user to
        sp.SparseLinear.from_dense(conv, format="csr")
    fast = sp.convert(nn.Sequential(conv), x, cache=False, end_to_end=False, time_budget=1.0)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), conv(x), rtol=1e-4, atol=1e-5)
    assert "Conv1D" in importlib.import_module("sparseprune.convert").__doc__
