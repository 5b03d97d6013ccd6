"""Controls of structural pruning: keep_outputs / freeze, layer_ratios, head_ratio, prune_head_dims,
ChannelPruner steps over one trace, register_channel_rule, any Mapping as example_inputs.

Every control is checked with the dead-channel oracle: channels made exactly zero by hand (producer
weights, norm scale and shift, consumer weights) are the lowest-scoring ones, so they are the ones
removed, and removing them must change no output.
"""
import collections

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sparseprune as sp
from sparseprune.prune import channels as ch
from sparseprune.prune import graph

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings, strategies as st  # noqa: E402

TOL = 1e-5

pytestmark = pytest.mark.usefixtures("one_thread")


def _run(model, x):
    model.eval()
    with torch.no_grad():
        return ch.call_model(model, x)


def _same(a, b):
    return (a - b).abs().max().item() < TOL


# ------------------------------------------------------------------------------------------ models
class CNN(nn.Module):
    def __init__(self, c1=8, c2=16):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, c1, 3, padding=1, bias=False), nn.BatchNorm2d(c1)
        self.conv2, self.bn2 = nn.Conv2d(c1, c2, 3, padding=1, bias=False), nn.BatchNorm2d(c2)
        self.fc = nn.Linear(c2, 4)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


def _randomize(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.bias.shape, generator=g))
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model


def _kill(conv, bn, idx, consumer=None):
    with torch.no_grad():
        conv.weight[idx] = 0
        bn.weight[idx] = 0
        bn.bias[idx] = 0
        if consumer is not None:
            consumer.weight[:, idx] = 0


class Attention(nn.Module):
    """Hugging Face style: view(..., -1, head_size), the softmax scale stored at construction."""
    def __init__(self, dim=32, heads=4):
        super().__init__()
        self.num_attention_heads, self.attention_head_size = heads, dim // heads
        self.all_head_size = dim
        self.scaling = self.attention_head_size ** -0.5
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = (lin(x).view(b, n, -1, self.attention_head_size).transpose(1, 2) for lin in (self.q, self.k, self.v))
        att = torch.softmax(q @ k.transpose(-2, -1) * self.scaling, dim=-1)
        return self.o((att @ v).transpose(1, 2).reshape(b, n, self.all_head_size))


class Block(nn.Module):
    def __init__(self, dim=32, heads=4):
        super().__init__()
        self.attn = Attention(dim, heads)
        self.ln = nn.LayerNorm(dim)
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, x):
        x = x + self.attn(self.ln(x))
        return x + self.fc2(F.gelu(self.fc1(x)))


def _kill_heads(att, heads, positions=None):
    """Zero whole heads, or (positions given) the same head-dim positions of every head."""
    hd = att.attention_head_size
    if positions is None:
        rows = [h * hd + j for h in heads for j in range(hd)]
    else:
        rows = [h * hd + j for h in range(att.num_attention_heads) for j in positions]
    with torch.no_grad():
        for lin in (att.q, att.k, att.v):
            lin.weight[rows] = 0
            lin.bias[rows] = 0
        att.o.weight[:, rows] = 0


# ------------------------------------------------------------------------------------------ keep_outputs / freeze
def test_keep_outputs_keeps_outputs_only_freeze_keeps_both():
    x = torch.randn(2, 3, 8, 8)
    m = sp.prune_channels(CNN(), x, 0.5, keep_outputs=["conv2"])
    assert (m.conv2.in_channels, m.conv2.out_channels, m.bn2.num_features) == (4, 16, 16)
    m = sp.prune_channels(CNN(), x, 0.5, freeze=["conv2"])
    assert (m.conv1.out_channels, m.conv2.in_channels, m.conv2.out_channels) == (8, 8, 16)
    m = sp.prune_channels(CNN(), x, 0.5, ignore=["conv2"])   # the old name keeps the old meaning
    assert (m.conv1.out_channels, m.conv2.out_channels) == (8, 16)


def test_classifier_listed_keeps_its_outputs_either_way():
    x = torch.randn(2, 3, 8, 8)
    m = sp.prune_channels(CNN(), x, 0.5, keep_outputs=[CNN().fc.__class__])  # by class
    assert (m.fc.in_features, m.fc.out_features, m.conv2.out_channels) == (8, 4, 8)
    m = CNN()
    sp.prune_channels(m, x, 0.5, freeze=[m.fc])                               # by object
    assert (m.fc.in_features, m.conv2.out_channels, m.conv1.out_channels) == (16, 16, 4)
    assert _run(m, x).shape == (2, 4)


