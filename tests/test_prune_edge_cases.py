"""Pruning edge cases: layers whose weight cannot take a mask, ``layers=`` names that match nothing,
meta-device models, and channel pruning of a pattern-pruned (masked) model.

Channel pruning of masked models is checked with the dead-channel oracle: the channels made exactly
zero by hand (producer rows and bias, consumer columns) are the lowest-scoring ones, so they are the
ones removed; then the pruned model must compute what the masked model computed, and every kept mask
must equal the original mask at the kept rows / columns (indices known from the construction, not
from the pruner).
"""
import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.nn.utils.parametrize as parametrize
import torch.nn.utils.prune as torch_prune

import sparseprune as sp
from sparseprune.prune import ChannelPruner, masks
from sparseprune.prune.channels import ChannelPruneWarning
from sparseprune.prune.patterns import select_layers

pytestmark = pytest.mark.usefixtures("one_thread")

PRUNE = {
    "unstructured": lambda m, **kw: sp.prune_unstructured(m, 0.5, **kw),
    "blocks": lambda m, **kw: sp.prune_blocks(m, 0.5, block_size=(4, 4), **kw),
    "nm": lambda m, **kw: sp.prune_nm(m, 2, 4, **kw),
}


def mlp():
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8))


class Scale(nn.Module):
    def forward(self, w):
        return w * 2.0


def _parametrize(m):
    parametrize.register_parametrization(m, "weight", Scale())


def _weight_norm(m):
    nn.utils.parametrizations.weight_norm(m)


def _old_weight_norm(m):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # deprecated in favour of parametrizations
        nn.utils.weight_norm(m)


def _torch_pruned(m):
    torch_prune.l1_unstructured(m, "weight", 0.2)


UNMASKABLE = {  # how the layer was wrapped -> the fix the error must name
    "parametrize": (_parametrize, "parametrize.remove_parametrizations"),
    "weight_norm": (_weight_norm, "parametrize.remove_parametrizations"),
    "old_weight_norm": (_old_weight_norm, "remove_weight_norm"),
    "torch_prune": (_torch_pruned, "torch.nn.utils.prune.remove"),
}


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same_state(model, snap):
    sd = model.state_dict()
    return sd.keys() == snap.keys() and all(torch.equal(sd[k], snap[k]) for k in sd)


# -- layers whose weight cannot take a mask ------------------------------------------------------------
@pytest.mark.parametrize("kind", list(PRUNE))
@pytest.mark.parametrize("wrap", list(UNMASKABLE))
@pytest.mark.parametrize("by", ["name", "module"])
def test_named_unmaskable_layer_raises_and_changes_nothing(kind, wrap, by):
    m = mlp()
    how, fix = UNMASKABLE[wrap]
    how(m[2])
    snap = _snapshot(m)
    spec = "2" if by == "name" else m[2]
    with pytest.raises(ValueError, match="cannot prune layer '2'") as e:
        PRUNE[kind](m, layers=["0", spec])
    assert fix in str(e.value)
    assert _same_state(m, snap)  # refused before anything was pruned: layer '0' is untouched too
    assert not list(masks.masked_modules(m)) or wrap == "torch_prune"  # torch's own mask stays, nothing else


@pytest.mark.parametrize("kind", list(PRUNE))
@pytest.mark.parametrize("wrap", list(UNMASKABLE))
def test_auto_selected_unmaskable_layer_is_skipped_with_one_warning(kind, wrap):
    m = mlp()
    UNMASKABLE[wrap][0](m[2])
    w2 = m[2].weight.detach().clone()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        PRUNE[kind](m, dense_first_last=False)
    msgs = [str(x.message) for x in w if issubclass(x.category, UserWarning)
            and not issubclass(x.category, FutureWarning)]
    assert len(msgs) == 1 and "'2'" in msgs[0] and "left dense" in msgs[0] and UNMASKABLE[wrap][1] in msgs[0]
    assert "'0'" not in msgs[0] and "'4'" not in msgs[0]
    for i in (0, 4):  # the other layers are pruned as asked
        assert sp.prune.is_masked(m[i])
        assert (m[i].weight == 0).float().mean().item() == pytest.approx(0.5, abs=0.07)
    assert torch.equal(m[2].weight.detach(), w2)


