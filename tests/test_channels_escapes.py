"""Structural pruning where channels escape the dependency graph's usual rules.

- Ops that combine the entries along the channel dim (softmax / log_softmax / cumsum / normalize over it,
  reductions and argmax over it, a reduction over the whole tensor): the producer's channels must stay,
  with a ChannelPruneWarning naming it, while the same ops over other dims (global pooling, softmax over
  positions) still prune.
- Convs written ``F.conv2d(x, self.w)`` with a parameter not called ``weight``.
- A call that raises (a failing channel rule, a warning turned into an error, a failure half-way through
  committing) leaves the model exactly as it was.

Every result is compared with an independent reference: a deep copy of the original model, either
unchanged or with the removed channels zeroed, evaluated in eval mode.
"""
import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sparseprune as sp
from sparseprune.prune import channels as ch
from sparseprune.prune.channels import ChannelPruner, ChannelPruneWarning

TOL = 1e-5

pytestmark = pytest.mark.usefixtures("one_thread")


def _x():
    return torch.randn(2, 3, 6, 5)   # batch, channels, height and width all differ


def _run(model, x):
    model.eval()
    with torch.no_grad():
        return model(x)


def _kept(new, old, dim):
    """Indices along ``dim`` of ``old`` that survive in ``new`` (slices matched by value)."""
    out = []
    for j in range(new.shape[dim]):
        s = new.detach().select(dim, j)
        out.append(next(i for i in range(old.shape[dim]) if torch.equal(old.detach().select(dim, i), s)))
    return out


def _removed(new, old, dim):
    kept = set(_kept(new, old, dim))
    return [i for i in range(old.shape[dim]) if i not in kept]


def _snapshot(model):
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    plain = (int, float, bool, str, tuple)
    attrs = {n: {k: v for k, v in vars(m).items() if not k.startswith("_") and type(v) in plain}
             for n, m in model.named_modules()}
    return sd, attrs, [id(p) for p in model.parameters()]


def _assert_unchanged(model, snap):
    sd, attrs, ids = snap
    now = model.state_dict()
    assert list(now) == list(sd)
    for k, v in sd.items():
        assert now[k].shape == v.shape and now[k].dtype == v.dtype and torch.equal(now[k], v), k
    assert {n: {k: v for k, v in vars(m).items() if k in attrs[n]} for n, m in model.named_modules()} == attrs
    assert [id(p) for p in model.parameters()] == ids   # the same Parameter objects (optimizers hold them)


# ------------------------------------------------------------------------------------------ mixing ops
class Mix(nn.Module):
    """c1 -> relu -> ``op`` -> a head that reads what ``op`` returns."""

    def __init__(self, op, head):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.op, self.kind = op, head
        if head == "conv8":      # op keeps (2, 8, H, W)
            self.head = nn.Conv2d(8, 4, 1)
        elif head == "conv1":    # op keeps the channel dim with size 1
            self.head = nn.Conv2d(1, 4, 1)
        elif head == "plane":    # op returns (2, H, W)
            self.head = nn.Linear(30, 4)
        else:                    # op returns indices (2, H, W)
            self.head = nn.Embedding(8, 4)

    def forward(self, x):
        y = self.op(F.relu(self.c1(x)))
        if self.kind in ("conv8", "conv1"):
            return self.head(y).mean((2, 3))
        if self.kind == "plane":
            return self.head(y.flatten(1))
        return self.head(y).mean((1, 2))


MIXING = {
    "softmax": (lambda h: torch.softmax(h, 1), "conv8"),
    "log_softmax": (lambda h: F.log_softmax(h, dim=1), "conv8"),
    "softmax2d_module": (nn.Softmax2d(), "conv8"),
    "cumsum": (lambda h: h.cumsum(1), "conv8"),
    "normalize": (lambda h: F.normalize(h), "conv8"),           # L2 over dim 1 by default
    "whole_amax": (lambda h: h / (h.amax() + 1), "conv8"),     # a reduction over every dim covers the channels
    "sum_keepdim": (lambda h: h.exp() / h.exp().sum(1, keepdim=True), "conv8"),  # a softmax written by hand
    "sum": (lambda h: h.sum(1), "plane"),
    "amax": (lambda h: h.amax(dim=1), "plane"),
    "max_values": (lambda h: h.max(1).values, "plane"),
    "std": (lambda h: h.std(1), "plane"),
    "norm_p_dim": (lambda h: h.norm(2, 1), "plane"),           # norm(p, dim): the dim is the second argument
    "logsumexp": (lambda h: torch.logsumexp(h, 1), "plane"),
    "argmax": (lambda h: h.argmax(1), "embed"),
    "argmin": (lambda h: torch.argmin(h, dim=1), "embed"),
}


