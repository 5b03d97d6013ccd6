"""Edges of the pruning API: penalties at all-zero groups, measure() on a baseline model, NaN metrics in
sensitivity analysis and plan search, gradient scores with frozen layers, allocation at the top measured
sparsity, sensitivity's misfit, iterative_prune's number types, and sparsity counts over weightless modules.

Numbers are checked against independent references (group norms summed by hand, allocations worked out from
the curves) rather than against the code under test.
"""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

import sparseprune as sp
from sparseprune.convert import layer_report
from sparseprune.prune import masks
from sparseprune.prune.criteria import GradientScores
from sparseprune.prune.regularize import group_lasso
from sparseprune.prune.schedule import iterative_prune
from sparseprune.prune.search import Plan, PlanResult, SearchResult, Sensitivity, sensitivity

pytestmark = pytest.mark.usefixtures("one_thread")


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 4))


# -- defect 1: group lasso at all-zero groups ------------------------------------------------------------
def _reference_penalty(w, groups, block_size):
    """Sum over groups of sqrt(group size) * ||group||_2, group by group in float64."""
    w = w.detach().double()
    o, i = w.shape
    if groups == "channels":
        parts = [w[r:r + 1, :] for r in range(o)]
    elif groups == "in_channels":
        parts = [w[:, c:c + 1] for c in range(i)]
    else:
        r, c = block_size
        parts = [w[a:a + r, b:b + c] for a in range(0, o, r) for b in range(0, i, c)]
    full = {"channels": i, "in_channels": o, "blocks": min(block_size[0], o) * min(block_size[1], i)}[groups]
    return sum(math.sqrt(full) * math.sqrt(float(p.pow(2).sum())) for p in parts)


@pytest.mark.parametrize("groups", ["channels", "in_channels", "blocks"])
def test_group_lasso_finite_at_zero_groups(groups):
    m = _mlp()
    with torch.no_grad():
        m[2].weight[3:7] = 0          # whole output rows
        m[2].weight[:, 5:9] = 0       # whole input columns
    sp.prune_blocks(m, 0.5, block_size=(1, 12), layers=["4"])  # masked all-zero rows
    m.zero_grad()
    pen = group_lasso(m, groups=groups, block_size=(4, 4), layers=["2", "4"])
    pen.backward()
    for n in ("2", "4"):
        g = m[int(n)].weight.grad
        assert torch.isfinite(g).all(), f"{groups}: non-finite gradient on layer {n}"
    ref = sum(_reference_penalty(m[k].weight, groups, (4, 4)) for k in (2, 4))
    assert masks.layer_sparsity(m)["4"] == 0.5
    assert float(pen.detach()) == pytest.approx(ref, rel=1e-5, abs=1e-6)
    # at zero the penalty has value 0 and gradient 0: an all-zero model costs nothing
    z = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    with torch.no_grad():
        for lay in z:
            lay.weight.zero_()
    zp = group_lasso(z, groups=groups, block_size=(2, 2), layers=["0", "1"])
    zp.backward()
    assert float(zp.detach()) == 0.0
    assert all(torch.equal(lay.weight.grad, torch.zeros(4, 4)) for lay in z)


# -- defect 2: measure() leaves an unconverted model alone ------------------------------------------------
def test_measure_baseline_leaves_model_convertible():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16)).eval()
    sp.prune_unstructured(m, 0.9, layers=["0", "2"])
    x = torch.randn(8, 32)
    s = sp.measure(m, x, time_budget=0.1)
    assert [r["name"] for r in s] == ["0", "2"] and s.totals["end_to_end_ms"] is not None
    assert layer_report(m) is None
    fast = sp.convert(m, x, time_budget=0.2)   # refused before: "convert()'s result already"
    assert layer_report(fast) is not None
    # re-measuring a converted model still records the new timings as its report
    sp.measure(fast, x, time_budget=0.1, end_to_end=False)
    assert all(r["reason"] == "re-measured" for r in layer_report(fast)["layers"])