@pytest.mark.parametrize("layers", [[nn.Linear], "*", lambda n, mod: True])
def test_unmaskable_layer_picked_by_a_rule_warns(layers):
    m = mlp()
    _parametrize(m[2])
    with pytest.warns(UserWarning, match=r"layer '2' left dense: its weight is parametrized"):
        sp.prune_unstructured(m, 0.5, layers=layers)
    assert sp.prune.is_masked(m[0]) and sp.prune.is_masked(m[4]) and not sp.prune.is_masked(m[2])


def test_unmaskable_layer_excluded_or_dense_gives_no_warning():
    for kw in [dict(exclude=["2"], dense_first_last=False), dict(overrides={"2": None}, dense_first_last=False),
               dict(dense_first_last=True)]:
        m = mlp()
        _weight_norm(m[4 if kw.get("dense_first_last") else 2])  # the classifier: dense anyway
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            sp.prune_unstructured(m, 0.5, **kw)
    with warnings.catch_warnings():  # a sparsity dict that does not name it leaves it dense anyway
        warnings.simplefilter("error")
        m = mlp()
        _parametrize(m[2])
        sp.prune_unstructured(m, {"0": 0.5}, dense_first_last=False)
    m = mlp()
    _parametrize(m[2])
    with pytest.raises(ValueError, match="cannot prune layer '2'"):
        sp.prune_unstructured(m, {"0": 0.5, "2": 0.5}, dense_first_last=False)


def test_dense_first_last_counts_an_unmaskable_classifier():
    plain, wrapped = mlp(), mlp()
    _weight_norm(wrapped[4])
    # the classifier is still the last layer: it stays dense, and the layer before it is pruned
    assert list(select_layers(wrapped)) == list(select_layers(plain)) == ["0", "2"]
    sp.prune_unstructured(wrapped, 0.5)
    assert sp.prune.is_masked(wrapped[2])


# -- layers= names that match nothing -----------------------------------------------------------------
class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = mlp()
        self.alias = self.enc[0]
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(self.enc(x))


@pytest.mark.parametrize("kind", list(PRUNE))
def test_unknown_layer_name_raises(kind):
    m = mlp()
    snap = _snapshot(m)
    with pytest.raises(ValueError, match=r"'fc1' \(no such module\).*'0', '2', '4'"):
        PRUNE[kind](m, layers=["fc1"])
    with pytest.raises(ValueError, match=r"'fc1' \(no such module\)"):
        PRUNE[kind](m, layers=["0", "fc1"])  # one typo among valid names
    assert _same_state(m, snap) and not list(masks.masked_modules(m))


@pytest.mark.parametrize("spec, msg", [
    ("enc", r"'enc' \(a Sequential, not a Linear / Conv2d: 'enc.\*' selects the layers inside it\)"),
    ("enc.1", r"'enc.1' \(a ReLU, not a Linear / Conv2d\)"),
    ("alias", r"'alias' \(another name of layer 'enc.0'"),
    ("dec.*", r"'dec.\*' \(no such module\)"),
    (nn.Linear(2, 2), r"a Linear module \(not part of the model\)"),
])
def test_layer_spec_that_matches_no_layer_says_why(spec, msg):
    with pytest.raises(ValueError, match=msg):
        sp.prune_unstructured(Block(), 0.5, layers=[spec])
    with pytest.raises(ValueError, match=msg):
        select_layers(Block(), layers=spec)


def test_valid_names_and_globs_still_select_exactly():
    m = Block()
    assert list(select_layers(m, layers=["enc.2"])) == ["enc.2"]
    assert list(select_layers(m, layers="enc.*")) == ["enc.0", "enc.2", "enc.4"]
    assert list(select_layers(m, layers=["enc.?", "head"], exclude="enc.0")) == ["enc.2", "enc.4", "head"]
    assert list(select_layers(m, layers=[m.enc[4]])) == ["enc.4"]
    assert list(select_layers(m, layers=[nn.Conv2d])) == []  # a type is a rule: matching nothing is fine
    sp.prune_unstructured(m, 0.5, layers=["enc.2", "head"])
    got = sp.prune.layer_sparsity(m)
    assert got["enc.2"] == got["head"] == 0.5 and got["enc.0"] == got["enc.4"] == 0.0