@pytest.mark.parametrize("case", sorted(MIXING))
def test_op_mixing_the_channel_dim_keeps_its_producer(case):
    op, head = MIXING[case]
    torch.manual_seed(0)
    m = Mix(op, head).eval()
    x = _x()
    ref = copy.deepcopy(m)
    snap = _snapshot(m)
    with warnings.catch_warnings(record=True) as ws:
        warnings.simplefilter("always")
        m, rep = sp.prune_channels(m, x, 0.5, return_report=True)
    assert m.c1.out_channels == 8 and m.c1.weight.shape == (8, 3, 3, 3)
    _assert_unchanged(m, snap)   # nothing else in these models may go either
    assert torch.equal(_run(m, x), _run(ref, x))
    named = [str(w.message) for w in ws if issubclass(w.category, ChannelPruneWarning)]
    assert len(named) == 1 and "left alone c1:" in named[0]
    assert [s["layers"] for s in rep.skipped] == ["c1"]


# ------------------------------------------------------------------------------------------ controls
CONTROLS = {  # (2, 8, H, W) -> (2, 8): ops over other dims than the channels
    "global_avg_pool": lambda h: h.mean((2, 3)),
    "adaptive_pool_flatten": lambda h: torch.flatten(F.adaptive_avg_pool2d(h, 1), 1),
    "softmax_over_positions": lambda h: (h.flatten(2).softmax(-1) * h.flatten(2)).sum(-1),
    "amax_over_positions": lambda h: h.amax((2, 3)),
    "cumsum_over_width": lambda h: h.cumsum(3).mean((2, 3)),
    "topk_over_positions": lambda h: h.flatten(2).topk(3, dim=-1).values.mean(-1),
}


class TwoBranch(nn.Module):
    """Branch a mixes its channels (softmax over dim 1); branch b pools them with ``ctrl``."""

    def __init__(self, ctrl):
        super().__init__()
        self.ctrl = ctrl
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1)
        self.b = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        a = self.c2(torch.softmax(self.c1(x), 1)).mean((2, 3))
        return a + self.fc(self.ctrl(F.relu(self.b(x))))


@pytest.mark.parametrize("case", sorted(CONTROLS))
def test_ops_over_other_dims_still_prune(case):
    torch.manual_seed(0)
    m = TwoBranch(CONTROLS[case]).eval()
    x = _x()
    ref = copy.deepcopy(m)
    with warnings.catch_warnings(record=True) as ws:
        warnings.simplefilter("always")
        m, rep = sp.prune_channels(m, x, 0.5, return_report=True)
    assert m.c1.out_channels == 8 and m.c2.in_channels == 8
    assert m.b.out_channels == 4 and m.fc.in_features == 4
    gone = _removed(m.b.bias, ref.b.bias, 0)
    with torch.no_grad():   # the pooled channels are independent: silencing the removed ones is the same model
        ref.b.weight[gone] = 0
        ref.b.bias[gone] = 0
    assert (_run(m, x) - _run(ref, x)).abs().max().item() < TOL
    named = [str(w.message) for w in ws if issubclass(w.category, ChannelPruneWarning)]
    assert len(named) == 1 and "left alone c1:" in named[0] and "softmax" in named[0]
    assert [s["layers"] for s in rep.skipped] == ["c1"]


# ------------------------------------------------------------------------------------------ functional convs
class Functional(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 3, 3, 3) * 0.2)
        self.c2 = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.c2(F.relu(F.conv2d(x, self.w, padding=1))).mean((2, 3))