def test_keep_outputs_dead_channels_exact():
    torch.manual_seed(0)
    m = _randomize(CNN())
    x = torch.randn(2, 3, 8, 8)
    _kill(m.conv1, m.bn1, [1, 2, 5, 6], m.conv2)
    ref = _run(m, x)
    sp.prune_channels(m, x, 0.5, keep_outputs=["conv2", "bn2"])
    assert m.conv1.out_channels == 4 and m.conv2.out_channels == 16
    assert _same(_run(m, x), ref)
    assert bool((m.bn1.weight != 0).all())   # exactly the dead ones went


def test_keep_outputs_validation():
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(ValueError, match="keep_outputs"):
        sp.prune_channels(CNN(), x, 0.5, keep_outputs=["nope"])
    with pytest.raises(TypeError, match="freeze"):
        sp.prune_channels(CNN(), x, 0.5, freeze=[3])


# ------------------------------------------------------------------------------------------ layer ratios
def test_layer_ratios_by_pattern_and_module():
    x = torch.randn(2, 3, 8, 8)
    m = sp.prune_channels(CNN(), x, 0.5, layer_ratios={"conv1": 0.25, "conv*": 0.75})
    assert (m.conv1.out_channels, m.conv2.out_channels) == (6, 4)   # smallest matching ratio wins
    m = CNN()
    sp.prune_channels(m, x, 0.5, layer_ratios={m.conv2: 0.0})
    assert (m.conv1.out_channels, m.conv2.out_channels) == (4, 16)
    m = CNN()
    sp.prune_channels(m, x, 0.5, global_ranking=True, layer_ratios={"conv2": 0.25})
    assert m.conv2.out_channels == 12
    with pytest.raises(ValueError, match="layer_ratios"):
        sp.prune_channels(CNN(), x, 0.5, layer_ratios={"conv1": 1.0})


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2 ** 16), k1=st.integers(1, 7), k2=st.integers(1, 15))
def test_layer_ratios_dead_channels_exact(seed, k1, k2):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    m = _randomize(CNN(), seed)
    x = torch.randn(2, 3, 8, 8)
    d1 = torch.randperm(8, generator=g)[:k1].tolist()
    d2 = torch.randperm(16, generator=g)[:k2].tolist()
    _kill(m.conv1, m.bn1, d1, m.conv2)
    _kill(m.conv2, m.bn2, d2, m.fc)
    ref = _run(m, x)
    sp.prune_channels(m, x, 0.9, layer_ratios={"conv1": k1 / 8, "conv2": k2 / 16})
    assert (m.conv1.out_channels, m.conv2.out_channels) == (8 - k1, 16 - k2)
    assert _same(_run(m, x), ref)


# ------------------------------------------------------------------------------------------ heads
def test_head_ratio_separate_from_ratio():
    torch.manual_seed(0)
    m = Block()
    x = torch.randn(2, 5, 32)
    sp.prune_channels(m, x, 0.0, head_ratio=0.5)
    assert m.attn.num_attention_heads == 2 and m.attn.q.out_features == 16
    assert m.fc1.out_features == 64 and m.ln.normalized_shape == (32,)
    m = Block()
    sp.prune_channels(m, x, 0.5, head_ratio=0.25)
    assert m.attn.num_attention_heads == 3 and m.fc1.out_features == 32
    assert _run(m, x).shape == (2, 5, 32)


def test_head_ratio_dead_heads_exact():
    torch.manual_seed(1)
    m = Block()
    x = torch.randn(2, 5, 32)
    _kill_heads(m.attn, [0, 2])
    ref = _run(m, x)
    sp.prune_channels(m, x, 0.0, head_ratio=0.5)
    assert (m.attn.num_attention_heads, m.attn.attention_head_size, m.attn.all_head_size) == (2, 8, 16)
    assert _same(_run(m, x), ref)


@settings(max_examples=5, deadline=None)
@given(seed=st.integers(0, 2 ** 16), k=st.integers(1, 7))
def test_head_dims_dead_positions_exact(seed, k):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    m = Block()
    x = torch.randn(2, 5, 32)
    pos = torch.randperm(8, generator=g)[:k].tolist()
    _kill_heads(m.attn, None, pos)
    ref = _run(m, x)
    sp.prune_channels(m, x, 0.0, head_ratio=k / 8, prune_head_dims=True)
    a = m.attn
    assert (a.num_attention_heads, a.attention_head_size, a.all_head_size) == (4, 8 - k, 4 * (8 - k))
    assert a.q.out_features == a.k.out_features == a.v.out_features == a.o.in_features == 4 * (8 - k)
    assert _same(_run(m, x), ref)