@pytest.mark.parametrize("where", ["exclude", "overrides", "sparsity_dict"])
def test_exact_names_in_exclude_overrides_and_sparsity_dicts_must_exist(where):
    """A typo there would prune a layer meant to stay dense, or leave one at the wrong sparsity; a glob may
    match nothing (one pattern serves several models)."""
    m = mlp()
    snap = _snapshot(m)
    kw = {"exclude": {"exclude": ["fc1"]}, "overrides": {"overrides": {"fc1": None}},
          "sparsity_dict": {}}[where]
    sparsity = {"0": 0.5, "fc1": 0.5} if where == "sparsity_dict" else 0.5
    with pytest.raises(ValueError, match=r"'fc1' \(no such module\)"):
        sp.prune_unstructured(m, sparsity, dense_first_last=False, **kw)
    assert _same_state(m, snap) and not list(masks.masked_modules(m))
    glob = {"exclude": {"exclude": ["dec.*"]}, "overrides": {"overrides": {"dec.*": None}}, "sparsity_dict": {}}[where]
    sp.prune_unstructured(m, {"0": 0.5, "dec.*": 0.5} if where == "sparsity_dict" else 0.5, dense_first_last=False,
                          **glob)
    assert sp.prune.layer_sparsity(m)["0"] == 0.5


# -- meta device -------------------------------------------------------------------------------------
META_CALLS = {
    **{k: (lambda f: lambda m: f(m, dense_first_last=False))(f) for k, f in PRUNE.items()},
    "channels": lambda m: sp.prune_channels(m, torch.randn(2, 16, device="meta"), ratio=0.5),
    "channels_dry_run": lambda m: sp.prune_channels(m, torch.randn(2, 16), ratio=0.5, dry_run=True),
}


@pytest.mark.parametrize("call", list(META_CALLS))
def test_meta_model_is_refused_up_front(call):
    with torch.device("meta"):
        m = mlp()
    with pytest.raises(ValueError, match=r"meta device have no values to prune .*'0.*materialise the model "
                                         r"first \(to_empty \+ load weights\)"):
        META_CALLS[call](m)
    assert not list(masks.masked_modules(m)) and m[0].weight.shape == (32, 16)


# -- channel pruning of a masked model -----------------------------------------------------------------
class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        x = F.relu(self.c2(F.relu(self.c1(x))))
        return self.fc(x.mean((2, 3)))


def _kill_even_channels(pairs):
    """Zero the even output channels of each producer (rows, bias) and the matching input channels of
    its consumer: they score 0 under any norm, and removing them changes no output."""
    with torch.no_grad():
        for prod, cons in pairs:
            prod.weight[0::2] = 0
            prod.bias[0::2] = 0
            cons.weight[:, 0::2] = 0


def _mlp_case():
    m = mlp()
    sp.prune_unstructured(m, 0.5, dense_first_last=False)
    _kill_even_channels([(m[0], m[2]), (m[2], m[4])])
    # layer -> (kept output rows, kept input columns) of the original
    odd = slice(1, None, 2)
    return m, torch.randn(5, 16), {"0": (odd, slice(None)), "2": (odd, odd), "4": (slice(None), odd)}


def _conv_case():
    m = ConvNet()
    sp.prune_blocks(m, 0.5, block_size=(2, 2), dense_first_last=False)
    _kill_even_channels([(m.c1, m.c2), (m.c2, m.fc)])
    odd = slice(1, None, 2)
    return m, torch.randn(2, 3, 6, 6), {"c1": (odd, slice(None)), "c2": (odd, odd), "fc": (slice(None), odd)}


