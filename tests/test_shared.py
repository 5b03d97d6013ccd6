"""Sparse Linear layers that read one input, run as one kernel call (sparseprune.shared)."""
import copy
import importlib
import pickle
import threading

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import sparseprune as sp
from sparseprune.nn import SparseLinear
from sparseprune.shared import SharedInputGroup, compatible, fused_layer, group_shared_inputs, ungroup
from helpers import block_sparse_weight

timing = importlib.import_module("sparseprune.convert.timing")
cv = importlib.import_module("sparseprune.convert")
cv_decide = importlib.import_module("sparseprune.convert.decide")

DTYPES = {"float32": torch.float32, "int8": torch.int8, "bfloat16": torch.bfloat16}


def _layer(k, m, sparsity, fmt, block, wdt, bias=True, act="none", gen=None):
    lin = nn.Linear(k, m, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(block_sparse_weight(m, k, block, sparsity, generator=gen))
    return SparseLinear.from_dense(lin, format=fmt, block_size=None if fmt == "csr" else block,
                                   weight_dtype=DTYPES[wdt], activation=act)


def _members(k, outs, sparsity, fmt, block, wdt, biases=None, act="none", seed=0):
    gen = torch.Generator().manual_seed(seed)
    biases = biases or [True] * len(outs)
    return [_layer(k, m, sparsity, fmt, block, wdt, b, act, gen) for m, b in zip(outs, biases)]


KINDS = [("csr", (1, 1), "float32"), ("bsr", (16, 16), "float32"), ("bsr", (4, 4), "float32"),
         ("bsr", (16, 16), "int8"), ("bsr", (1, 4), "int8"), ("bsr", (8, 8), "bfloat16")]


@settings(max_examples=30, deadline=None)
@given(kind=st.sampled_from(KINDS), k=st.integers(1, 70), n=st.integers(1, 19), parts=st.integers(2, 4),
       last=st.integers(1, 40), sparsity=st.sampled_from([0.0, 0.5, 0.9, 1.0]), act=st.sampled_from(["none", "relu"]),
       bias_mask=st.integers(0, 15))
def test_fused_layer_gives_each_member_its_own_output(kind, k, n, parts, last, sparsity, act, bias_mask):
    """Every slice of the fused layer is what its member computes alone (int8 / bf16: bit for bit),
    with odd sizes, a ragged last member, empty members and members without bias."""
    fmt, block, wdt = kind
    if wdt == "int8":
        k = 4 * ((k + 3) // 4)
    r = block[0]
    outs = [r * (1 + i % 3) for i in range(parts - 1)] + [last]  # only the last is not a multiple of r
    members = _members(k, outs, sparsity, fmt, block, wdt, [bool(bias_mask >> i & 1) for i in range(parts)], act)
    assert compatible(members) is None
    fused = fused_layer(members)
    assert fused.out_features == sum(outs) and fused.weight_dtype == wdt and fused.activation == act
    x = torch.randn(n, k)
    with torch.no_grad():
        y = fused(x)
        a = 0
        for m in members:
            ref = m(x)
            if wdt == "float32":
                torch.testing.assert_close(y[:, a:a + m.out_features], ref, rtol=1e-5, atol=1e-5)
            else:
                assert torch.equal(y[:, a:a + m.out_features], ref)
            a += m.out_features
        # and against the independent reference: dense PyTorch on the weight the members hold
        dense = torch.cat([m.to_dense() for m in members])
        bias = torch.cat([m.bias if m.bias is not None else torch.zeros(m.out_features) for m in members])
        expect = torch.nn.functional.linear(x, dense, bias)
        expect = torch.relu(expect) if act == "relu" else expect
        if wdt == "float32":
            torch.testing.assert_close(y, expect, rtol=1e-4, atol=1e-4)


def test_layers_that_cannot_share_a_call_are_refused():
    a, b = _members(32, [16, 16], 0.5, "bsr", (16, 16), "float32")
    assert compatible([a]) is not None and compatible([a, a]) is not None
    c = _layer(32, 16, 0.5, "bsr", (8, 8), "float32")
    assert "differ" in compatible([a, c])
    d = _layer(48, 16, 0.5, "bsr", (16, 16), "float32")
    assert "differ" in compatible([a, d])
    q = _layer(32, 16, 0.5, "bsr", (16, 16), "int8")
    assert "differ" in compatible([a, q])
    ragged = _layer(32, 20, 0.5, "bsr", (16, 16), "float32")
    assert "multiple" in compatible([ragged, a]) and compatible([a, ragged]) is None
    dense = SparseLinear.from_dense(nn.Linear(32, 16), format="dense")
    assert "dense" in compatible([a, dense])
    assert "SparseLinear" in compatible([a, nn.Linear(32, 16)])
    with pytest.raises(ValueError, match="cannot share"):
        SharedInputGroup([a, c])
    g = SharedInputGroup([a, b]).attach()
    with pytest.raises(ValueError, match="another shared-input group"):
        SharedInputGroup([b, a]).attach()
    g.detach()
    assert "_shared_input" not in a.__dict__


@pytest.mark.parametrize("wdt", ["float32", "int8", "bfloat16"])
def test_group_hands_each_output_once_to_its_member_for_that_input(wdt):
    block = (1, 1) if wdt == "float32" else (16, 16)
    members = _members(64, [32, 48, 16], 0.6, "csr" if wdt == "float32" else "bsr", block, wdt)
    alone = [copy.deepcopy(m) for m in members]
    SharedInputGroup(members).attach()
    calls = []
    fused = members[0]._shared_input[0]._current()[0]
    for m in members:  # the weights are held once: the members' arrays are views of the fused ones
        for name in m._packed_names():
            if name != "row_ptr":
                assert m._buffers[name].untyped_storage().data_ptr() == fused._buffers[name].untyped_storage().data_ptr()
        m.validate()
    orig = fused._fast
    fused._fast = lambda x: (calls.append(1), orig(x))[1]
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        ys = [m(x) for m in members]
        assert len(calls) == 1  # one kernel call for the three
        for y, m in zip(ys, alone):
            assert y.shape == (2, 5, m.out_features)
            assert torch.equal(y, m(x)) if wdt != "float32" else torch.allclose(y, m(x), atol=1e-5)
        # a member called again on the same input computes again (its output was handed out)
        again = members[1](x)
        assert len(calls) == 2 and torch.allclose(again, alone[1](x), atol=1e-5)
        # the input changed in place between two members: the second one does not take a stale output
        calls.clear()
        x = torch.randn(2, 5, 64)
        y0 = members[0](x)
        x.mul_(2)
        y1 = members[1](x)
        assert len(calls) == 2
        assert torch.allclose(y1, alone[1](x), atol=1e-5) and torch.allclose(y0, alone[0](x / 2), atol=1e-5)
        # another tensor with equal values is another input: computed, never a stale output
        x2 = torch.randn(2, 5, 64)
        members[0](x)
        torch.testing.assert_close(members[2](x2), alone[2](x2), rtol=1e-5, atol=1e-5)


def test_weight_changes_between_calls_are_never_served_stale():
    members = _members(32, [16, 16], 0.5, "bsr", (16, 16), "float32")
    SharedInputGroup(members).attach()
    x = torch.randn(4, 32)
    new = _layer(32, 16, 0.3, "bsr", (16, 16), "float32", gen=torch.Generator().manual_seed(7))
    with torch.no_grad():
        members[0](x)
        members[1].load_state_dict(new.state_dict())  # between the two calls on one input
        torch.testing.assert_close(members[1](x), new(x))
        members[0](x)
        members[1].bias.add_(1.0)  # an in-place edit of the bias
        torch.testing.assert_close(members[1](x), new(x) + 1.0)
        # and the next fused call packs the new weights (into its own copy: a member's arrays are only
        # replaced by views when a group is attached, never inside a call)
        before = members[1](x)
        vals = members[1].values
        members[0](x)
        torch.testing.assert_close(members[1](x), before)
        assert members[1].values is vals


@pytest.mark.parametrize("change", ["num_threads", "activation"])
def test_a_member_that_can_no_longer_share_a_call_runs_on_its_own(change):
    """A member whose threads or fused activation change after the group was attached: every member computes its
    own output (no error), each as it would alone; changed back, the group shares the call again."""
    members = _members(32, [16, 16, 16], 0.5, "bsr", (16, 16), "float32")
    refs = [copy.deepcopy(m) for m in members]
    group = SharedInputGroup(members).attach()
    x = torch.randn(5, 32)
    shared = []
    real = group._current

    def current():
        r = real()
        shared.append(r[0] is not None)
        return r
    group._current = current
    with torch.no_grad():
        for m, r in zip(members, refs):
            torch.testing.assert_close(m(x), r(x))
        setattr(members[1], change, 1 if change == "num_threads" else "relu")
        setattr(refs[1], change, 1 if change == "num_threads" else "relu")
        for _ in range(2):
            for m, r in zip(members, refs):
                torch.testing.assert_close(m(x), r(x))
        setattr(members[1], change, None if change == "num_threads" else "none")
        setattr(refs[1], change, None if change == "num_threads" else "none")
        for m, r in zip(members, refs):
            torch.testing.assert_close(m(x), r(x))
    assert shared == [True] + [False] * 6 + [True]
    with pytest.raises(ValueError, match="cannot share"):  # attaching while they cannot share is refused
        members[2].activation = "relu"
        group.detach()
        group.attach()
    assert not any("_shared_input" in m.__dict__ for m in members)


def test_only_plain_eager_inference_is_grouped():
    members = _members(32, [16, 16], 0.5, "bsr", (16, 16), "float32")
    ref = [copy.deepcopy(m) for m in members]
    g = SharedInputGroup(members).attach()
    x = torch.randn(3, 32, requires_grad=True)
    ys = [m(x) for m in members]  # gradients needed: each layer on its own, through autograd
    assert all(y.grad_fn is not None for y in ys) and getattr(g._local, "pending", None) is None
    sum(y.sum() for y in ys).backward()
    x2 = x.detach().clone().requires_grad_(True)
    sum(m(x2).sum() for m in ref).backward()
    torch.testing.assert_close(x.grad, x2.grad)
    with torch.no_grad():
        xt = torch.randn(32, 3).t()  # not contiguous
        for m, r in zip(members, ref):
            torch.testing.assert_close(m(xt), r(xt))
        with pytest.raises(TypeError, match="expects a Tensor"):
            members[0]([1.0])
        with pytest.raises(ValueError, match="inputs of shape"):
            members[0](torch.randn(3, 31))


def test_inference_mode_runs_each_layer_on_its_own():
    """Inference tensors carry no version counter: under torch.inference_mode() nothing is handed over
    (an in-place change of the input between two calls could not be seen), and nothing fails."""
    members = _members(32, [16, 16], 0.5, "bsr", (16, 16), "float32")
    ref = [copy.deepcopy(m) for m in members]
    g = SharedInputGroup(members).attach()
    with torch.inference_mode():
        x = torch.randn(3, 32)
        y0 = members[0](x)
        x.add_(1.0)  # in place, untracked
        torch.testing.assert_close(members[1](x), ref[1](x))
        torch.testing.assert_close(y0, ref[0](x - 1.0), rtol=1e-5, atol=1e-5)
        assert getattr(g._local, "pending", None) is None
        model = nn.ModuleList(members)
        rep = group_shared_inputs(_Pair(model), torch.randn(3, 32), min_gain=-1.0)
    assert len(rep) == 1 and not rep[0]["kept"] and "inference" in rep[0]["reason"]
    x = torch.randn(3, 32)
    with torch.inference_mode():  # a normal tensor under inference mode is grouped; the arrays stay normal
        SharedInputGroup(members).attach()
        torch.testing.assert_close(members[0](x), ref[0](x))
        assert getattr(members[0]._shared_input[0]._local, "pending", None) is not None
        torch.testing.assert_close(members[1](x), ref[1](x))
    assert not any(t.is_inference() for m in members for t in m._buffers.values())


class _Pair(nn.Module):
    def __init__(self, layers):
        super().__init__()
        self.layers = layers

    def forward(self, x):
        return sum(m(x) for m in self.layers)


def test_threads_never_see_each_others_outputs():
    members = _members(64, [32, 32, 32], 0.5, "bsr", (16, 16), "int8")
    ref = [copy.deepcopy(m) for m in members]
    SharedInputGroup(members).attach()
    errors = []

    def work(seed):
        gen = torch.Generator().manual_seed(seed)
        try:
            with torch.no_grad():
                for _ in range(30):
                    x = torch.randn(4, 64, generator=gen)
                    for m, r in zip(members, ref):
                        if not torch.equal(m(x), r(x)):
                            errors.append(seed)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    ts = [threading.Thread(target=work, args=(s,)) for s in range(3)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert errors == []


class _Attention(nn.Module):
    """q / k / v projections of one input, and an output projection."""

    def __init__(self, d=64, flat=False):
        super().__init__()
        self.query, self.key, self.value, self.out = (nn.Linear(d, d) for _ in range(4))
        self.flat = flat

    def forward(self, h):
        q, k, v = self.query(h), self.key(h), self.value(h)
        if self.flat:  # needs contiguous outputs: a column slice cannot be viewed this way
            q = q.view(-1).view(q.shape)
        a = torch.softmax(q @ k.transpose(-1, -2) / 8, -1) @ v
        return self.out(a) + h


def _attention_model(flat=False):
    torch.manual_seed(3)
    model = nn.Sequential(_Attention(flat=flat), _Attention(flat=flat)).eval()
    sp.prune_blocks(model, 0.75, block_size=(16, 16), dense_first_last=False)
    return model


@pytest.fixture
def fused_wins(monkeypatch):
    """Every sparse candidate and every shared-input group timed faster (grouping, not timing, is tested)."""
    def fake(fns, *a, **k):
        if set(fns) == {"separate", "fused"}:
            return {"separate": 1.0, "fused": 0.5}
        return {n: (1.0 if n == "dense" else 0.1) for n in fns}
    monkeypatch.setattr(cv_decide, "time_calls", fake)
    monkeypatch.setattr(cv, "time_calls", fake)
    monkeypatch.setattr(timing, "time_calls", fake)


@pytest.mark.parametrize("dtypes", [(torch.float32,), (torch.float32, torch.int8)])
def test_convert_groups_qkv_and_load_groups_them_again(fused_wins, tmp_path, dtypes):
    model = _attention_model()
    x = torch.randn(2, 10, 64)
    c = sp.convert(model, x, formats=("bsr",), end_to_end=False, time_budget=2.0, weight_dtypes=dtypes)
    groups = sp.summary(c, print_fn=None).totals["shared_inputs"]
    assert [g["layers"] for g in groups] == [[f"{i}.{n}" for n in ("query", "key", "value")] for i in (0, 1)]
    assert all(g["kept"] for g in groups)
    assert "one kernel call (2)" in str(sp.summary(c, print_fn=None))
    for i in (0, 1):
        g = c[i].query._shared_input[0]
        assert g is c[i].key._shared_input[0] is c[i].value._shared_input[0]
        assert "_shared_input" not in c[i].out.__dict__
    with torch.no_grad():
        y = c(x)
        ungroup(c)
        y_alone = c(x)
    assert torch.equal(y, y_alone) if len(dtypes) > 1 else torch.allclose(y, y_alone, atol=1e-5)
    assert sp.summary(c, print_fn=None).totals["shared_inputs"]  # the report is kept
    from sparseprune.shared import regroup
    assert regroup(c, c._sparseprune_report) == 2
    path = tmp_path / "qkv.sp"
    sp.save(c, path)
    back = sp.load(path, _attention_model())
    assert "_shared_input" in back[0].query.__dict__ and "_shared_input" in back[1].value.__dict__
    with torch.no_grad():
        assert torch.equal(back(x), c(x))
    # copies group their own layers
    for dup in (copy.deepcopy(c), pickle.loads(pickle.dumps(c))):
        g = dup[0].query._shared_input[0]
        assert g.members[0] is dup[0].query and g is not c[0].query._shared_input[0]
        with torch.no_grad():
            assert torch.equal(dup(x), y)


def test_convert_without_groups_and_models_that_refuse_slices(fused_wins):
    x = torch.randn(2, 10, 64)
    c = sp.convert(_attention_model(), x, formats=("bsr",), end_to_end=False, time_budget=2.0, shared_inputs=False)
    assert sp.summary(c, print_fn=None).totals["shared_inputs"] == []
    assert not any("_shared_input" in m.__dict__ for m in c.modules())
    model = _attention_model(flat=True)
    c = sp.convert(model, x, formats=("bsr",), end_to_end=False, time_budget=2.0)
    groups = sp.summary(c, print_fn=None).totals["shared_inputs"]
    assert len(groups) == 2 and not any(g["kept"] for g in groups)
    assert all("failed" in g["reason"] for g in groups)
    assert not any("_shared_input" in m.__dict__ for m in c.modules())
    with torch.no_grad():
        torch.testing.assert_close(c(x), model(x), rtol=1e-4, atol=1e-4)


def test_groups_that_are_not_faster_are_dropped(monkeypatch):
    monkeypatch.setattr(timing, "time_calls", lambda fns, *a, **k: {"separate": 1.0, "fused": 1.0})
    model = _attention_model()
    c = sp.convert(model, torch.randn(2, 10, 64), formats=("bsr",), end_to_end=False, time_budget=2.0)
    for g in sp.summary(c, print_fn=None).totals["shared_inputs"]:
        assert not g["kept"] and "not faster" in g["reason"] and g["fused_ms"] == 1000.0
    assert not any("_shared_input" in m.__dict__ for m in c.modules())


def test_end_to_end_revert_drops_the_groups(monkeypatch):
    def fake(fns, *a, **k):
        if set(fns) == {"dense", "converted"}:
            return {"dense": 1.0, "converted": 2.0}
        if set(fns) == {"separate", "fused"}:
            return {"separate": 1.0, "fused": 0.5}
        return {n: (1.0 if n == "dense" else 0.1) for n in fns}
    for mod in (cv_decide, cv, timing):
        monkeypatch.setattr(mod, "time_calls", fake)
    c = sp.convert(_attention_model(), torch.randn(2, 10, 64), formats=("bsr",), time_budget=2.0)
    t = sp.summary(c, print_fn=None).totals
    assert t["end_to_end_reverted"] and t["shared_inputs"] == []
    assert not any(isinstance(m, SparseLinear) for m in c.modules())


def test_group_shared_inputs_reports_inputs_it_cannot_group():
    members = _members(32, [16, 16], 0.5, "bsr", (16, 16), "float32")

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = members

        def forward(self, x):
            x = x.t()  # not contiguous
            return self.a(x) + self.b(x)

    rep = group_shared_inputs(Two(), torch.randn(32, 4), min_gain=-1.0)
    assert len(rep) == 1 and not rep[0]["kept"] and "contiguous" in rep[0]["reason"]


@pytest.mark.parametrize("bad", [
    [{"layers": ["0.query"], "kept": "yes", "separate_ms": None, "fused_ms": None, "reason": ""}],
    [{"layers": "0.query", "kept": True, "separate_ms": None, "fused_ms": None, "reason": ""}],
    [{"layers": [1, 2], "kept": True, "separate_ms": None, "fused_ms": None, "reason": ""}],
    [{"layers": ["a"], "kept": True, "separate_ms": True, "fused_ms": None, "reason": ""}],
    [{"layers": ["a"], "kept": True, "extra": 1, "separate_ms": None, "fused_ms": None, "reason": ""}],
    {"layers": []},
])
def test_malformed_shared_input_records_are_refused(bad):
    from sparseprune.convert.report import check_report
    with pytest.raises(ValueError, match="shared_inputs"):
        check_report({"layers": [], "shared_inputs": bad})


def test_load_ignores_a_group_that_cannot_apply(fused_wins, tmp_path):
    """A file whose kept group names layers that cannot share a call (edited, or another block size)
    loads, and those layers run on their own."""
    from sparseprune.shared import regroup
    model = _attention_model()
    x = torch.randn(2, 10, 64)
    c = sp.convert(model, x, formats=("bsr",), end_to_end=False, time_budget=2.0)
    rep = {"shared_inputs": [{"layers": ["0.query", "0.missing"], "kept": True, "separate_ms": None,
                              "fused_ms": None, "reason": ""},
                             {"layers": ["0.query", "1.query"], "kept": True, "separate_ms": None,
                              "fused_ms": None, "reason": ""}]}
    ungroup(c)
    assert regroup(c, rep) == 1  # different inputs do not matter to regroup; a missing layer does
    with torch.no_grad():
        torch.testing.assert_close(c(x), model(x), rtol=1e-4, atol=1e-4)


def test_compiled_and_exported_grouped_layers_run_each_layer():
    """torch.compile (fullgraph) and torch.export trace the layers one by one through the custom ops."""
    c = _attention_model()
    x = torch.randn(2, 10, 64)
    for m in (c[0], c[1]):
        for n in ("query", "key", "value", "out"):
            setattr(m, n, SparseLinear.from_dense(getattr(m, n), format="bsr", block_size=(16, 16)))
        SharedInputGroup([m.query, m.key, m.value]).attach()
    with torch.no_grad():
        ref = c(x)
        torch.testing.assert_close(torch.compile(c, fullgraph=True)(x), ref, rtol=1e-4, atol=1e-4)
        ep = torch.export.export(c, (x,))
        torch.testing.assert_close(ep.module()(x), ref, rtol=1e-4, atol=1e-4)


def test_edits_through_data_reach_the_shared_call():
    """A member's bias edited in place through ``.data`` (no version counter bump: a hand-written SGD / EMA
    step) is the memory the shared call adds; in a copy of the model (whose group holds concatenated copies),
    an in-place edit followed by the member's validate() is seen too."""
    members = _members(32, [16, 16], 0.5, "bsr", (16, 16), "float32")
    SharedInputGroup(members).attach()
    x = torch.randn(4, 32)
    with torch.no_grad():
        ref = [m.to_dense_module() for m in members]
        members[0](x), members[1](x)
        members[0].bias.data.add_(1.0)
        ref[0].bias.add_(1.0)
        torch.testing.assert_close(members[0](x), ref[0](x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(members[1](x), ref[1](x), rtol=1e-5, atol=1e-5)
        dup = copy.deepcopy(nn.ModuleList(members))
        dup[0](x), dup[1](x)  # the copy's group builds its fused layer (copies)
        dup[1].values.data.zero_()
        dup[1].validate()
        dup[0](x)
        torch.testing.assert_close(dup[1](x), dup[1].bias.expand(4, 16))
