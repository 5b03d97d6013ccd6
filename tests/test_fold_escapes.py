"""BatchNorm folding and activation fusion only where nothing else sees the tensor they change.

A conv output kept on the module (``self.feat = c``), in a list, or returned from ``forward`` next to its
activation, and a BatchNorm read by hand (``self.bn.running_mean``, ``self.bn.eps``), stop the fold / fusion:
the converted model gives the source model's values for its output and for every tensor it kept. A folded
int8 / bf16 ``SparseConv2d`` keeps its weight dtype."""
import pytest
import torch
from torch import nn

import sparseprune as sp
from sparseprune.fold import find_conv_bn_pairs, fold_batchnorm, fold_conv_bn

pytestmark = pytest.mark.usefixtures("one_thread", "sparse_layers_win")

C = 32
FEATS = []  # a module-level store of features, as feature-extraction code keeps them


def _close(got, want):
    """Equal within float32 tolerance: 1e-4 of the reference's largest magnitude."""
    assert got.shape == want.shape
    assert (got - want).abs().max().item() <= 1e-4 * max(want.abs().max().item(), 1e-6)


def _conv():
    return nn.Conv2d(C, C, 3, padding=1)


class _Base(nn.Module):
    def __init__(self):
        super().__init__()
        self.c, self.bn, self.r, self.c2 = _conv(), nn.BatchNorm2d(C), nn.ReLU(), _conv()


class Stash(_Base):  # fx traces it; the attribute store is not in the graph
    def forward(self, x):
        c = self.c(x)
        self.feat = c
        return self.c2(self.r(self.bn(c)))


class StashInList(_Base):
    def forward(self, x):
        c = self.c(x)
        FEATS.append(c)
        return self.c2(self.r(self.bn(c)))


class StashNormalized(_Base):  # the BatchNorm's output is kept: fold, but the ReLU must not be fused
    def forward(self, x):
        b = self.bn(self.c(x))
        self.feat = b
        return self.c2(self.r(b))


class ReturnTuple(nn.Module):
    def __init__(self):
        super().__init__()
        self.c, self.r, self.c2 = _conv(), nn.ReLU(), _conv()

    def forward(self, x):
        c = self.c(x)
        return self.c2(self.r(c)), c


class ReturnDict(ReturnTuple):
    def forward(self, x):
        c = self.c(x)
        return {"out": self.c2(self.r(c)), "pre_act": c}


class ReturnUntraceable(_Base):
    def forward(self, x):
        if x.sum() > -1e30:  # data-dependent control flow: fx cannot trace it
            c = self.c(x)
        return self.c2(self.r(self.bn(c))), c


class ReadsRunningMean(_Base):
    def forward(self, x):
        y = self.bn(self.c(x))
        return self.c2(y) - self.bn.running_mean.view(1, -1, 1, 1)


class ReadsEps(_Base):
    def forward(self, x):
        return self.c2(self.r(self.bn(self.c(x)))) * (1.0 + self.bn.eps)


def _model(cls):
    torch.manual_seed(0)
    m = cls()
    for bn in [b for b in m.modules() if isinstance(b, nn.BatchNorm2d)]:
        with torch.no_grad():
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2)
            bn.weight.normal_(1, 0.3)
            bn.bias.normal_(0, 0.3)
    sp.prune_blocks(m, 0.5, block_size=(8, 8), dense_first_last=False)
    return m.eval()


def _convert(m, x):
    return sp.convert(m, x, formats=("bsr",), end_to_end=False, time_budget=2.0, cache=False, progress=False)


def _changed(fast):
    t = sp.summary(fast, print_fn=None).totals
    return [f["bn"] for f in t["folded"]], [f["layer"] for f in t["fused"]]


def _outputs(out):
    if isinstance(out, dict):
        return list(out.values())
    return list(out) if isinstance(out, tuple) else [out]


@pytest.mark.parametrize("cls", [Stash, StashInList])
def test_conv_output_kept_by_the_forward_is_neither_folded_nor_fused(cls):
    m, x = _model(cls), torch.randn(2, C, 8, 8)
    with torch.no_grad():
        ref = m(x)
        kept_ref = (m.feat if cls is Stash else FEATS[-1]).clone()
    fast = _convert(m, x)
    with torch.no_grad():
        _close(fast(x), ref)
    _close(fast.feat if cls is Stash else FEATS[-1], kept_ref)  # was relu(bn(conv(x))), silently
    FEATS.clear()
    assert _changed(fast) == ([], [])
    assert isinstance(fast.bn, nn.BatchNorm2d) and fast.c.activation == "none"