@pytest.mark.parametrize("case", [_mlp_case, _conv_case])
def test_channels_of_masked_model_slice_masks_with_weights(case):
    m, x, kept = case()
    ref = copy.deepcopy(m).eval()
    old = {n: masks.get_mask(mod).clone() for n, mod in m.named_modules() if n in kept}
    with warnings.catch_warnings():
        warnings.simplefilter("error", ChannelPruneWarning)
        _, rep = sp.prune_channels(m, x, ratio=0.5, return_report=True)
    assert rep.params_after < rep.params_before and rep.notes == []
    mods = dict(m.named_modules())
    for n, (rows, cols) in kept.items():
        mask = masks.get_mask(mods[n])
        assert mask.dtype == torch.bool and mask.shape == mods[n].weight.shape
        assert n + ".weight_mask" in m.state_dict()
        assert torch.equal(mask, old[n][rows][:, cols])  # the original mask at the kept channels
    m.eval()
    with torch.no_grad():
        torch.testing.assert_close(m(x), ref(x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("opt", [torch.optim.SGD, torch.optim.Adam])
def test_masks_stay_in_force_after_channel_pruning(opt):
    m, x, _ = _mlp_case()
    sp.prune_channels(m, x, ratio=0.5)
    assert m[2].weight.shape == (16, 16)
    o = opt(m.parameters(), lr=0.1)
    m.train()
    for _ in range(2):
        o.zero_grad()
        m(x).pow(2).sum().backward()
        o.step()
    for mod in (m[0], m[2], m[4]):
        mask = masks.get_mask(mod)
        assert mask.shape == mod.weight.shape and not mask.all()
        assert (mod.weight[~mask] == 0).all()  # pruned-by-pattern entries of kept channels stay zero
        assert (mod.weight[mask] != 0).any()   # and the kept ones trained


class Twice(nn.Module):
    """``a`` runs twice, so its output channels cannot shrink: that group is tried and put back."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(16, 16)
        self.c, self.d = nn.Linear(16, 32), nn.Linear(32, 4)

    def forward(self, x):
        return self.d(F.relu(self.c(F.relu(self.a(F.relu(self.a(x)))))))


def test_group_put_back_restores_its_mask():
    m = Twice()
    sp.prune_unstructured(m, 0.5, dense_first_last=False)
    _kill_even_channels([(m.c, m.d)])
    x = torch.randn(3, 16)
    ref = copy.deepcopy(m).eval()
    mask_a, mask_c = masks.get_mask(m.a).clone(), masks.get_mask(m.c).clone()
    with pytest.warns(ChannelPruneWarning, match="left alone"):
        sp.prune_channels(m, x, ratio=0.5)
    assert m.a.weight.shape == (16, 16) and torch.equal(masks.get_mask(m.a), mask_a)
    assert m.c.weight.shape == (16, 16) and torch.equal(masks.get_mask(m.c), mask_c[1::2])
    m.eval()
    with torch.no_grad():
        torch.testing.assert_close(m(x), ref(x), rtol=0, atol=1e-5)


def test_dry_run_and_steps_on_masked_model():
    m, x, kept = _mlp_case()
    snap = _snapshot(m)
    rep = sp.prune_channels(m, x, ratio=0.5, dry_run=True)
    assert rep.params_after < rep.params_before and _same_state(m, snap)
    old = masks.get_mask(m[2]).clone()
    pruner = ChannelPruner(m, x, ratio=0.5, steps=2)
    pruner.step()
    assert m[2].weight.shape == (24, 24)  # a quarter gone: dead channels first
    pruner.step()
    assert m[2].weight.shape == (16, 16) and torch.equal(masks.get_mask(m[2]), old[1::2][:, 1::2])


def test_trace_of_masked_model_matches_unmasked():
    m = mlp()
    sp.prune_unstructured(m, 0.5, dense_first_last=False)
    plain = copy.deepcopy(m)
    sp.remove_masks(plain)
    x = torch.randn(3, 16)
    _, r1 = sp.prune_channels(m, x, ratio=0.5, return_report=True)
    _, r2 = sp.prune_channels(plain, x, ratio=0.5, return_report=True)
    assert r1.notes == r2.notes == [] and r1.params_after == r2.params_after
    assert [(g["units"], g["pruned"]) for g in r1.groups] == [(g["units"], g["pruned"]) for g in r2.groups]
    hooks = [h for h in m[0]._forward_pre_hooks.values()]
    assert hooks == [masks._forward_pre_hook]  # the hook put back after tracing