# -- defect 4: NaN metrics in sensitivity analysis ---------------------------------------------------------
def test_sensitivity_nan_is_worst_loss():
    curves = {"a": [(0.5, 0.9), (0.9, 0.8)], "b": [(0.5, float("nan")), (0.9, float("nan"))],
              "c": [(0.5, 1.0), (0.9, float("nan"))]}
    s = Sensitivity(1.0, curves, {"a": 100, "b": 100, "c": 100})
    assert s.drop("b") == [(0.0, 0.0), (0.5, math.inf), (0.9, math.inf)]
    assert s.drop("c") == [(0.0, 0.0), (0.5, 0.0), (0.9, math.inf)]
    # b is broken from 0.5 on (0), c is free up to 0.5 and broken beyond (0.5), so a takes the rest of
    # 0.45 * 300 = 135 weights: 135 - 50 = 85 of its 100
    alloc = s.allocate(0.45)
    assert alloc["b"] == 0.0
    assert alloc["c"] == pytest.approx(0.5)
    assert alloc["a"] == pytest.approx(0.85)
    with pytest.raises(ValueError, match="exceeds"):
        s.allocate(0.5)   # 0.9 + 0 + 0.5 over three equal layers: 0.4667 at most
    with pytest.raises(ValueError, match="NaN"):
        Sensitivity(float("nan"), {"a": [(0.5, 1.0)]}, {"a": 10}).allocate(0.3)
    with pytest.raises(ValueError, match="NaN"):
        sensitivity(_mlp(), lambda m: float("nan"), sparsities=(0.5,))


def test_sensitivity_nan_lower_is_better():
    s = Sensitivity(1.0, {"a": [(0.5, float("nan"))], "b": [(0.5, 1.0)]}, {"a": 10, "b": 10}, higher_is_better=False)
    assert s.drop("a")[-1] == (0.5, math.inf)
    assert s.allocate(0.25) == pytest.approx({"a": 0.0, "b": 0.5})


# -- defect 5: NaN plans are never on the Pareto front -------------------------------------------------
def test_pareto_excludes_nan_plans():
    def res(name, s, metric, ms):
        return PlanResult(Plan("unstructured", s) if s else Plan("dense"), metric, ms, 1.0, s)
    rs = SearchResult([res("dense", 0.0, 1.0, 1.0), res("u50", 0.5, 0.99, 0.8), res("u90", 0.9, float("nan"), 0.2),
                       res("u80", 0.8, float("nan"), 0.9)])
    front = rs.pareto()
    assert [r.plan.name for r in front] == ["unstructured 50%", "dense"]
    rows = {line.split("|")[1].strip(): line.split("|")[6].strip() for line in rs.table().splitlines()[2:]}
    assert rows == {"dense": "*", "unstructured 50%": "*", "unstructured 90%": "", "unstructured 80%": ""}
    low = SearchResult([res("dense", 0.0, 1.0, 1.0), res("u90", 0.9, float("nan"), 0.2)], higher_is_better=False)
    assert [r.plan.name for r in low.pareto()] == ["dense"]


# -- defect 6: GradientScores with frozen weights ----------------------------------------------------------
def test_gradient_scores_skip_frozen():
    m = _mlp()
    m[2].weight.requires_grad_(False)
    scores = GradientScores(m, kind="taylor")
    assert scores.frozen == {"2"}
    x = torch.randn(5, 8)
    m(x).pow(2).sum().backward()
    ref = (m[4].weight * m[4].weight.grad).abs()
    torch.testing.assert_close(scores.scores["4"], ref)
    assert "2" not in scores.scores
    with pytest.raises(ValueError, match="frozen"):
        sp.prune_unstructured(m, 0.5, importance=scores, layers=["2", "4"])
    assert not masks.is_masked(m[2]) and not masks.is_masked(m[4])
    sp.prune_unstructured(m, 0.5, importance=scores, layers=["2", "4"], overrides={"2": {"importance": "magnitude"}})
    assert masks.layer_sparsity(m) == {"0": 0.0, "2": 0.5, "4": 0.5}
    # the kept entries of layer 4 are the highest-scoring half
    keep = masks.get_mask(m[4])
    assert ref[keep].min() >= ref[~keep].max()
    scores.close()