def test_kept_batchnorm_output_is_folded_but_not_fused():
    m, x = _model(StashNormalized), torch.randn(2, C, 8, 8)
    with torch.no_grad():
        ref = m(x)
        kept_ref = m.feat.clone()
    fast = _convert(m, x)
    with torch.no_grad():
        _close(fast(x), ref)
    _close(fast.feat, kept_ref)
    assert _changed(fast) == (["bn"], [])


@pytest.mark.parametrize("cls", [ReturnTuple, ReturnDict, ReturnUntraceable])
def test_conv_output_returned_as_well_is_left_alone(cls):
    m, x = _model(cls), torch.randn(2, C, 8, 8)
    with torch.no_grad():
        ref = m(x)
    fast = _convert(m, x)  # used to raise ConversionError: the returned raw output had changed
    with torch.no_grad():
        got = fast(x)
    for a, b in zip(_outputs(got), _outputs(ref)):
        _close(a, b)
    assert _changed(fast) == ([], [])


@pytest.mark.parametrize("cls", [ReadsRunningMean, ReadsEps])
def test_batchnorm_read_by_hand_is_not_folded(cls):
    m, x = _model(cls), torch.randn(2, C, 8, 8)
    with torch.no_grad():
        ref = m(x)
    fast = _convert(m, x)  # used to fail: the forward read .running_mean / .eps of the Identity left behind
    with torch.no_grad():
        _close(fast(x), ref)
    assert _changed(fast)[0] == [] and isinstance(fast.bn, nn.BatchNorm2d)
    assert find_conv_bn_pairs(m) == [] and find_conv_bn_pairs(m, x) == []


def test_fold_batchnorm_without_inputs_sees_the_stored_conv_output():
    m, x = _model(Stash), torch.randn(2, C, 8, 8)
    folded, pairs = fold_batchnorm(m)
    assert "feat" not in vars(folded)  # tracing left no fx Proxy on the module
    with torch.no_grad():
        ref = m(x)
        kept_ref = m.feat.clone()
        _close(folded(x), ref)
    _close(folded.feat, kept_ref)
    assert pairs == []


@pytest.mark.parametrize("dtype", [torch.int8, torch.bfloat16])
def test_fold_keeps_the_weight_dtype_of_a_quantized_conv(dtype):
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 32, 3, padding=1).eval()
    with torch.no_grad():
        conv.weight[:, :8] = 0
    bn = nn.BatchNorm2d(32).eval()
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2)
        bn.weight.normal_()
        bn.bias.normal_()
    q = sp.SparseConv2d.from_dense(conv, format="bsr", block_size=(16, 16), weight_dtype=dtype)
    f = fold_conv_bn(q, bn)
    assert type(f) is sp.SparseConv2d
    assert (f.weight_dtype, f.format, tuple(f.block_size)) == (q.weight_dtype, "bsr", (16, 16))
    x = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        want = bn(conv(x))
        assert (f(x) - want).norm() <= 0.05 * want.norm()


def test_plain_conv_bn_relu_still_folds_and_fuses():
    """Control: nothing escapes here, so the BatchNorm is folded and the ReLU fused as before."""
    m = _model(lambda: nn.Sequential(_conv(), nn.BatchNorm2d(C), nn.ReLU(), _conv()))
    x = torch.randn(2, C, 8, 8)
    with torch.no_grad():
        ref = m(x)
    fast = _convert(m, x)
    assert _changed(fast) == (["1"], ["0"])
    assert isinstance(fast[1], nn.Identity) and isinstance(fast[2], nn.Identity) and fast[0].activation == "relu"
    with torch.no_grad():
        _close(fast(x), ref)


class _ByHandGelu(nn.Module):  # reads its input three times (x, x**3, x * ...), as Hugging Face's NewGELUActivation
    def forward(self, x):
        return 0.5 * x * (1.0 + torch.tanh(0.7978845608028654 * (x + 0.044715 * torch.pow(x, 3.0))))