class FunctionalDepthwise(nn.Module):
    """A prunable F.conv2d, then a depthwise F.conv2d whose groups are written as a number (its channels
    cannot go: that group is left alone)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 3, 3, 3) * 0.3)
        self.mid = nn.Conv2d(8, 8, 1)
        self.dw = nn.Parameter(torch.randn(8, 1, 3, 3) * 0.3)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        h = F.relu(self.mid(F.relu(F.conv2d(x, self.w, padding=1))))
        return self.head(F.relu(F.conv2d(h, self.dw, padding=1, groups=8))).mean((2, 3))


class FunctionalTransposed(nn.Module):
    def __init__(self):
        super().__init__()
        self.c0 = nn.Conv2d(3, 8, 3, padding=1)
        self.wt = nn.Parameter(torch.randn(8, 6, 3, 3) * 0.2)
        self.c2 = nn.Conv2d(6, 4, 1)

    def forward(self, x):
        h = F.relu(F.conv_transpose2d(F.relu(self.c0(x)), self.wt, padding=1))
        return self.c2(h).mean((2, 3))


def test_functional_conv_on_a_parameter_not_called_weight():
    torch.manual_seed(0)
    m, x = Functional().eval(), _x()
    ref = copy.deepcopy(m)
    sp.prune_channels(m, x, 0.5)
    assert m.w.shape[0] == m.c2.in_channels == m.c2.weight.shape[1] in (4, 8)
    with torch.no_grad():
        ref.w[_removed(m.w, ref.w, 0)] = 0
    assert (_run(m, x) - _run(ref, x)).abs().max().item() < TOL


def test_functional_depthwise_with_literal_groups_is_left_alone_the_rest_prunes():
    torch.manual_seed(0)
    m, x = FunctionalDepthwise().eval(), _x()
    ref = copy.deepcopy(m)
    with pytest.warns(ChannelPruneWarning, match="mid"):
        sp.prune_channels(m, x, 0.5)
    assert m.dw.shape == (8, 1, 3, 3) and m.mid.out_channels == 8 and m.head.in_channels == 8
    assert m.w.shape[0] == m.mid.in_channels == 4
    with torch.no_grad():
        ref.w[_removed(m.w, ref.w, 0)] = 0
    assert (_run(m, x) - _run(ref, x)).abs().max().item() < TOL


def test_functional_conv_transpose_on_a_parameter_not_called_weight():
    torch.manual_seed(0)
    m, x = FunctionalTransposed().eval(), _x()
    ref = copy.deepcopy(m)
    sp.prune_channels(m, x, 0.5)
    assert m.c0.out_channels == m.wt.shape[0] == 4 and m.wt.shape[1] == m.c2.in_channels == 3
    with torch.no_grad():
        gone0 = _removed(m.c0.bias, ref.c0.bias, 0)
        ref.c0.weight[gone0] = 0
        ref.c0.bias[gone0] = 0
        ref.wt[:, _removed(m.c2.weight, ref.c2.weight, 1)] = 0
    assert (_run(m, x) - _run(ref, x)).abs().max().item() < TOL


# ------------------------------------------------------------------------------------------ a call that raises
class Scale(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.s = nn.Parameter(torch.rand(c) + 0.5)
        self.features = c

    def forward(self, x):
        return x * self.s.view(1, -1, 1, 1)


class Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.scale, self.c2 = nn.Conv2d(3, 8, 3, padding=1), Scale(8), nn.Conv2d(8, 4, 1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        return self.c2(F.relu(self.bn(self.scale(self.c1(x))))).mean((2, 3))


def test_failing_channel_rule_leaves_the_model_as_it_was():
    def update(mod):
        mod.features = mod.s.shape[0]   # changed, then the rule fails
        raise RuntimeError("rule failed")

    ch.register_channel_rule(Scale, out_params={"s": 0}, same_channels=True, in_dim=1, out_dim=1, update=update)
    try:
        torch.manual_seed(0)
        m, x = Scaled().eval(), _x()
        ref = copy.deepcopy(m)
        snap = _snapshot(m)
        with pytest.raises(RuntimeError, match="rule failed"):
            sp.prune_channels(m, x, 0.5)
    finally:
        ch.unregister_channel_rule(Scale)
    _assert_unchanged(m, snap)
    assert m.c1.out_channels == m.bn.num_features == m.scale.features == m.c2.in_channels == 8
    assert torch.equal(_run(m, x), _run(ref, x))


class Hardcoded(nn.Module):
    """b's channels meet a plain tensor attribute of fixed width: removing them fails, a's may go."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 6, 1), nn.Conv2d(6, 4, 1)
        self.offset = torch.ones(1, 6, 1, 1)

    def forward(self, x):
        return self.c(F.relu(self.b(F.relu(self.a(x))) + self.offset)).mean((2, 3))


