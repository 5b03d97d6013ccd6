"""Structural (channel) pruning: dependency groups on hand-written and real architectures.

The strong checks are oracles that do not use the pruner's own graph:
- dead channels: channels made exactly zero by hand (producer filter, norm scale/shift, consumer
  weights) must be the ones removed, and removing them must not change the output;
- mask equivalence: for any ratio / importance, the pruned model must compute the same as the
  *unpruned* model with the removed channels silenced (their norm scale and shift set to zero). The
  removed channels are recovered by matching the distinct per-channel values of each layer's
  norm/bias against the original, never from the pruner's bookkeeping.
"""
import copy
import math
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sparseprune as sp
from sparseprune.prune.channels import ChannelPruneWarning

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings, strategies as st  # noqa: E402

TOL = 1e-5


pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------ helpers
def _run(model, x):
    model.eval()
    with torch.no_grad():
        if isinstance(x, dict):
            return model(**x)
        if isinstance(x, tuple):
            return model(*x)
        return model(x)


def _first(out):
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):
        return next(v for v in out.values() if isinstance(v, torch.Tensor))
    return out[0]


def _shapes(out):
    if isinstance(out, torch.Tensor):
        return tuple(out.shape)
    if isinstance(out, dict):
        return {k: _shapes(v) for k, v in out.items()}
    if isinstance(out, (list, tuple)):
        return [_shapes(v) for v in out]
    return None


def _nparams(m):
    return sum(p.numel() for p in m.parameters())


def _randomize_norms(model, seed=0):
    """Distinct per-channel values everywhere, so that kept channels can be recovered by value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)) and m.weight is not None:
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.bias.shape, generator=g) - 0.5)
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) - 0.5)
                    m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            elif isinstance(m, (nn.Conv1d, nn.Conv2d, nn.ConvTranspose2d, nn.Linear)) and m.bias is not None:
                m.bias.copy_(torch.rand(m.bias.shape, generator=g) - 0.5)
    return model


def _kept(new, old):
    """Index in ``old`` of every entry of ``new`` (values are distinct)."""
    new, old = new.detach().reshape(-1), old.detach().reshape(-1)
    idx = []
    for v in new.tolist():
        hits = (old == v).nonzero().view(-1)
        assert hits.numel() == 1, "values are expected to be distinct"
        idx.append(int(hits[0]))
    assert idx == sorted(idx), "channel order must be preserved"
    return idx


def _silence(ref, pruned, names):
    """In ``ref`` (a copy of the original), zero scale and shift of every channel that ``pruned`` lost,
    for every norm / biased layer listed in ``names`` (the channel's last op before it is consumed)."""
    rmods, pmods = dict(ref.named_modules()), dict(pruned.named_modules())
    with torch.no_grad():
        for n in names:
            r, p = rmods[n], pmods[n]
            key = r.weight if isinstance(r, (nn.BatchNorm2d, nn.BatchNorm1d, nn.GroupNorm, nn.LayerNorm)) else r.bias
            pkey = p.weight if key is r.weight else p.bias
            keep = _kept(pkey, key)
            drop = [i for i in range(key.numel()) if i not in keep]
            if isinstance(r, (nn.BatchNorm2d, nn.BatchNorm1d, nn.GroupNorm, nn.LayerNorm)):
                r.weight[drop] = 0
                r.bias[drop] = 0
            else:
                r.weight[drop] = 0
                r.bias[drop] = 0
    return ref


# ------------------------------------------------------------------------------------------ models
class Seq(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x):
        x = F.relu(self.b1(self.c1(x)))
        x = F.relu(self.b2(self.c2(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 4).flatten(1))


class Residual(nn.Module):
    def __init__(self, c=8, inner=8):
        super().__init__()
        self.stem, self.bs = nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.a, self.ba = nn.Conv2d(c, inner, 3, padding=1, bias=False), nn.BatchNorm2d(inner)
        self.b, self.bb = nn.Conv2d(inner, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.a2, self.ba2 = nn.Conv2d(c, inner, 1, bias=False), nn.BatchNorm2d(inner)
        self.b2, self.bb2 = nn.Conv2d(inner, c, 1, bias=False), nn.BatchNorm2d(c)
        self.head = nn.Linear(c, 4)

    def forward(self, x):
        x = F.relu(self.bs(self.stem(x)))
        x = F.relu(x + self.bb(self.b(F.relu(self.ba(self.a(x))))))
        y = self.bb2(self.b2(F.relu(self.ba2(self.a2(x)))))
        y += x  # in-place add, as in torchvision-style blocks
        return self.head(F.relu(y).mean((2, 3)))


class Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.p, self.bp = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.q, self.bq = nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8)
        self.r, self.br = nn.Conv2d(16, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        y = torch.cat([F.relu(self.bp(self.p(x))), F.relu(self.bq(self.q(x)))], dim=1)
        return self.fc(F.relu(self.br(self.r(y))).amax((2, 3)))


class Depthwise(nn.Module):
    def __init__(self, c=8):
        super().__init__()
        self.pw1, self.b1 = nn.Conv2d(3, c, 1), nn.BatchNorm2d(c)
        self.dw, self.b2 = nn.Conv2d(c, c, 3, padding=1, groups=c), nn.BatchNorm2d(c)
        self.pw2, self.b3 = nn.Conv2d(c, 6, 1), nn.BatchNorm2d(6)

    def forward(self, x):
        x = F.relu6(self.b1(self.pw1(x)))
        x = F.relu6(self.b2(self.dw(x)))
        return self.b3(self.pw2(x))


class SEBlock(nn.Module):
    def __init__(self, c=16):
        super().__init__()
        self.c, self.b = nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c)
        self.fc1, self.fc2 = nn.Conv2d(c, 8, 1), nn.Conv2d(8, c, 1)
        self.out = nn.Conv2d(c, 4, 1)

    def forward(self, x):
        x = F.relu(self.b(self.c(x)))
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(x, 1)))))
        return self.out(x * s)