def test_head_dims_on_torch_mha_and_fused_qkv_stay_consistent():
    m = nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, dropout=0.0, batch_first=True)
    x = torch.randn(2, 5, 32)
    sp.prune_channels(m, x, 0.5, prune_head_dims=True)
    assert m.self_attn.num_heads == 4 and _run(m, x).shape == (2, 5, 32)


# ------------------------------------------------------------------------------------------ steps
def test_pruner_steps_reuse_one_trace(monkeypatch):
    calls = []
    real = graph.trace
    monkeypatch.setattr(graph, "trace", lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.manual_seed(0)
    m = _randomize(CNN())
    x = torch.randn(2, 3, 8, 8)
    pruner = sp.prune.channels.ChannelPruner(m, x, 0.5, steps=3)
    widths = []
    for k1, k2 in ((1, 2), (1, 3), (2, 3)):
        # "fine-tuning" between steps: as many channels die as the step removes; it must take them
        _kill(m.conv1, m.bn1, (m.bn1.weight != 0).nonzero().view(-1).tolist()[:k1], m.conv2)
        _kill(m.conv2, m.bn2, (m.bn2.weight != 0).nonzero().view(-1).tolist()[:k2], m.fc)
        ref = _run(m, x)
        pruner.step()
        widths.append((m.conv1.out_channels, m.conv2.out_channels))
        assert _same(_run(m, x), ref)
    assert widths == [(7, 14), (6, 11), (4, 8)]
    assert len(calls) == 1
    with pytest.raises(RuntimeError, match="steps"):
        pruner.step()


def test_pruner_steps_heads_depthwise_and_global():
    torch.manual_seed(0)
    m = Block()
    x = torch.randn(2, 5, 32)
    p = sp.prune.channels.ChannelPruner(m, x, 0.5, steps=2, head_ratio=0.5)
    p.step()
    assert m.attn.num_attention_heads == 3 and _run(m, x).shape == (2, 5, 32)
    _, rep = p.step(return_report=True)
    assert m.attn.num_attention_heads == 2 and m.fc1.out_features == 32 and rep.params_after < rep.params_before

    dw = nn.Sequential(nn.Conv2d(3, 16, 1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1, groups=16),
                       nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 8, 1))
    xi = torch.randn(2, 3, 6, 6)
    p = sp.prune.channels.ChannelPruner(dw, xi, 0.5, steps=2, global_ranking=True)
    for _ in range(2):
        p.step()
        assert dw[3].groups == dw[3].in_channels == dw[3].out_channels == dw[0].out_channels
        assert _run(dw, xi).shape == (2, 8, 6, 6)
    assert dw[0].out_channels < 16


# ------------------------------------------------------------------------------------------ custom modules
class EinsumLinear(nn.Module):
    """A custom layer the tracer cannot see into: weight stored (in, out), applied with einsum."""
    def __init__(self, i, o):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(i, o) / i ** 0.5)
        self.bias = nn.Parameter(torch.randn(o))
        self.features = o

    def forward(self, x):
        return torch.einsum("bi,io->bo", x, self.weight) + self.bias


