"""Pattern pruning: exact pattern properties, criteria, masks under training, schedules, penalties."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st
from torch import nn

from sparseprune.prune import criteria, masks, regularize, schedule
from sparseprune.prune.patterns import prune_blocks, prune_nm, prune_unstructured, select_layers


# -- independent references (loops, no shared code with patterns.py) ---------------------------------
def ref_block_grid(w, r, c):
    """For every block (i, j): (all zero?, untouched?) given the original weight w0 is nonzero."""
    o, i = w.shape[:2]
    out = []
    for bi in range(0, o, r):
        for bj in range(0, i, c):
            out.append(w[bi:bi + r, bj:bj + c])
    return out


def nonzero_weight(*shape):
    w = torch.randn(*shape)
    w[w == 0] = 0.5
    return w


def one_layer(shape):
    if len(shape) == 2:
        mod = nn.Linear(shape[1], shape[0], bias=False)
    else:
        mod = nn.Conv2d(shape[1], shape[0], shape[2:], bias=False)
    with torch.no_grad():
        mod.weight.copy_(nonzero_weight(*shape))
    return mod


def wrap(mod):
    return nn.Sequential(mod)  # dense_first_last does not apply when layers= is given


shapes = st.one_of(
    st.tuples(st.integers(1, 40), st.integers(1, 40)),
    st.tuples(st.integers(1, 20), st.integers(1, 20), st.integers(1, 3), st.integers(1, 3)),
)


@given(shape=shapes, r=st.integers(1, 9), c=st.integers(1, 9), s=st.floats(0, 1),
       imp=st.sampled_from(["magnitude", "l1", "random"]))
def test_blocks_are_all_zero_or_untouched(shape, r, c, s, imp):
    mod = one_layer(shape)
    w0 = mod.weight.detach().clone()
    prune_blocks(wrap(mod), s, (r, c), layers=[type(mod)], importance=imp, misfit="shrink")
    w = mod.weight.detach()
    r, c = min(r, shape[0]), min(c, shape[1])
    zero_elems = 0
    for blk, blk0 in zip(ref_block_grid(w, r, c), ref_block_grid(w0, r, c)):
        zero = bool((blk == 0).all())
        assert zero or torch.equal(blk, blk0), "a block is partly pruned or modified"
        zero_elems += blk.numel() if zero else 0
    # achieved sparsity within half of the largest block of the target
    p = math.prod(shape[2:]) if len(shape) > 2 else 1
    assert abs(zero_elems - s * w.numel()) <= r * c * p / 2 + 1e-6
    assert torch.equal(masks.get_mask(mod), w != 0)


@given(shape=shapes, s=st.floats(0, 1), per_row=st.booleans())
def test_unstructured_exact_count_and_lowest_magnitudes(shape, s, per_row):
    mod = one_layer(shape)
    w0 = mod.weight.detach().clone()
    prune_unstructured(wrap(mod), s, layers=[type(mod)], per_row=per_row)
    w = mod.weight.detach()
    rows = w.reshape(shape[0], -1)
    if per_row:
        per = rows.shape[1]
        assert ((rows == 0).sum(1) == round(s * per)).all()
    else:
        assert int((w == 0).sum()) == round(s * w.numel())
    # everything pruned is no larger than anything kept (within the ranking scope)
    a0 = w0.abs().reshape(shape[0], -1)
    kept = rows != 0
    groups = [(a0[j], kept[j]) for j in range(shape[0])] if per_row else [(a0.flatten(), kept.flatten())]
    for a, k in groups:
        if k.any() and (~k).any():
            assert a[~k].max() <= a[k].min()
    assert torch.equal(w[w != 0], w0[w != 0])


@given(shape=shapes, nm=st.sampled_from([(1, 2), (2, 4), (1, 4), (4, 8), (3, 5), (0, 3), (2, 2)]),
       axis=st.sampled_from(["cin", "flat"]))
def test_nm_groups(shape, nm, axis):
    n, m = nm
    mod = one_layer(shape)
    w0 = mod.weight.detach().clone()
    prune_nm(wrap(mod), n, m, layers=[type(mod)], nm_axis=axis)
    w = mod.weight.detach()
    if w.dim() == 4 and axis == "cin":
        g = w.permute(0, 2, 3, 1)
        g0 = w0.permute(0, 2, 3, 1)
    else:
        g = w.reshape(w.shape[0], -1)
        g0 = w0.reshape(w0.shape[0], -1)
    k = g.shape[-1]
    for start in range(0, k, m):
        part, part0 = g[..., start:start + m], g0[..., start:start + m]
        nz = (part != 0).sum(-1)
        assert (nz == min(n, part.shape[-1])).all()
        # the kept ones are the largest in each group
        kept = part != 0
        a = part0.abs()
        lo = torch.where(kept, a, torch.full_like(a, math.inf)).min(-1).values
        hi = torch.where(~kept, a, torch.full_like(a, -math.inf)).max(-1).values
        assert (hi <= lo).all()


def test_conv_block_covers_all_kernel_positions():
    conv = nn.Conv2d(16, 24, 3)
    prune_blocks(wrap(conv), 0.5, (4, 8), layers=[nn.Conv2d])
    w = conv.weight.detach()
    for o in range(0, 24, 4):
        for i in range(0, 16, 8):
            slab = w[o:o + 4, i:i + 8]  # 4 x 8 x 3 x 3
            assert bool((slab == 0).all()) or bool((slab != 0).all())
    assert (w == 0).float().mean().item() == pytest.approx(0.5, abs=4 * 8 * 9 / w.numel())


def mlp(*sizes):
    layers = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc1 = nn.Linear(32 * 4, 64)
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.adaptive_avg_pool2d(F.relu(self.conv2(x)), 2).flatten(1)
        return self.fc(F.relu(self.fc1(x)))


def test_default_layers_skip_first_conv_and_classifier():
    net = ConvNet()
    assert list(select_layers(net)) == ["conv2", "fc1"]
    assert list(select_layers(mlp(8, 16, 16, 4))) == ["0", "2"]  # the first Linear is pruned, the last not
    prune_unstructured(net, 0.5)
    sp = masks.layer_sparsity(net)
    assert sp["conv1"] == 0 and sp["fc"] == 0 and sp["conv2"] == 0.5 and sp["fc1"] == 0.5
    net2 = ConvNet()
    prune_unstructured(net2, 0.5, dense_first_last=False)
    assert all(v == 0.5 for v in masks.layer_sparsity(net2).values())
    net3 = ConvNet()
    prune_unstructured(net3, 0.5, layers="conv*", exclude=["conv1"])
    assert masks.layer_sparsity(net3) == {"conv1": 0, "conv2": 0.5, "fc1": 0, "fc": 0}


def test_global_vs_layer_scope():
    net = mlp(32, 64, 64, 8)
    with torch.no_grad():
        net[2].weight.mul_(10)  # layer 2 is much larger: global ranking prunes layer 0 first
    g = copy.deepcopy(net)
    prune_unstructured(net, 0.5, scope="layer")
    prune_unstructured(g, 0.5, scope="global")
    assert masks.layer_sparsity(net)["0"] == 0.5 and masks.layer_sparsity(net)["2"] == 0.5
    sg = masks.layer_sparsity(g)
    assert sg["0"] > 0.9 and sg["2"] < 0.3
    assert masks.sparsity(g, only_masked=True) == pytest.approx(0.5, abs=1e-9)
    # global blocks: overall within one block of the target
    gb = mlp(32, 64, 64, 8)
    prune_blocks(gb, 0.6, (8, 8), scope="global")
    assert masks.sparsity(gb, only_masked=True) == pytest.approx(0.6, abs=64 / (32 * 64 + 64 * 64))


def test_overrides_and_sparsity_dict():
    net = mlp(32, 64, 64, 64, 8)
    prune_blocks(net, 0.5, (8, 8), overrides={"2": 0.75, "4": {"sparsity": 0.25, "block_size": (4, 4)}, "0": None})
    sp = masks.layer_sparsity(net)
    assert sp == {"0": 0.0, "2": 0.75, "4": 0.25, "6": 0.0}
    w = net[4].weight
    for blk in ref_block_grid(w.detach(), 4, 4):
        assert bool((blk == 0).all()) or bool((blk != 0).all())
    net = mlp(32, 64, 64, 8)
    prune_unstructured(net, {"0": 0.3})
    assert masks.layer_sparsity(net) == {"0": pytest.approx(0.3, abs=1e-3), "2": 0.0, "4": 0.0}


def test_misfit_layers_are_skipped_or_shrunk():
    net = mlp(32, 64, 12, 8)  # layer "2" has 12 outputs < 16
    with pytest.warns(UserWarning, match="smaller than block"):
        prune_blocks(net, 0.5, (16, 16))
    assert masks.layer_sparsity(net)["2"] == 0 and masks.layer_sparsity(net)["0"] == 0.5
    net = mlp(32, 64, 12, 8)
    prune_blocks(net, 0.5, (16, 16), misfit="shrink")
    assert masks.layer_sparsity(net)["2"] == pytest.approx(0.5, abs=12 * 16 / (12 * 64) / 2)
    with pytest.raises(ValueError, match="smaller than block"):
        prune_blocks(mlp(32, 64, 12, 8), 0.5, (16, 16), misfit="error")
    dw = nn.Sequential(nn.Conv2d(8, 8, 3, groups=8))  # depthwise: 1 input channel per group
    prune_blocks(dw, 0.5, (4, 4), layers=[nn.Conv2d], misfit="shrink")
    assert masks.layer_sparsity(dw)["0"] == 0.5


@pytest.mark.parametrize("call", [
    lambda m: prune_unstructured(m, 1.5),
    lambda m: prune_unstructured(m, -0.1),
    lambda m: prune_unstructured(m, float("nan")),
    lambda m: prune_blocks(m, 0.5, (0, 4)),
    lambda m: prune_blocks(m, 0.5, (4, -1)),
    lambda m: prune_nm(m, 3, 2),
    lambda m: prune_nm(m, 2, 0),
    lambda m: prune_unstructured(m, 0.5, scope="everything"),
    lambda m: prune_unstructured(m, 0.5, importance="bogus"),
    lambda m: prune_unstructured(m, 0.5, importance="wanda"),
    lambda m: prune_unstructured(m, {"0": 2.0}),
    lambda m: prune_blocks(m, 0.5, (16, 16), misfit="explode"),
    lambda m: prune_nm(m, 2, 4, scope="global"),
])
def test_bad_input_value_error(call):
    with pytest.raises(ValueError):
        call(mlp(32, 64, 8))


@pytest.mark.parametrize("call", [
    lambda m: prune_unstructured(m, "half"),
    lambda m: prune_unstructured(m, None),
    lambda m: prune_blocks(m, 0.5, "16x16"),
    lambda m: prune_blocks(m, 0.5, (4.5, 4)),
    lambda m: prune_nm(m, 2.0, 4),
    lambda m: prune_unstructured(m, 0.5, block_size=(4, 4)),
    lambda m: prune_unstructured("not a model", 0.5),
    lambda m: prune_unstructured(m, 0.5, layers=[3.5]),
])
def test_bad_input_type_error(call):
    with pytest.raises(TypeError):
        call(mlp(32, 64, 8))


# -- criteria --------------------------------------------------------------------------------------
def test_wanda_uses_activations_and_differs_from_magnitude():
    torch.manual_seed(1)
    lin = nn.Linear(16, 8, bias=False)
    x = torch.randn(256, 16)
    scale = torch.ones(16)
    scale[:4] = 20.0  # the first 4 inputs have huge activations
    x = x * scale
    wanda, mag = copy.deepcopy(lin), copy.deepcopy(lin)
    prune_unstructured(wrap(wanda), 0.5, importance="wanda", example_inputs=x, layers=[nn.Linear])
    prune_unstructured(wrap(mag), 0.5, importance="magnitude", layers=[nn.Linear], per_row=True)
    # reference Wanda score: |W| * ||X_j||, 4 smallest per row pruned
    ref = lin.weight.detach().abs() * x.norm(dim=0)
    ref_keep = torch.zeros_like(ref, dtype=torch.bool)
    ref_keep.scatter_(1, ref.topk(8, dim=1).indices, True)
    assert torch.equal(wanda.weight != 0, ref_keep)
    assert not torch.equal(wanda.weight != 0, mag.weight != 0)
    assert (wanda.weight[:, :4] != 0).float().mean() > 0.9  # high-activation columns survive
    # better output reconstruction than magnitude on the calibration data
    err = lambda m: (m(x) - lin(x)).pow(2).mean()
    assert err(wanda) < err(mag)


def test_calibration_input_forms_agree():
    torch.manual_seed(2)

    class KW(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(12, 12), nn.Linear(12, 4)

        def forward(self, x, scale=1.0):
            return self.b(torch.relu(self.a(x * scale)))

    base = KW()
    x = torch.randn(30, 12)
    calls = [x, (x,), {"x": x}]  # example_inputs: one call of the model, as everywhere
    batches = [[x[:10], x[10:]], [(x[:15],), {"x": x[15:]}], (t for t in (x[:7], x[7:]))]  # calibration=
    results = []
    for kw in [{"example_inputs": c} for c in calls] + [{"calibration": b} for b in batches]:
        m = copy.deepcopy(base)
        prune_unstructured(m, 0.5, importance="wanda", dense_first_last=False, **kw)
        results.append(torch.cat([masks.get_mask(m.a).flatten(), masks.get_mask(m.b).flatten()]))
    for r in results[1:]:
        assert torch.equal(r, results[0])
    # a loader of (x, y) pairs with a forward= that drops the labels
    m = copy.deepcopy(base)
    pairs = [(x[:10], torch.zeros(10)), (x[10:], torch.zeros(20))]
    prune_unstructured(m, 0.5, importance="wanda", calibration=pairs, forward=lambda mod, b: mod(b[0]),
                       dense_first_last=False)
    assert torch.equal(torch.cat([masks.get_mask(m.a).flatten(), masks.get_mask(m.b).flatten()]), results[0])
    with pytest.raises(TypeError):
        prune_unstructured(copy.deepcopy(base), 0.5, importance="wanda", example_inputs=3, dense_first_last=False)


def test_wanda_conv_uses_unfolded_columns():
    conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
    x = torch.randn(5, 3, 6, 6)
    st_ = criteria.collect_activation_stats(wrap(conv), {"0": conv}, x)["0"]
    # independent: im2col by explicit slicing of the padded input
    xp = F.pad(x, (1, 1, 1, 1))
    ref = torch.zeros(3, 3, 3)
    for c in range(3):
        for i in range(3):
            for j in range(3):
                ref[c, i, j] = xp[:, c, i:i + 6, j:j + 6].pow(2).sum()
    torch.testing.assert_close(st_.sq, ref.flatten())
    assert st_.column_norms(conv).shape == conv.weight.shape


def test_sparsegpt_reconstruction_beats_wanda_and_magnitude():
    torch.manual_seed(3)
    base = nn.Linear(256, 64)
    # correlated (low-rank + noise) inputs, as real activations are: where OBS weight updates pay off
    x = torch.randn(1024, 32) @ torch.randn(32, 256) + 0.3 * torch.randn(1024, 256)
    errs = {}
    for imp in ("magnitude", "wanda", "sparsegpt"):
        m = copy.deepcopy(base)
        prune_unstructured(wrap(m), 0.5, importance=imp, example_inputs=x, layers=[nn.Linear])
        # wanda / sparsegpt rank within each output row (as in their papers), magnitude over the layer
        assert int((m.weight == 0).sum()) == 0.5 * 256 * 64
        if imp != "magnitude":
            assert ((m.weight == 0).sum(1) == 128).all()
        with torch.no_grad():
            errs[imp] = float((m(x) - base(x)).pow(2).mean())
    assert errs["sparsegpt"] < 0.5 * min(errs["wanda"], errs["magnitude"])
    # 2:4 and blocks also go through the reconstruction, keep their patterns and beat Wanda
    run = {"nm": lambda mod, imp: prune_nm(wrap(mod), 2, 4, importance=imp, example_inputs=x, layers=[nn.Linear]),
           "blocks": lambda mod, imp: prune_blocks(wrap(mod), 0.5, (4, 4), importance=imp, example_inputs=x,
                                                   layers=[nn.Linear])}
    for kind, fn in run.items():
        m, w2 = copy.deepcopy(base), copy.deepcopy(base)
        fn(m, "sparsegpt")
        fn(w2, "wanda")
        if kind == "nm":
            assert ((m.weight != 0).reshape(64, 64, 4).sum(-1) == 2).all()
        else:
            for blk in ref_block_grid(m.weight.detach(), 4, 4):
                assert bool((blk == 0).all()) or bool((blk != 0).all())
        with torch.no_grad():
            assert float((m(x) - base(x)).pow(2).mean()) < 0.8 * float((w2(x) - base(x)).pow(2).mean())


def test_taylor_and_movement_scores():
    torch.manual_seed(4)
    net = mlp(10, 20, 3)
    x, y = torch.randn(64, 10), torch.randint(0, 3, (64,))
    F.cross_entropy(net(x), y).backward()
    w, g = net[0].weight.detach().clone(), net[0].weight.grad.clone()
    t = copy.deepcopy(net)
    t[0].weight.grad = g.clone()
    prune_unstructured(t, 0.5, importance="taylor")
    ref = (w * g).abs()
    assert torch.equal(t[0].weight != 0, ref > ref.flatten().kthvalue(100).values)
    with pytest.raises(ValueError, match="backward"):
        prune_unstructured(mlp(10, 20, 3), 0.5, importance="taylor")
    net.zero_grad()
    acc = criteria.GradientScores(net, kind="movement")
    total = torch.zeros_like(w)
    for _ in range(3):
        net.zero_grad()
        F.cross_entropy(net(x), y).backward()
        total -= net[0].weight.detach() * net[0].weight.grad
    torch.testing.assert_close(acc.scores["0"], total)
    prune_unstructured(net, 0.5, importance=acc)
    keep = total > total.flatten().kthvalue(100).values
    assert torch.equal(net[0].weight != 0, keep)
    acc.close()


def test_random_is_a_seeded_control():
    a, b, c = mlp(20, 30, 4), None, None
    b, c = copy.deepcopy(a), copy.deepcopy(a)
    prune_unstructured(a, 0.5, importance="random", seed=1)
    prune_unstructured(b, 0.5, importance="random", seed=1)
    prune_unstructured(c, 0.5, importance="random", seed=2)
    assert torch.equal(a[0].weight, b[0].weight) and not torch.equal(a[0].weight, c[0].weight)
    assert masks.layer_sparsity(a)["0"] == 0.5


# -- masks under training -------------------------------------------------------------------------
@pytest.mark.parametrize("opt_name", ["adam", "adamw", "sgd_momentum", "rmsprop"])
@pytest.mark.parametrize("optimizer_before_pruning", [True, False])
def test_masks_survive_training(opt_name, optimizer_before_pruning):
    torch.manual_seed(5)
    net = ConvNet()
    x, y = torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,))

    def make_opt():
        p = net.parameters()
        return {"adam": lambda: torch.optim.Adam(p, lr=1e-2, weight_decay=1e-2),
                "adamw": lambda: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
                "sgd_momentum": lambda: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-3),
                "rmsprop": lambda: torch.optim.RMSprop(p, lr=1e-2, momentum=0.9)}[opt_name]()

    opt = make_opt() if optimizer_before_pruning else None
    if opt is not None:  # build up momentum on every weight first
        for _ in range(3):
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
            opt.step()
    prune_blocks(net, 0.5, (4, 4))
    keep = {n: masks.get_mask(m).clone() for n, m in masks.masked_modules(net)}
    opt = opt or make_opt()
    for _ in range(10):
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
        for n, m in masks.masked_modules(net):
            assert (m.weight.detach()[~keep[n]] == 0).all()
            assert (m.weight.grad[~keep[n]] == 0).all()
    assert any((m.weight.detach()[keep[n]] != 0).all() for n, m in masks.masked_modules(net))
    masks.remove_masks(net)
    assert not list(masks.masked_modules(net))
    assert type(net.conv2.weight) is nn.Parameter and "weight_mask" not in net.conv2._buffers
    assert (net.conv2.weight.detach()[~keep["conv2"]] == 0).all()
    # after baking, training may change zeros again (no hooks left)
    opt.zero_grad()
    F.cross_entropy(net(x), y).backward()
    assert (net.conv2.weight.grad[~keep["conv2"]] != 0).any()


def test_masks_survive_manual_writes_deepcopy_and_state_dict():
    net = mlp(16, 32, 4)
    prune_unstructured(net, 0.75)
    keep = masks.get_mask(net[0]).clone()
    with torch.no_grad():
        net[0].weight.fill_(1.0)  # a manual write: the next forward re-applies the mask
    net(torch.randn(2, 16))
    assert torch.equal(net[0].weight != 0, keep)
    cp = copy.deepcopy(net)
    opt = torch.optim.Adam(cp.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        cp(torch.randn(8, 16)).sum().backward()
        opt.step()
        assert torch.equal(cp[0].weight != 0, keep)
    sd = net.state_dict()
    assert "0.weight_mask" in sd
    fresh = mlp(16, 32, 4)
    prune_unstructured(fresh, 0.75)  # same architecture, masked: state_dict loads masks and weights
    fresh.load_state_dict(sd)
    assert torch.equal(masks.get_mask(fresh[0]), keep)


def test_masked_model_pickles_and_keeps_masking_after_load(tmp_path):
    net = mlp(16, 32, 4)
    prune_unstructured(net, 0.75)
    keep = masks.get_mask(net[0]).clone()
    torch.save(net, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    opt = torch.optim.Adam(loaded.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        loaded(torch.randn(8, 16)).sum().backward()
        assert (loaded[0].weight.grad[~keep] == 0).all()
        opt.step()
        assert torch.equal(loaded[0].weight != 0, keep)
    masks.remove_masks(loaded)
    assert not loaded[0].weight._backward_hooks and not loaded[0]._forward_pre_hooks


def test_repruning_is_monotone():
    net = mlp(32, 64, 8)
    prune_unstructured(net, 0.5)
    first = masks.get_mask(net[0]).clone()
    prune_blocks(net, 0.75, (4, 4))
    second = masks.get_mask(net[0])
    assert not (second & ~first).any()  # nothing revived
    assert masks.layer_sparsity(net)["0"] >= 0.75


# -- schedules ------------------------------------------------------------------------------------
def test_cubic_schedule_values():
    f = lambda t: schedule.cubic_sparsity(t, 0.8, 10, 110, 0.0)
    assert f(0) == 0 and f(10) == 0 and f(110) == pytest.approx(0.8) and f(500) == pytest.approx(0.8)
    assert f(60) == pytest.approx(0.8 * (1 - 0.5 ** 3))
    vals = [f(t) for t in range(0, 120)]
    assert all(b >= a for a, b in zip(vals, vals[1:]))


@pytest.mark.parametrize("pattern,block", [("unstructured", None), ("blocks", (4, 4))])
def test_gradual_pruner_hits_target_during_training(pattern, block):
    torch.manual_seed(6)
    net = mlp(16, 64, 64, 4)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    pr = schedule.GradualPruner(net, 0.9, start_step=5, end_step=45, frequency=10, pattern=pattern,
                                block_size=block or (16, 16))
    seen = []
    for t in range(60):
        opt.zero_grad()
        net(torch.randn(8, 16)).pow(2).mean().backward()
        opt.step()
        s = pr.step()
        if s is not None:
            seen.append((t, s))
            assert masks.sparsity(net, only_masked=True) == pytest.approx(s, abs=16 / (16 * 64) if block else 1e-3)
    assert [t for t, _ in seen] == [5, 15, 25, 35, 45]
    assert seen[-1][1] == pytest.approx(0.9)
    assert masks.sparsity(net, only_masked=True) == pytest.approx(0.9, abs=0.01)
    with pytest.raises(ValueError):
        schedule.GradualPruner(net, 1.2)
    with pytest.raises(ValueError):
        schedule.GradualPruner(net, 0.5, start_step=10, end_step=5)


def test_iterative_prune_rounds():
    net = mlp(16, 64, 4)
    seen = []
    schedule.iterative_prune(net, 0.875, lambda m, i: seen.append(masks.layer_sparsity(m)["0"]), rounds=3)
    assert seen == pytest.approx([0.5, 0.75, 0.875], abs=1e-3)


# -- regularisation -------------------------------------------------------------------------------
def test_group_lasso_matches_reference_and_pushes_blocks_to_zero():
    w = torch.randn(10, 7, requires_grad=True)
    lin = nn.Linear(7, 10, bias=False)
    lin.weight = nn.Parameter(w.detach().clone())
    got = regularize.group_lasso(wrap(lin), block_size=(4, 4), layers=[nn.Linear], normalize=False)
    ref = sum(blk.norm() for blk in ref_block_grid(lin.weight, 4, 4))
    torch.testing.assert_close(got, ref)
    conv = nn.Conv2d(6, 4, 3)
    ch = regularize.group_lasso(wrap(conv), groups="channels", layers=[nn.Conv2d], normalize=False)
    torch.testing.assert_close(ch, sum(conv.weight[o].norm() for o in range(4)))
    bn = nn.Sequential(nn.BatchNorm2d(5))
    with torch.no_grad():
        bn[0].weight.copy_(torch.tensor([1., -2, 3, 0, 0.5]))
    assert float(regularize.bn_l1(bn).detach()) == pytest.approx(6.5)
    # training with the penalty alone drives many blocks to (near) zero, more than plain L2 would
    torch.manual_seed(7)
    net = nn.Sequential(nn.Linear(32, 32))
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    for _ in range(200):
        opt.zero_grad()
        x = torch.randn(64, 32)
        loss = (net(x) - x).pow(2).mean() + 0.02 * regularize.group_lasso(net, (8, 8), layers=[nn.Linear])
        loss.backward()
        opt.step()
    norms = regularize.group_norms(net[0].weight.detach(), "blocks", (8, 8))
    assert (norms < 0.05 * norms.max()).sum() >= 4  # off-diagonal blocks of an identity map vanish


def test_sequential_calibration_accepts_a_generator_and_sees_pruned_inputs():
    torch.manual_seed(8)
    net = mlp(16, 32, 32, 4)
    x = torch.randn(64, 16)
    seq, par = copy.deepcopy(net), copy.deepcopy(net)
    prune_unstructured(seq, 0.7, importance="wanda", calibration=(b for b in x.split(16)), sequential=True)
    prune_unstructured(par, 0.7, importance="wanda", calibration=(b for b in x.split(16)), sequential=False)
    assert torch.equal(masks.get_mask(seq[0]), masks.get_mask(par[0]))  # the first layer sees the same input
    # layer "2" is calibrated on the pruned layer 0's outputs in sequential mode: reference by hand
    h = torch.relu(seq[0](x)).detach()
    ref = net[2].weight.detach().abs() * h.norm(dim=0)
    k = round(0.7 * 32)
    ref_keep = torch.ones_like(ref, dtype=torch.bool)
    ref_keep.scatter_(1, ref.argsort(1)[:, :k], False)
    assert torch.equal(masks.get_mask(seq[2]), ref_keep)
    assert not torch.equal(masks.get_mask(seq[2]), masks.get_mask(par[2]))


@given(sizes=st.lists(st.tuples(st.integers(1, 30), st.integers(1, 30)), min_size=1, max_size=4),
       s=st.floats(0, 1), block=st.sampled_from([None, (1, 1), (2, 3), (4, 4)]))
def test_global_scope_ranks_across_layers(sizes, s, block):
    layers = [one_layer(sz) for sz in sizes]
    net = nn.Sequential(*layers)
    w0 = [m.weight.detach().clone() for m in layers]
    if block is None:
        prune_unstructured(net, s, scope="global", dense_first_last=False)
    else:
        prune_blocks(net, s, block, scope="global", dense_first_last=False, misfit="shrink")
    total = sum(m.weight.numel() for m in layers)
    zeros = sum(int((m.weight == 0).sum()) for m in layers)
    if block is None:
        assert zeros == round(s * total)
        pruned = torch.cat([w[m.weight == 0].abs() for w, m in zip(w0, layers)])
        kept = torch.cat([w[m.weight != 0].abs() for w, m in zip(w0, layers)])
        if len(pruned) and len(kept):
            assert pruned.max() <= kept.min()  # one ranking over all layers
    else:
        r, c = block
        assert abs(zeros - s * total) <= r * c / 2 + 1e-6
        for w, m in zip(w0, layers):
            rr, cc = min(r, w.shape[0]), min(c, w.shape[1])
            for blk, blk0 in zip(ref_block_grid(m.weight.detach(), rr, cc), ref_block_grid(w, rr, cc)):
                assert bool((blk == 0).all()) or torch.equal(blk, blk0)


def test_pattern_mask_on_hand_made_scores():
    from sparseprune.prune.patterns import pattern_mask
    s = torch.tensor([[1., 9, 2, 8, 3, 7],
                      [6, 5, 4, 3, 2, 1]])
    assert pattern_mask(s, "nm", n=2, m=4).tolist() == [[False, True, False, True, True, True],
                                                         [True, True, False, False, True, True]]
    # blocks (1, 3): block means [4, 6] / [5, 2] -> pruning half prunes the two lowest: 4 and 2
    assert pattern_mask(s, "blocks", 0.5, (1, 3)).tolist() == [[False] * 3 + [True] * 3, [True] * 3 + [False] * 3]
    assert pattern_mask(s, "unstructured", 0.5, per_row=True).tolist() == [[False, True, False, True, False, True],
                                                                           [True, True, True, False, False, False]]