def channel_shuffle(x, groups):
    b, c, h, w = x.shape
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, c, h, w)


class ShuffleUnit(nn.Module):
    """ShuffleNetV2 basic unit: chunk -> branch on one half -> cat -> channel shuffle."""
    def __init__(self, c):
        super().__init__()
        h = c // 2
        self.pw1, self.b1 = nn.Conv2d(h, h, 1, bias=False), nn.BatchNorm2d(h)
        self.dw, self.b2 = nn.Conv2d(h, h, 3, padding=1, groups=h, bias=False), nn.BatchNorm2d(h)
        self.pw2, self.b3 = nn.Conv2d(h, h, 1, bias=False), nn.BatchNorm2d(h)

    def forward(self, x):
        x1, x2 = x.chunk(2, dim=1)
        y = F.relu(self.b3(self.pw2(self.b2(self.dw(F.relu(self.b1(self.pw1(x2))))))))
        return channel_shuffle(torch.cat([x1, y], dim=1), 2)


class ShuffleNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.bs = nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.u1, self.u2 = ShuffleUnit(16), ShuffleUnit(16)
        self.g, self.bg = nn.Conv2d(16, 16, 3, padding=1, groups=4, bias=False), nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = F.relu(self.bs(self.stem(x)))
        x = self.u2(self.u1(x))
        x = channel_shuffle(F.relu(self.bg(self.g(x))), 4)
        return self.fc(x.mean((2, 3)))


class Misc(nn.Module):
    """Conv1d, GroupNorm, ConvTranspose2d, LayerNorm, Embedding and Linear in one model."""
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 16)
        self.c1, self.g1 = nn.Conv1d(16, 12, 3, padding=1), nn.GroupNorm(4, 12)
        self.c2, self.g2 = nn.Conv1d(12, 8, 1), nn.GroupNorm(8, 8)
        self.up, self.bu = nn.ConvTranspose2d(8, 6, 2, stride=2), nn.BatchNorm2d(6)
        self.ln = nn.LayerNorm(6)
        self.fc = nn.Linear(6, 3)

    def forward(self, ids):
        x = self.emb(ids).transpose(1, 2)                 # (B, 16, L)
        x = F.gelu(self.g1(self.c1(x)))
        x = F.gelu(self.g2(self.c2(x)))                   # (B, 8, L)
        x = x.unsqueeze(-1)                               # (B, 8, L, 1)
        x = F.relu(self.bu(self.up(x)))                   # (B, 6, 2L, 2)
        x = self.ln(x.permute(0, 2, 3, 1))                # channels last
        return self.fc(x).mean((1, 2))


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(10, 32)
        self.enc = nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, dropout=0.0, batch_first=True)
        self.head = nn.Linear(32, 2)

    def forward(self, x):
        return self.head(self.enc(self.proj(x)).mean(1))


# ------------------------------------------------------------------------------------------ oracle: dead channels
def _kill_conv_out(conv, bn, idx, consumers=()):
    with torch.no_grad():
        conv.weight[idx] = 0
        if conv.bias is not None:
            conv.bias[idx] = 0
        if bn is not None:
            bn.weight[idx] = 0
            bn.bias[idx] = 0
        for c, cidx in consumers:
            c.weight[:, cidx] = 0


def _check_dead(model, x, dead, ratio, **kw):
    """``dead``: {bn/bias module name: dead indices}. They must be exactly the channels removed."""
    ref = _run(model, x)
    before = {n: (m.weight if isinstance(m, nn.modules.batchnorm._BatchNorm) else m.bias).detach().clone()
              for n, m in model.named_modules() if n in dead}
    sp.prune_channels(model, x, ratio, **kw)
    out = _run(model, x)
    mods = dict(model.named_modules())
    for n, idx in dead.items():
        m = mods[n]
        now = m.weight if isinstance(m, nn.modules.batchnorm._BatchNorm) else m.bias
        # values of the removed ones are 0 (all equal), so check the survivors instead: none is dead
        alive = [i for i in range(before[n].numel()) if i not in idx]
        assert now.numel() == len(alive), n
        torch.testing.assert_close(now.detach(), before[n][alive], rtol=0, atol=0)
    assert (out - ref).abs().max().item() < TOL


def test_dead_channels_sequential():
    torch.manual_seed(0)
    m = _randomize_norms(Seq())
    x = torch.randn(2, 3, 8, 8)
    _kill_conv_out(m.c1, m.b1, [1, 6], [(m.c2, [1, 6])])
    cols = [c * 16 + k for c in (0, 5) for k in range(16)]    # flatten: channel c owns 16 features
    _kill_conv_out(m.c2, m.b2, [0, 5], [(m.fc, cols)])
    _check_dead(m, x, {"b1": [1, 6], "b2": [0, 5]}, 0.25)
    assert m.fc.in_features == 6 * 16 and m.c2.weight.shape == (6, 6, 3, 3)


def test_dead_channels_residual():
    torch.manual_seed(0)
    m = _randomize_norms(Residual())
    x = torch.randn(2, 3, 8, 8)
    stream = [2, 7]  # the residual stream: stem, b and b2 outputs are added together
    for conv, bn in ((m.stem, m.bs), (m.b, m.bb), (m.b2, m.bb2)):
        _kill_conv_out(conv, bn, stream)
    with torch.no_grad():
        for c in (m.a, m.a2):
            c.weight[:, stream] = 0
        m.head.weight[:, stream] = 0
    _kill_conv_out(m.a, m.ba, [0, 3], [(m.b, [0, 3])])
    _kill_conv_out(m.a2, m.ba2, [4, 5], [(m.b2, [4, 5])])
    _check_dead(m, x, {"bs": stream, "bb": stream, "bb2": stream, "ba": [0, 3], "ba2": [4, 5]}, 0.25)
    assert m.head.in_features == 6