def test_warning_turned_into_an_error_leaves_the_model_as_it_was():
    torch.manual_seed(0)
    m, x = Hardcoded().eval(), _x()
    ref = copy.deepcopy(m)
    snap = _snapshot(m)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ChannelPruneWarning)
        with pytest.raises(ChannelPruneWarning, match="left alone b"):
            sp.prune_channels(m, x, 0.5)
    _assert_unchanged(m, snap)
    assert m.a.out_channels == m.b.in_channels == 8
    assert torch.equal(_run(m, x), _run(ref, x))
    with warnings.catch_warnings():   # the same call without the error filter prunes a, leaves b alone
        warnings.simplefilter("ignore", ChannelPruneWarning)
        sp.prune_channels(m, x, 0.5)
    assert m.a.out_channels == m.b.in_channels == 4 and m.b.out_channels == 6


class _PopFails(dict):
    def pop(self, *args):
        raise RuntimeError("commit failed")


def test_failure_half_way_through_the_commit_puts_model_and_trace_back():
    torch.manual_seed(0)
    m, x = TwoBranch(CONTROLS["global_avg_pool"]).eval(), _x()
    fresh = copy.deepcopy(m)
    snap = _snapshot(m)
    pruner = ChannelPruner(m, x, 0.5)
    pruner.tr.owners = _PopFails(pruner.tr.owners)   # _commit has already shrunk the slots when it pops
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ChannelPruneWarning)
        with pytest.raises(RuntimeError, match="commit failed"):
            pruner.step()
        _assert_unchanged(m, snap)
        pruner.step()                                  # the trace was put back too: the step can run again
        sp.prune_channels(fresh, x, 0.5)
    assert m.b.out_channels == m.fc.in_features == 4
    got, want = m.state_dict(), fresh.state_dict()
    assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert torch.equal(_run(m, x), _run(fresh, x))


# ------------------------------------------------------------------------------ norms written by hand
class _NormMlp(nn.Module):
    """Linear -> LayerNorm or RMSNorm over the features -> Linear; ``hand``: the norm written out (mean / var with
    keepdim=True, as T5's and Llama's RMSNorm are), else nn.LayerNorm / nn.RMSNorm with the same weights."""

    def __init__(self, kind, hand):
        super().__init__()
        self.kind, self.hand = kind, hand
        self.a, self.b = nn.Linear(16, 64), nn.Linear(64, 4)
        self.n = nn.LayerNorm(64) if kind == "layer" else nn.RMSNorm(64, eps=1e-6)

    def forward(self, x):
        h = self.a(x)
        if not self.hand:
            return self.b(self.n(h))
        if self.kind == "layer":
            mu, var = h.mean(-1, keepdim=True), h.var(-1, keepdim=True, unbiased=False)
            h = (h - mu) / torch.sqrt(var + self.n.eps) * self.n.weight + self.n.bias
        else:
            h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * self.n.weight
        return self.b(h)


@pytest.mark.parametrize("kind", ["layer", "rms"])
def test_norms_written_by_hand_prune_as_the_norm_modules_do(kind):
    torch.manual_seed(0)
    mod = _NormMlp(kind, hand=False).eval()
    with torch.no_grad():
        mod.n.weight.uniform_(0.5, 1.5)
    hand = copy.deepcopy(mod)
    hand.hand = True
    x = torch.randn(5, 16)
    with torch.no_grad():
        torch.testing.assert_close(hand(x), mod(x), rtol=1e-5, atol=1e-5)
    for m in (mod, hand):
        with warnings.catch_warnings():
            warnings.simplefilter("error", ChannelPruneWarning)
            sp.prune_channels(m, x, 0.5)
    assert mod.a.out_features == hand.a.out_features == 32 and hand.b.in_features == 32
    assert torch.equal(mod.a.weight, hand.a.weight)  # the same channels kept
    with torch.no_grad():
        torch.testing.assert_close(hand(x), mod(x), rtol=1e-5, atol=1e-5)