_ByHandGelu.__name__ = _ByHandGelu.__qualname__ = "NewGELUActivation"  # known to convert by that name


class _MlpAlsoReads(nn.Module):  # the layer's output also feeds a second branch: never fused
    def __init__(self):
        super().__init__()
        self.fc, self.act, self.out = nn.Linear(64, 128), _ByHandGelu(), nn.Linear(128, 64)

    def forward(self, x):
        h = self.fc(x)
        return self.out(self.act(h)) + h[:, :64]


def _sparse(m):
    torch.manual_seed(0)
    sp.prune_blocks(m, sparsity=0.75, block_size=(16, 16), dense_first_last=False)
    return m.eval()


def test_an_activation_reading_its_input_several_times_is_fused():
    m = _sparse(nn.Sequential(nn.Linear(64, 128), _ByHandGelu(), nn.Linear(128, 64)))
    x = torch.randn(9, 64)
    with torch.no_grad():
        c = sp.convert(m, x, formats=("bsr",), end_to_end=False, time_budget=2.0)
        _close(c(x), m(x))
    assert [f["kind"] for f in sp.summary(c, print_fn=None).totals["fused"]] == ["gelu_tanh"]
    assert c[0].activation == "gelu_tanh" and isinstance(c[1], nn.Identity)


def test_uses_outside_the_activation_still_stop_the_fusion():
    m = _sparse(_MlpAlsoReads())
    x = torch.randn(9, 64)
    with torch.no_grad():
        c = sp.convert(m, x, formats=("bsr",), end_to_end=False, time_budget=2.0)
        _close(c(x), m(x))
    assert sp.summary(c, print_fn=None).totals["fused"] == [] and c.fc.activation == "none"


def test_gpt2_mlp_activation_is_fused():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    m = transformers.GPT2Model(transformers.GPT2Config(vocab_size=100, n_layer=2, n_embd=64, n_head=4,
                                                       n_positions=32)).eval()
    sp.prune_blocks(m, sparsity=0.75, block_size=(16, 16), dense_first_last=False)
    ids = torch.randint(0, 100, (2, 11))
    with torch.no_grad():
        c = sp.convert(m, (ids,), formats=("bsr",), end_to_end=False, time_budget=2.0)
        _close(c(ids).last_hidden_state, m(ids).last_hidden_state)
    fused = sp.summary(c, print_fn=None).totals["fused"]
    assert {(f["layer"], f["kind"]) for f in fused} == {(f"h.{i}.mlp.c_fc", "gelu_tanh") for i in range(2)}


class StashInContainers(_Base):  # a list, a dict and a registered buffer of the module, changed in place
    def __init__(self):
        super().__init__()
        self.stats, self.cache = [], {}
        self.register_buffer("last", None, persistent=False)

    def forward(self, x):
        c = self.c(x)
        self.stats.append(c.sum())
        self.cache["c"] = c
        self.last = c
        return self.c2(self.r(self.bn(c)))


def _proxies(m):
    from torch.utils._pytree import tree_leaves
    return [k for mod in m.modules() for k, v in vars(mod).items()
            if any(isinstance(t, torch.fx.Proxy) for t in tree_leaves(v if isinstance(v, (list, tuple, dict)) else [v]))]


@pytest.mark.parametrize("with_inputs", [True, False])
def test_outputs_stored_in_containers_and_buffers_stop_the_fold_and_leave_no_proxy(with_inputs):
    torch.manual_seed(0)
    m = StashInContainers().eval()
    with torch.no_grad():
        m.bn.running_mean.uniform_(-1, 1)
        m.bn.running_var.uniform_(0.5, 2)
    x = torch.randn(2, C, 8, 8)
    with torch.no_grad():
        c = sp.convert(m, x if with_inputs else None, formats=("bsr",), end_to_end=False, time_budget=2.0)
    assert not _proxies(c) and not _proxies(m)
    assert isinstance(c.bn, nn.BatchNorm2d)  # not folded: its input is kept three ways
    with torch.no_grad():
        _close(c(x), m(x))
    _close(c.cache["c"], m.cache["c"])
    _close(c.last, m.last)
    _close(c.stats[-1], m.stats[-1])
    c.to(torch.float64)  # a Proxy in a buffer would raise here