def test_dead_channels_concat():
    torch.manual_seed(0)
    m = _randomize_norms(Concat())
    x = torch.randn(2, 3, 8, 8)
    _kill_conv_out(m.p, m.bp, [0, 4], [(m.r, [0, 4])])
    _kill_conv_out(m.q, m.bq, [3, 7], [(m.r, [8 + 3, 8 + 7])])   # second half of the concatenation
    _kill_conv_out(m.r, m.br, [1, 2], [(m.fc, [1, 2])])
    _check_dead(m, x, {"bp": [0, 4], "bq": [3, 7], "br": [1, 2]}, 0.25)
    assert m.r.in_channels == 12


def test_dead_channels_depthwise():
    torch.manual_seed(0)
    m = _randomize_norms(Depthwise())
    x = torch.randn(2, 3, 8, 8)
    _kill_conv_out(m.pw1, m.b1, [2, 5])
    _kill_conv_out(m.dw, m.b2, [2, 5], [(m.pw2, [2, 5])])
    _check_dead(m, x, {"b1": [2, 5], "b2": [2, 5]}, 0.25)
    assert m.dw.groups == 6 and m.dw.weight.shape == (6, 1, 3, 3)


def _tiny_bert(attn="sdpa"):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=48, max_position_embeddings=16, num_labels=3)
    cfg._attn_implementation = attn
    torch.manual_seed(0)
    m = _randomize_norms(transformers.BertForSequenceClassification(cfg).eval())
    x = {"input_ids": torch.randint(0, 50, (2, 7)), "attention_mask": torch.ones(2, 7, dtype=torch.long)}
    return m, x


def _attention_only(m):
    """Everything but the attention blocks' inner (head) channels is left alone."""
    return [n for n, mod in m.named_modules() if n and ("intermediate" in n or "embeddings" in n or n == "classifier")]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_dead_heads_bert(attn):
    m, x = _tiny_bert(attn)
    hd = 8
    dead = {0: [1, 3], 1: [0, 2]}
    with torch.no_grad():
        for li, heads in dead.items():
            a = m.bert.encoder.layer[li].attention
            rows = [h * hd + k for h in heads for k in range(hd)]
            for lin in (a.self.query, a.self.key, a.self.value):
                lin.weight[rows] = 0
                lin.bias[rows] = 0
            a.output.dense.weight[:, rows] = 0
    ref = _run(m, x).logits
    sp.prune_channels(m, x, 0.5, ignore=_attention_only(m))
    out = _run(m, x).logits
    assert (out - ref).abs().max().item() < TOL
    for li in dead:
        s = m.bert.encoder.layer[li].attention.self
        assert s.query.out_features == s.key.out_features == s.value.out_features == 16
        assert bool((s.query.weight.abs().sum(1) > 0).all())


# ------------------------------------------------------------------------------------------ oracle: mask equivalence
def _mask_equiv(model, x, silence, **kw):
    ref = copy.deepcopy(model)
    sp.prune_channels(model, x, **kw)
    out = _first(_run(model, x))
    _silence(ref, model, silence)
    expect = _first(_run(ref, x))
    assert out.shape == expect.shape
    assert (out - expect).abs().max().item() < TOL
    return model


@settings(max_examples=12, deadline=None)
@given(ratio=st.floats(0.0, 0.95), round_to=st.sampled_from([1, 2, 4]), seed=st.integers(0, 1000),
       importance=st.sampled_from(["l1", "l2", "random", "bn_scale"]))
def test_mask_equivalence_residual(ratio, round_to, seed, importance):
    torch.manual_seed(seed)
    m = _randomize_norms(Residual(c=12, inner=10), seed)
    x = torch.randn(1, 3, 6, 6)
    _mask_equiv(m, x, ["bs", "bb", "bb2", "ba", "ba2"], ratio=ratio, round_to=round_to, importance=importance,
                seed=seed)
    for bn, full in ((m.bs, 12), (m.ba, 10), (m.ba2, 10)):
        n = bn.num_features
        assert n >= 1
        assert n == full or n % round_to == 0 or full < round_to
        if round_to == 1:
            assert n == max(1, full - math.floor(full * ratio + 1e-9))


@pytest.mark.parametrize("importance", ["random", "l1"])
def test_mask_equivalence_concat_se_depthwise(importance):
    for seed in range(3):
        torch.manual_seed(seed)
        m = _randomize_norms(Concat(), seed)
        _mask_equiv(m, torch.randn(2, 3, 8, 8), ["bp", "bq", "br"], ratio=0.5, importance=importance, seed=seed)
        m = _randomize_norms(Depthwise(), seed)
        _mask_equiv(m, torch.randn(2, 3, 8, 8), ["b1", "b2"], ratio=0.5, importance=importance, seed=seed)
        m = _randomize_norms(SEBlock(), seed)
        _mask_equiv(m, torch.randn(2, 3, 8, 8), ["b", "fc1"], ratio=0.5, importance=importance, seed=seed)
        assert m.fc2.out_channels == m.b.num_features == 8 and m.fc1.out_channels == 4


