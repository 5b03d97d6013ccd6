"""Plan search (accuracy vs measured latency) and sensitivity analysis."""
import copy

import pytest
import torch

import sparseprune as sp
from sparseprune.prune import masks
from sparseprune.prune.search import (Plan, PlanResult, SearchResult, Sensitivity, search_plans,
                                      sensitivity)
from test_accuracy_digits import accuracy, dense_model, digits


pytestmark = pytest.mark.usefixtures("one_thread")


def test_search_plans_measures_each_converted_plan(tmp_path):
    xtr, ytr, xte, yte = digits()
    model, dense_acc = dense_model("mlp")
    plans = [Plan("dense"), Plan("blocks", 0.8, (16, 16)), Plan("unstructured", 0.9), Plan("nm")]
    res = search_plans(model, lambda m: accuracy(m, xte, yte), xte[:64], plans=plans, repeats=3)
    assert [r.plan.name for r in res] == ["dense", "blocks 16x16 80%", "unstructured 90%", "2:4"]
    assert res[0].metric == pytest.approx(dense_acc) and res[0].sparsity == 0.0
    for r in res[1:]:
        # the converted model's accuracy equals the masked model's (evaluated independently here)
        ref = r.plan.apply(copy.deepcopy(model))
        assert r.metric == pytest.approx(accuracy(ref, xte, yte))
        assert r.latency_ms > 0 and r.dense_latency_ms == res[0].dense_latency_ms
    assert res[1].sparsity == pytest.approx(0.8 * (256 * 64 + 256 * 256) / (256 * 64 + 256 * 256 + 2560), abs=0.01)
    front = res.pareto()
    assert front and all(f in res for f in front)
    assert "| dense |" in res.table()
    pytest.importorskip("matplotlib")
    png = res.plot(str(tmp_path / "pareto.png"))
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert torch.equal(model.fc2.weight, dense_model("mlp")[0].fc2.weight)  # the user's model is untouched


def test_pareto_front_is_exact():
    P = Plan("dense")
    rs = [PlanResult(P, m, l, 10.0, 0) for m, l in [(0.9, 10), (0.8, 5), (0.85, 6), (0.7, 7), (0.95, 20), (0.8, 4)]]
    front = SearchResult(rs).pareto()
    assert [(r.metric, r.latency_ms) for r in front] == [(0.8, 4), (0.85, 6), (0.9, 10), (0.95, 20)]
    lower = SearchResult(rs, higher_is_better=False).pareto()  # e.g. a loss
    assert [(r.metric, r.latency_ms) for r in lower] == [(0.8, 4), (0.7, 7)]


def test_allocate_gives_insensitive_layers_more_sparsity():
    curves = {"robust": [(0.5, 0.99), (0.9, 0.97)], "fragile": [(0.5, 0.90), (0.9, 0.5)]}
    sens = Sensitivity(1.0, curves, {"robust": 300, "fragile": 100})
    alloc = sens.allocate(0.6)
    assert alloc["robust"] > alloc["fragile"]
    assert (alloc["robust"] * 300 + alloc["fragile"] * 100) / 400 == pytest.approx(0.6, abs=1e-6)
    with pytest.raises(ValueError, match="exceeds"):
        sens.allocate(0.95)
    with pytest.raises(ValueError):
        sens.allocate(1.5)


def test_sensitivity_on_digits_mlp(tmp_path):
    xtr, ytr, xte, yte = digits()
    model, dense_acc = dense_model("mlp")
    before = copy.deepcopy(model.state_dict())
    sens = sensitivity(model, lambda m: accuracy(m, xte, yte), sparsities=(0.5, 0.9, 0.99))
    assert sens.baseline == pytest.approx(dense_acc) and list(sens.curves) == ["fc1", "fc2"]
    for name, c in sens.curves.items():
        assert [s for s, _ in c] == [0.5, 0.9, 0.99]
        assert c[-1][1] < dense_acc  # 99% of a layer gone hurts
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    alloc = sens.allocate(0.8)
    pruned = sp.prune.patterns.prune_unstructured(copy.deepcopy(model), alloc)
    got = masks.sparsity(pruned, only_masked=True)
    assert got == pytest.approx(0.8, abs=0.01)
    assert "fc1" in sens.table()
    pytest.importorskip("matplotlib")
    assert open(sens.plot(str(tmp_path / "s.png")), "rb").read(4) == b"\x89PNG"