class Gain(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.g = nn.Parameter(torch.rand(c) + 0.5)

    def forward(self, x):
        return torch.einsum("bc,c->bc", x, self.g)


class Custom(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.gain, self.mid, self.fc2 = nn.Linear(6, 16), Gain(16), EinsumLinear(16, 12), nn.Linear(12, 3)

    def forward(self, x):
        return self.fc2(F.relu(self.mid(F.relu(self.gain(self.fc1(x))))))


@pytest.fixture
def rules():
    ch.register_channel_rule(EinsumLinear, in_params={"weight": 0}, out_params={"weight": 1, "bias": 0},
                             update=lambda m: setattr(m, "features", m.weight.shape[1]))
    ch.register_channel_rule(Gain, out_params={"g": 0}, same_channels=True)
    yield
    ch.unregister_channel_rule(EinsumLinear)
    ch.unregister_channel_rule(Gain)


def test_custom_module_without_rule_is_kept():
    x = torch.randn(4, 6)
    m = Custom()
    sp.prune_channels(m, x, 0.5)
    assert (m.fc1.out_features, m.mid.weight.shape) == (16, (16, 12))


def test_custom_module_rule_dead_channels_exact(rules):
    torch.manual_seed(0)
    m = Custom()
    x = torch.randn(4, 6)
    with torch.no_grad():
        m.fc1.weight[[0, 3, 4, 9, 10, 11, 14, 15]] = 0
        m.fc1.bias[[0, 3, 4, 9, 10, 11, 14, 15]] = 0
        m.mid.weight[[0, 3, 4, 9, 10, 11, 14, 15]] = 0
        m.mid.weight[:, [1, 2, 5, 7, 8, 11]] = 0
        m.mid.bias[[1, 2, 5, 7, 8, 11]] = 0
        m.fc2.weight[:, [1, 2, 5, 7, 8, 11]] = 0
    ref = _run(m, x)
    sp.prune_channels(m, x, 0.5)
    assert (m.fc1.out_features, m.gain.g.numel(), tuple(m.mid.weight.shape), m.mid.features) == (8, 8, (8, 6), 6)
    assert m.fc2.in_features == 6
    assert _same(_run(m, x), ref)


def test_custom_rule_validation():
    with pytest.raises(TypeError):
        ch.register_channel_rule(int)
    with pytest.raises(TypeError):
        ch.register_channel_rule(Gain, out_params={"g": "0"})


# ------------------------------------------------------------------------------------------ inputs
class KW(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 2)

    def forward(self, x, scale=1.0):
        return self.b(F.relu(self.a(x))) * scale


class Frozen(collections.abc.Mapping):
    def __init__(self, **kw):
        self._d = kw

    def __getitem__(self, k):
        return self._d[k]

    def __iter__(self):
        return iter(self._d)

    def __len__(self):
        return len(self._d)


def test_any_mapping_is_keyword_arguments():
    x = torch.randn(3, 4)
    for inputs in (Frozen(x=x, scale=2.0), collections.UserDict(x=x), {"x": x}):
        m = KW()
        rep = sp.prune_channels(m, inputs, 0.5, dry_run=True)
        assert rep.params_after < rep.params_before
        sp.prune_channels(m, inputs, 0.5)
        assert m.a.out_features == 4


def test_dry_run_with_new_controls_leaves_model_alone():
    m = Block()
    x = torch.randn(2, 5, 32)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    rep = sp.prune_channels(m, x, 0.5, head_ratio=0.25, layer_ratios={m.fc1: 0.25}, keep_outputs=[m.attn.o],
                            dry_run=True)
    assert rep.dry_run and rep.params_after < rep.params_before
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


# ------------------------------------------------------------------------------------------ tracing cost
class Padded(nn.Module):
    """Explicit padding (as Hugging Face MobileNetV2 does): label borders carry no channel."""
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 16, 3), nn.Conv2d(16, 16, 3, groups=16)
        self.c3 = nn.Conv2d(16, 8, 1)

    def forward(self, x):
        x = F.relu(self.c1(F.pad(x, (1, 1, 1, 1))))
        x = F.relu(self.c2(F.pad(x, (1, 1, 1, 1))))
        return self.c3(x).mean((2, 3))


def test_tracing_never_sorts_activations_row_wise(monkeypatch):
    """torch.unique(dim=...) over activation-sized label tensors made tracing superlinear (seconds per
    conv at 112x112); labels must be reduced per channel instead."""
    real = torch.unique

    def unique(*a, **k):
        assert k.get("dim") is None, "unique(dim=...) in tracing"
        return real(*a, **k)

    monkeypatch.setattr(torch, "unique", unique)
    m = Padded()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for t in (m.c1.weight, m.c1.bias, m.c2.weight, m.c2.bias):
            t[:8] = 0
        m.c3.weight[:, :8] = 0
    ref = _run(m, x)
    sp.prune_channels(m, x, 0.5)
    assert m.c1.out_channels == 8 and m.c2.groups == 8 and _same(_run(m, x), ref)


def test_pruner_steps_record_reshaped_modules_for_save(tmp_path):
    from sparseprune.io import RESHAPED_ATTR
    m = CNN()
    x = torch.randn(2, 3, 8, 8)
    p = sp.prune.channels.ChannelPruner(m, x, 0.5, steps=2)
    p.step()
    p.step()
    assert {"conv1", "bn1", "conv2", "bn2", "fc"} <= set(getattr(m, RESHAPED_ATTR))
    sp.save(m, tmp_path / "m.sp")
    fresh = sp.load(tmp_path / "m.sp", CNN())
    assert _same(_run(fresh, x), _run(m, x))