def test_mask_equivalence_channel_shuffle():
    for seed in range(4):
        torch.manual_seed(seed)
        m = _randomize_norms(ShuffleNet(), seed)
        x = torch.randn(2, 3, 8, 8)
        names = ["bs", "u1.b1", "u1.b2", "u1.b3", "u2.b1", "u2.b2", "u2.b3", "bg"]
        _mask_equiv(m, x, names, ratio=0.5, importance="random", seed=seed)
        # the 4-group conv keeps its groups (the 4-group shuffle after it needs them) and loses the same
        # in-group positions from every group; the stream feeding it is tied across all its groups
        assert m.g.groups == 4 and m.g.out_channels == 8 and m.u1.pw1.out_channels == 4


def _attention_blocks(name):
    """(model, inputs, [(q, k, v, o) Linear modules per layer], head_dim, heads)."""
    if name.startswith("bert"):
        m, x = _tiny_bert(name.split("-")[1])
        blocks = [(a.self.query, a.self.key, a.self.value, a.output.dense)
                  for a in (lay.attention for lay in m.bert.encoder.layer)]
        return m, x, blocks, 8, 4
    m, x = _hf(name)
    m = _randomize_norms(m.eval())
    if name == "distilbert":
        blocks = [(a.q_lin, a.k_lin, a.v_lin, a.out_lin) for a in (lay.attention for lay in m.distilbert.transformer.layer)]
    else:  # vit
        blocks = [(a.q_proj, a.k_proj, a.v_proj, a.o_proj) for a in (lay.attention for lay in m.vit.layers)]
    return m, x, blocks, 8, 4