# -- defect 7: allocate() at the top measured sparsity ----------------------------------------------------
def test_allocate_target_at_top_sparsity():
    sizes = {"0": 256, "2": 1024, "4": 1024, "6": 128}   # weighted mean of 0.9 rounds below 0.9
    s = Sensitivity(1.0, {n: [(0.5, 1.0), (0.9, 1.0)] for n in sizes}, sizes)
    alloc = s.allocate(0.9)
    for v in alloc.values():
        assert v == pytest.approx(0.9, abs=1e-9) and 0.0 <= v <= 1.0
    assert sum(alloc[n] * sizes[n] for n in sizes) / sum(sizes.values()) == pytest.approx(0.9, abs=1e-9)
    s1 = Sensitivity(1.0, {n: [(1.0, 1.0)] for n in sizes}, sizes)
    assert all(0.0 <= v <= 1.0 for v in s1.allocate(1.0).values())
    with pytest.raises(ValueError, match="exceeds"):
        s.allocate(0.91)


# -- defect 8: sensitivity(pattern="blocks") honours misfit= ------------------------------------------------
def test_sensitivity_blocks_misfit():
    def zeros(model):
        return float(masks.sparsity(model))
    big = (4, 64)   # wider than layer 2 (12 x 16): shrink clips it to 4 x 16, skip leaves the layer dense
    default = sensitivity(_mlp(), zeros, sparsities=(0.5,), pattern="blocks", block_size=big, layers=["2"])
    assert default.curves["2"][0][1] > 0.0
    with pytest.warns(UserWarning):
        skip = sensitivity(_mlp(), zeros, sparsities=(0.5,), pattern="blocks", block_size=big, layers=["2"],
                           misfit="skip")
    assert skip.curves == {"2": [(0.5, 0.0)]}
    with pytest.raises(ValueError):
        sensitivity(_mlp(), zeros, sparsities=(0.5,), pattern="blocks", block_size=big, layers=["2"], misfit="error")


# -- defect 9: iterative_prune's final sparsity ---------------------------------------------------------
@pytest.mark.parametrize("value", [np.float32(0.75), np.float64(0.75), torch.tensor(0.75)], ids=["f32", "f64", "0d"])
def test_iterative_prune_number_types(value):
    seen = []
    out = iterative_prune(_mlp(), value, lambda m, i: seen.append(masks.sparsity(m, only_masked=True)), layers=["2"],
                          rounds=2)
    assert seen == pytest.approx([0.5, 0.75], abs=1 / 192)   # geometric: keep 0.5 of the weights, then 0.25
    assert float((out[2].weight == 0).float().mean()) == pytest.approx(0.75, abs=1 / 192)


@pytest.mark.parametrize("value", [True, False, [0.5, True]])
def test_iterative_prune_rejects_bools(value):
    m = _mlp()
    with pytest.raises(TypeError, match="bool"):
        iterative_prune(m, value, lambda mm, i: None, layers=["2"])
    if value is True:
        assert not masks.is_masked(m[2])


# -- defect 10: sparsity counts over modules without a weight -------------------------------------------------
def test_sparsity_skips_weightless_modules():
    m = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4, elementwise_affine=False), nn.LayerNorm(4))
    with torch.no_grad():
        m[2].weight[:3] = 0
    assert masks.layer_sparsity(m, types=nn.LayerNorm) == {"2": 0.75}
    assert masks.sparsity(m, types=nn.LayerNorm) == 0.75
    assert masks.sparsity(m, types=nn.LayerNorm, only_masked=True) == 0.0
    assert masks.layer_sparsity(nn.Sequential(nn.LayerNorm(4, elementwise_affine=False)), types=nn.LayerNorm) == {}