@pytest.mark.parametrize("name", ["bert-sdpa", "bert-eager", "distilbert", "vit"])
def test_heads_stay_paired_random(name):
    """Q, K, V rows and the output projection's columns must lose the same heads: the pruned model
    equals the original with the removed heads' output-projection columns zeroed."""
    for seed in range(3):
        m, x, blocks, hd, nh = _attention_blocks(name)
        ref = copy.deepcopy(m)
        keep = {id(l) for blk in blocks for l in blk}
        ignore = [n for n, mod in m.named_modules()
                  if n and id(mod) not in keep and any(True for _ in mod.parameters(recurse=False))]
        names = {id(mod): n for n, mod in m.named_modules()}
        sp.prune_channels(m, x, 0.5, importance="random", seed=seed, ignore=ignore)
        rmods = dict(ref.named_modules())
        with torch.no_grad():
            for q, k, v, o in blocks:
                heads = []
                for lin in (q, k, v):
                    kept = _kept(lin.bias, rmods[names[id(lin)]].bias)
                    heads.append(sorted({i // hd for i in kept}))
                    assert len(kept) == len(heads[-1]) * hd
                assert heads[0] == heads[1] == heads[2] and len(heads[0]) == nh // 2
                drop = [h * hd + j for h in range(nh) if h not in heads[0] for j in range(hd)]
                rmods[names[id(o)]].weight[:, drop] = 0
        assert (_first(_run(m, x)) - _first(_run(ref, x))).abs().max().item() < TOL


def test_swin_heads_take_their_relative_position_bias_along():
    """Swin: window attention adds a per-head relative position bias (a raw table indexed per head).
    Pruning heads must drop the same heads from q, k, v, the output projection and that table."""
    m, x = _hf("swin")
    m = _randomize_norms(m.eval(), 2)
    ref = copy.deepcopy(m)
    keep = ("q_proj", "k_proj", "v_proj", "o_proj", "relative_position_bias")
    ignore = [n for n, mod in m.named_modules()
              if n and any(True for _ in mod.parameters(recurse=False)) and not n.endswith(keep)]
    sp.prune_channels(m, x, 0.5, importance="random", seed=0, ignore=ignore)
    rmods = dict(ref.named_modules())
    with torch.no_grad():
        for n, a in m.named_modules():
            if not n.endswith(".attention") or not hasattr(a, "q_proj"):
                continue
            ra = rmods[n]
            nh = ra.relative_position_bias.relative_position_bias_table.shape[1]
            hd = ra.q_proj.out_features // nh
            heads = [sorted({i // hd for i in _kept(getattr(a, p).bias, getattr(ra, p).bias)}) for p in keep[:3]]
            assert heads[0] == heads[1] == heads[2] and len(heads[0]) == nh // 2
            table, rtable = (t.relative_position_bias.relative_position_bias_table for t in (a, ra))
            torch.testing.assert_close(table, rtable[:, heads[0]], rtol=0, atol=0)
            drop = [h * hd + j for h in range(nh) if h not in heads[0] for j in range(hd)]
            ra.o_proj.weight[:, drop] = 0
    assert (_first(_run(m, x)) - _first(_run(ref, x))).abs().max().item() < TOL


class OldStyleAttention(nn.Module):
    """Attention written with fixed attributes (no -1 in the reshapes), as many older models do."""
    def __init__(self, dim=32, heads=4):
        super().__init__()
        self.num_heads, self.head_dim, self.embed_dim = heads, dim // heads, dim
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = (lin(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2) for lin in (self.q, self.k, self.v))
        att = torch.softmax(q @ k.transpose(-2, -1) / self.head_dim ** 0.5, dim=-1)
        return self.o((att @ v).transpose(1, 2).reshape(b, n, self.embed_dim))


class FusedQKVAttention(nn.Module):
    """One Linear for q, k and v, reshaped to (3, heads, head_dim) as in timm-style vision transformers."""
    def __init__(self, dim=32, heads=4):
        super().__init__()
        self.num_heads, self.head_dim = heads, dim // heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        att = torch.softmax(q @ k.transpose(-2, -1) * self.head_dim ** -0.5, dim=-1)
        return self.proj((att @ v).transpose(1, 2).reshape(b, n, -1))


def test_fused_qkv_three_way_split_loses_whole_heads():
    for seed in range(3):
        torch.manual_seed(seed)
        m = _randomize_norms(FusedQKVAttention())
        x = torch.randn(2, 5, 32)
        ref = copy.deepcopy(m)
        sp.prune_channels(m, x, 0.5, importance="random", seed=seed)
        assert m.num_heads == 2 and m.head_dim == 8 and m.qkv.out_features == 48
        kept = _kept(m.qkv.bias, ref.qkv.bias)
        thirds = [sorted({(i - t * 32) // 8 for i in kept if t * 32 <= i < (t + 1) * 32}) for t in range(3)]
        assert thirds[0] == thirds[1] == thirds[2] and len(thirds[0]) == 2
        with torch.no_grad():
            ref.proj.weight[:, [h * 8 + j for h in range(4) if h not in thirds[0] for j in range(8)]] = 0
        assert (_run(m, x) - _run(ref, x)).abs().max().item() < TOL


def test_old_style_attention_updates_its_head_count():
    for seed in range(3):
        torch.manual_seed(seed)
        m = _randomize_norms(OldStyleAttention())
        x = torch.randn(2, 5, 32)
        ref = copy.deepcopy(m)
        with warnings.catch_warnings():
            warnings.simplefilter("error")   # nothing may be left alone here
            sp.prune_channels(m, x, 0.5, importance="random", seed=seed)
        assert m.num_heads == 2 and m.embed_dim == 16 and m.head_dim == 8
        heads = [sorted({i // 8 for i in _kept(getattr(m, p).bias, getattr(ref, p).bias)}) for p in "qkv"]
        assert heads[0] == heads[1] == heads[2]
        with torch.no_grad():
            ref.o.weight[:, [h * 8 + j for h in range(4) if h not in heads[0] for j in range(8)]] = 0
        out, expect = _run(m, x), _run(ref, x)
        # the residual width (o's output) is a model output here, so only the heads can go
        assert out.shape == expect.shape and (out - expect).abs().max().item() < TOL


def test_gpt2_fused_qkv_heads_stay_paired():
    """GPT-2 computes q, k, v with one fused Conv1D split in three: the three thirds lose the same heads."""
    for seed in range(2):
        m, x = _hf("gpt2")
        m.eval()
        with torch.no_grad():
            for blk in m.transformer.h:
                blk.attn.c_attn.bias.copy_(torch.randn(96))
        ref = copy.deepcopy(m)
        keep = {"c_attn", "c_proj"}
        ignore = [n for n, mod in m.named_modules()
                  if n and any(True for _ in mod.parameters(recurse=False)) and not (n.split(".")[-1] in keep and ".attn." in n)]
        sp.prune_channels(m, x, 0.5, importance="random", seed=seed, ignore=ignore)
        with torch.no_grad():
            for blk, rblk in zip(m.transformer.h, ref.transformer.h):
                kept = _kept(blk.attn.c_attn.bias, rblk.attn.c_attn.bias)
                thirds = [sorted({(i - t * 32) // 8 for i in kept if t * 32 <= i < (t + 1) * 32}) for t in range(3)]
                assert thirds[0] == thirds[1] == thirds[2] and len(thirds[0]) == 2 and len(kept) == 48
                drop = [h * 8 + j for h in range(4) if h not in thirds[0] for j in range(8)]
                rblk.attn.c_proj.weight[drop, :] = 0     # Conv1D weight is (in, out)
        assert (_run(m, x).logits - _run(ref, x).logits).abs().max().item() < TOL


# ------------------------------------------------------------------------------------------ coverage
def _coverage(m, x, min_drop, **kw):
    ref_shapes = _shapes(_run(m, x))
    p0 = _nparams(m)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m, rep = sp.prune_channels(m, x, 0.5, return_report=True, **kw)
    out = _run(m, x)
    assert _shapes(out) == ref_shapes
    assert all(bool(torch.isfinite(t).all()) for t in [_first(out)])
    p1 = _nparams(m)
    assert p1 == rep.params_after and p0 == rep.params_before
    assert 1 - p1 / p0 >= min_drop, (p0, p1, rep.skipped)
    assert rep.macs_after < rep.macs_before
    return m, rep


def _hf(name):
    T = pytest.importorskip("transformers")
    torch.manual_seed(0)
    img = torch.randn(1, 3, 32, 32)
    ids = {"input_ids": torch.randint(0, 64, (1, 8))}
    if name == "resnet":
        return T.ResNetForImageClassification(T.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32, 48, 64],
                                              depths=[1, 1, 1, 1], layer_type="bottleneck", num_labels=10)), img
    if name == "resnet_basic_model":  # base model: the last stage is an output, so it stays whole
        return T.ResNetModel(T.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32, 32, 64], depths=[2, 1, 1, 1],
                                            layer_type="basic")), img
    if name == "mobilenetv2":
        return T.MobileNetV2ForImageClassification(T.MobileNetV2Config(image_size=32, depth_multiplier=0.35,
                                                                       num_labels=10)), img
    if name == "convnext":
        return T.ConvNextForImageClassification(T.ConvNextConfig(hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 1, 1],
                                                                 num_labels=10)), img
    if name == "regnet":
        return T.RegNetForImageClassification(T.RegNetConfig(embedding_size=16, hidden_sizes=[16, 32, 48, 64],
                                                             depths=[1, 1, 1, 1], groups_width=8, num_labels=10)), img
    if name == "efficientnet":
        return T.EfficientNetForImageClassification(T.EfficientNetConfig(
            image_size=32, width_coefficient=0.25, depth_coefficient=0.2, hidden_dim=320, num_labels=10)), img
    if name == "vit":
        return T.ViTForImageClassification(T.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                                       num_attention_heads=4, intermediate_size=64, num_labels=10)), img
    if name == "swin":
        return T.SwinForImageClassification(T.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1],
                                                         num_heads=[2, 4], window_size=4, num_labels=10)), img
    if name == "bert":
        return T.BertForSequenceClassification(T.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                               num_attention_heads=4, intermediate_size=64,
                                               max_position_embeddings=16, num_labels=3)), ids
    if name == "gpt2":
        return T.GPT2LMHeadModel(T.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=16,
                                              bos_token_id=0, eos_token_id=0)), ids
    if name == "distilbert":
        return T.DistilBertForSequenceClassification(T.DistilBertConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4,
                                                     hidden_dim=64, max_position_embeddings=16, num_labels=3)), ids
    raise KeyError(name)


@pytest.mark.parametrize("name", ["resnet", "mobilenetv2", "regnet", "efficientnet"])
def test_real_cnns_are_mask_equivalent(name):
    """Real architectures (residual bottlenecks with projection shortcuts, inverted residuals with
    depthwise convs and TF padding, grouped convs with SE, EfficientNet's SE + depthwise): the pruned model
    equals the original with every removed channel silenced at its BatchNorm."""
    m, x = _hf(name)
    m = _randomize_norms(m.eval(), 1)
    if name == "efficientnet":   # its SE squeeze/expand convs have biases and no norm: silence them too
        extra = [n for n, mod in m.named_modules() if isinstance(mod, nn.Conv2d) and mod.bias is not None and "reduce" in n]
    else:
        extra = [n for n, mod in m.named_modules() if isinstance(mod, nn.Conv2d) and mod.bias is not None]
    names = [n for n, mod in m.named_modules() if isinstance(mod, nn.BatchNorm2d)] + extra
    ref = copy.deepcopy(m)
    sp.prune_channels(m, x, 0.5, importance="random", seed=1)
    _silence(ref, m, names)
    assert (_first(_run(m, x)) - _first(_run(ref, x))).abs().max().item() < TOL


def test_callable_importance():
    m = _randomize_norms(Seq())
    bias = m.c1.bias.detach().clone()
    sp.prune_channels(m, torch.randn(1, 3, 8, 8), 0.5, importance=lambda w, dim: -torch.arange(w.shape[dim]).float())
    torch.testing.assert_close(m.c1.bias.detach(), bias[:4])   # the highest indices score lowest and go


@pytest.mark.parametrize("name,min_drop", [
    ("resnet", 0.3), ("mobilenetv2", 0.3), ("convnext", 0.3), ("regnet", 0.3), ("efficientnet", 0.3),
    ("vit", 0.3), ("swin", 0.3), ("bert", 0.2), ("gpt2", 0.2), ("distilbert", 0.2),
])
def test_real_architectures(name, min_drop):
    m, x = _hf(name)
    _coverage(m.eval(), x, min_drop)


def test_base_model_outputs_keep_their_width():
    m, x = _hf("resnet_basic_model")
    ref = _run(m, x)
    m, rep = _coverage(m.eval(), x, 0.1)
    assert m.encoder.stages[-1].layers[-1].layer[-1].convolution.out_channels == 64
    assert _run(m, x).last_hidden_state.shape == ref.last_hidden_state.shape


@pytest.mark.parametrize("factory,inp,min_drop", [
    (ShuffleNet, lambda: torch.randn(1, 3, 8, 8), 0.3),
    (SEBlock, lambda: torch.randn(1, 3, 8, 8), 0.3),
    (Concat, lambda: torch.randn(1, 3, 8, 8), 0.3),
    (Misc, lambda: torch.randint(0, 20, (2, 5)), 0.3),
    (Encoder, lambda: torch.randn(2, 5, 10), 0.3),
])
def test_hand_written_models(factory, inp, min_drop):
    torch.manual_seed(0)
    _coverage(factory().eval(), inp(), min_drop)


def test_misc_layers_match_the_kept_subnetwork():
    """Embedding, Conv1d + GroupNorm (groups kept), ConvTranspose2d + BatchNorm, channels-last LayerNorm:
    the pruned model equals the original evaluated on the kept channels only (kept sets recovered by
    value, and the normalisations recomputed over them)."""
    for seed in range(3):
        torch.manual_seed(seed)
        m = _randomize_norms(Misc(), seed)
        x = torch.randint(0, 20, (2, 5))
        o = copy.deepcopy(m)
        sp.prune_channels(m, x, 0.5, importance="random", seed=seed)
        assert m.emb.embedding_dim == 8 and m.g1.num_groups == 4 and m.g1.num_channels == 8
        assert m.g2.num_groups == m.g2.num_channels == m.up.in_channels == 4
        ke = _kept(m.emb.weight[0], o.emb.weight[0])
        k1, k2, ku = _kept(m.c1.bias, o.c1.bias), _kept(m.c2.bias, o.c2.bias), _kept(m.up.bias, o.up.bias)
        assert k1 == _kept(m.g1.weight, o.g1.weight) and ku == _kept(m.ln.weight, o.ln.weight)
        assert [len([i for i in k1 if i // 3 == g]) for g in range(4)] == [2] * 4   # same count per group
        with torch.no_grad():
            h = F.embedding(x, o.emb.weight[:, ke]).transpose(1, 2)
            h = F.conv1d(h, o.c1.weight[k1][:, ke], o.c1.bias[k1], padding=1)
            h = F.gelu(F.group_norm(h, 4, o.g1.weight[k1], o.g1.bias[k1], o.g1.eps))
            h = F.conv1d(h, o.c2.weight[k2][:, k1], o.c2.bias[k2])
            h = F.gelu(F.group_norm(h, len(k2), o.g2.weight[k2], o.g2.bias[k2], o.g2.eps)).unsqueeze(-1)
            h = F.conv_transpose2d(h, o.up.weight[k2][:, ku], o.up.bias[ku], stride=2)
            bu = o.bu
            h = F.relu(F.batch_norm(h, bu.running_mean[ku], bu.running_var[ku], bu.weight[ku], bu.bias[ku], False, 0, bu.eps))
            h = F.layer_norm(h.permute(0, 2, 3, 1), (len(ku),), o.ln.weight[ku], o.ln.bias[ku], o.ln.eps)
            expect = F.linear(h, o.fc.weight[:, ku], o.fc.bias).mean((1, 2))
        assert (_run(m, x) - expect).abs().max().item() < TOL


class MHAModel(nn.Module):
    def __init__(self, batch_first):
        super().__init__()
        self.proj = nn.Linear(10, 32)
        self.mha = nn.MultiheadAttention(32, 4, batch_first=batch_first)
        self.head = nn.Linear(32, 2)

    def forward(self, x):
        h = self.proj(x)
        return self.head(self.mha(h, h, h, need_weights=False)[0])


@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention_matches_the_kept_subnetwork(batch_first):
    """nn.MultiheadAttention ties its embed dim to its input and output: the same positions go from every
    head (embed_dim stays a multiple of num_heads), and the result is the original attention computed
    on the kept channels."""
    for seed in range(2):
        torch.manual_seed(seed)
        m = _randomize_norms(MHAModel(batch_first))
        x = torch.randn(2, 5, 10) if batch_first else torch.randn(5, 2, 10)
        o = copy.deepcopy(m)
        sp.prune_channels(m, x, 0.5, importance="random", seed=seed)
        k = _kept(m.proj.bias, o.proj.bias)
        assert m.mha.embed_dim == len(k) == 16 and m.mha.head_dim == 4
        assert [len([i for i in k if i // 8 == h]) for h in range(4)] == [4] * 4
        with torch.no_grad():
            h = F.linear(x, o.proj.weight[k], o.proj.bias[k])
            hq = h if not batch_first else h.transpose(0, 1)
            rows = k + [32 + i for i in k] + [64 + i for i in k]
            a = F.multi_head_attention_forward(
                hq, hq, hq, 16, 4, o.mha.in_proj_weight[rows][:, k], o.mha.in_proj_bias[rows], None, None, False, 0.0,
                o.mha.out_proj.weight[k][:, k], o.mha.out_proj.bias[k], training=False, need_weights=False)[0]
            a = a if not batch_first else a.transpose(0, 1)
            expect = F.linear(a, o.head.weight[:, k], o.head.bias)
        assert (_run(m, x) - expect).abs().max().item() < TOL


def test_multihead_attention_encoder_runs_and_shrinks():
    torch.manual_seed(0)
    m = Encoder().eval()
    x = torch.randn(2, 5, 10)
    m, rep = _coverage(m, x, 0.3)
    assert m.enc.self_attn.embed_dim % 4 == 0 and m.enc.self_attn.embed_dim < 32
    assert m.enc.linear1.out_features == 32


# ------------------------------------------------------------------------------------------ options
def test_ratio_near_one_keeps_a_channel_everywhere():
    torch.manual_seed(0)
    m = Residual()
    x = torch.randn(1, 3, 6, 6)
    sp.prune_channels(m, x, 0.99)
    for mod in m.modules():
        if isinstance(mod, nn.Conv2d):
            assert mod.out_channels >= 1 and mod.in_channels >= 1
    assert _run(m, x).shape == (1, 4)


def test_ignore_leaves_layer_alone():
    torch.manual_seed(0)
    m = Seq()
    sp.prune_channels(m, torch.randn(1, 3, 8, 8), 0.5, ignore=[m.c2])
    assert m.c2.out_channels == 8 and m.c2.in_channels == 8 and m.c1.out_channels == 8
    m = Seq()
    sp.prune_channels(m, torch.randn(1, 3, 8, 8), 0.5, ignore="c1")
    assert m.c1.out_channels == 8 and m.c2.out_channels == 4


def test_bn_scale_and_l2_pick_the_smallest():
    torch.manual_seed(0)
    m = _randomize_norms(Seq())
    with torch.no_grad():
        m.b1.weight[[3, 4]] = 1e-3
    keep_b1 = [i for i in range(8) if i not in (3, 4)]
    w_before = m.b1.bias.detach().clone()
    sp.prune_channels(m, torch.randn(1, 3, 8, 8), 0.25, importance="bn_scale")
    torch.testing.assert_close(m.b1.bias.detach(), w_before[keep_b1])
    m = Seq()
    with torch.no_grad():
        m.c1.weight[5] *= 1e-3
        m.b1.weight[5] = 1e-3
    bias = m.c1.bias.detach().clone()
    sp.prune_channels(m, torch.randn(1, 3, 8, 8), 0.125, importance="l2")
    torch.testing.assert_close(m.c1.bias.detach(), bias[[0, 1, 2, 3, 4, 6, 7]])


def test_taylor_uses_the_loss():
    torch.manual_seed(0)
    m = Seq()
    x = torch.randn(4, 3, 8, 8)
    target = torch.randint(0, 5, (4,))
    with pytest.raises(ValueError, match="taylor"):
        sp.prune_channels(m, x, 0.5, importance="taylor")
    with torch.no_grad():   # channel 2 of c1 never reaches the loss: its Taylor score is exactly 0
        m.c2.weight[:, 2] = 0
    bias = m.b1.bias.detach().clone()
    sp.prune_channels(m, x, 0.125, importance="taylor", loss_fn=lambda out: F.cross_entropy(out, target))
    torch.testing.assert_close(m.b1.bias.detach(), bias[[0, 1, 3, 4, 5, 6, 7]])
    assert all(p.grad is None for p in m.parameters())


def test_global_ranking_is_uneven_but_totals_the_ratio():
    torch.manual_seed(0)
    m = Residual(c=8, inner=16)
    with torch.no_grad():
        m.ba.weight.mul_(1e-3)      # the first block's inner channels are all unimportant
        m.ba2.weight.mul_(10)
    sp.prune_channels(m, torch.randn(1, 3, 6, 6), 0.4, global_ranking=True, importance="bn_scale")
    assert m.ba.num_features == 1 < m.ba2.num_features   # all of it went but the one channel that stays
    total = m.bs.num_features + m.ba.num_features + m.ba2.num_features
    assert total == 40 - 16 + 1


def test_dry_run_reports_and_changes_nothing():
    torch.manual_seed(0)
    m = Seq()
    state = {k: v.clone() for k, v in m.state_dict().items()}
    rep = sp.prune_channels(m, torch.randn(1, 3, 8, 8), 0.5, dry_run=True)
    assert rep.dry_run and rep.params_after < rep.params_before and rep.macs_after < rep.macs_before
    for k, v in m.state_dict().items():
        assert torch.equal(v, state[k])
    layer = {l["name"]: l for l in rep.layers}
    assert (layer["c1"]["out_before"], layer["c1"]["out_after"]) == (8, 4)
    assert (layer["fc"]["in_before"], layer["fc"]["in_after"]) == (128, 64)
    text = str(rep)
    assert "c1" in text and "8->4" in text and "params:" in text and "MACs:" in text
    assert set(rep.as_dict()) >= {"layers", "groups", "skipped", "params_before", "macs_after"}


class Hardcoded(nn.Module):
    """One branch adds a plain tensor attribute (not a buffer): its width cannot follow a pruning."""
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.b = nn.Conv2d(8, 6, 1)
        self.c = nn.Conv2d(6, 4, 1)
        self.offset = torch.ones(1, 6, 1, 1)

    def forward(self, x):
        return self.c(F.relu(self.b(F.relu(self.a(x))) + self.offset))


def test_unsafe_group_is_left_alone_with_a_warning():
    torch.manual_seed(0)
    m = Hardcoded()
    x = torch.randn(1, 3, 4, 4)
    with pytest.warns(ChannelPruneWarning):
        m, rep = sp.prune_channels(m, x, 0.5, return_report=True)
    assert m.b.out_channels == 6 and m.a.out_channels == 4
    assert rep.skipped and "b" in rep.skipped[0]["layers"]
    assert _run(m, x).shape == (1, 4, 4, 4)


def test_heads_options():
    m, x = _tiny_bert()
    sp.prune_channels(m, x, 0.5, prune_heads=False, ignore=_attention_only(m))
    s = m.bert.encoder.layer[0].attention.self
    assert s.query.out_features == s.value.out_features == 32
    m, x = _tiny_bert()
    sp.prune_channels(m, x, 0.5, round_to=16, ignore=_attention_only(m))   # 2 heads of 8 = 16 channels
    assert m.bert.encoder.layer[0].attention.self.query.out_features == 16
    m, x = _tiny_bert()
    sp.prune_channels(m, x, 0.75, round_to=16, ignore=_attention_only(m))  # 1 head would be 8: keep 2
    assert m.bert.encoder.layer[0].attention.self.query.out_features == 16
    assert _run(m, x).logits.shape == (2, 3)


def test_tied_embeddings_stay_tied():
    m, x = _hf("gpt2")
    assert m.lm_head.weight is m.transformer.wte.weight
    sp.prune_channels(m, x, 0.5)
    assert m.lm_head.weight is m.transformer.wte.weight and m.lm_head.weight.shape[1] == 16
    assert _run(m, x).logits.shape == (1, 8, 64)


def test_tuple_inputs_train_mode_and_statistics_untouched():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(3, 8, 1)
            self.bn = nn.BatchNorm2d(8)
            self.c = nn.Conv2d(8, 2, 1)

        def forward(self, x, y):
            return self.c(F.relu(self.bn(self.a(x) + self.b(y))))
    m = Two().train()
    stats = (m.bn.running_mean.clone(), m.bn.num_batches_tracked.clone())
    x = (torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4))
    sp.prune_channels(m, x, 0.5)
    assert m.training and m.a.out_channels == m.b.out_channels == m.bn.num_features == 4
    assert torch.equal(m.bn.num_batches_tracked, stats[1])
    m.eval()
    assert _run(m, x).shape == (2, 2, 4, 4)
    m = Seq()
    ref = _run(m, torch.ones(1, 3, 8, 8))
    sp.prune_channels(m, torch.ones(1, 3, 8, 8), 0.0)   # ratio 0: nothing goes
    assert torch.equal(_run(m, torch.ones(1, 3, 8, 8)), ref)


def test_bad_arguments():
    m, x = Seq(), torch.randn(1, 3, 8, 8)
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="ratio"):
            sp.prune_channels(m, x, bad)
    for bad in ("0.5", None, float("nan"), True):
        with pytest.raises((TypeError, ValueError)):
            sp.prune_channels(m, x, bad)
    with pytest.raises(ValueError, match="importance"):
        sp.prune_channels(m, x, 0.5, importance="l3")
    with pytest.raises(ValueError, match="round_to"):
        sp.prune_channels(m, x, 0.5, round_to=0)
    with pytest.raises(TypeError, match="unexpected"):
        sp.prune_channels(m, x, 0.5, glob=True)
    with pytest.raises(TypeError, match="Module"):
        sp.prune_channels(lambda t: t, x, 0.5)
    with pytest.raises(TypeError, match="example_inputs"):
        sp.prune_channels(m, [1, 2], 0.5) if False else sp.prune_channels(m, 3, 0.5)
    with pytest.raises(ValueError, match="ignore"):
        sp.prune_channels(m, x, 0.5, ignore="nope")
    assert m.c1.out_channels == 8  # nothing changed by the refused calls
