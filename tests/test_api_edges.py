"""Edges of the public API an adversarial review found: a second convert of a converted model, from_dense on a
subclass that computes something else, a gradual schedule that would have to shrink."""
import pytest
import torch
from torch import nn

import sparseprune as sp
from sparseprune.prune import GradualPruner


def test_converting_a_converted_model_is_refused_and_densify_gives_one_to_convert(tmp_path):
    torch.manual_seed(0)
    src = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 16)).eval()
    sp.prune_blocks(src, 0.8, block_size=(8, 8), dense_first_last=False)
    x = torch.randn(8, 64)
    fast = sp.convert(src, x, time_budget=0.5)
    with pytest.raises(ValueError, match="result already"):
        sp.convert(fast, x)
    again = sp.convert(sp.densify(fast), x, time_budget=0.5)  # a densified copy is a dense model again
    with torch.no_grad():
        torch.testing.assert_close(again(x), src(x), rtol=1e-4, atol=1e-5)


class Scaled(nn.Linear):
    def forward(self, x):
        return 2 * super().forward(x)


class StdConv(nn.Conv2d):
    def _conv_forward(self, x, w, b):
        return super()._conv_forward(x, (w - w.mean((1, 2, 3), keepdim=True)), b)


class Plain(nn.Linear):  # a subclass that computes what nn.Linear does (e.g. torch's NonDynamicallyQuantizableLinear)
    pass


def test_from_dense_refuses_subclasses_that_compute_something_else():
    with pytest.raises(TypeError, match="overrides forward"):
        sp.SparseLinear.from_dense(Scaled(8, 8))
    with pytest.raises(TypeError, match="overrides _conv_forward"):
        sp.SparseConv2d.from_dense(StdConv(4, 4, 3))
    lin = Plain(8, 8)
    x = torch.randn(3, 8)
    with torch.no_grad():
        torch.testing.assert_close(sp.SparseLinear.from_dense(lin, format="csr")(x), lin(x), rtol=1e-5, atol=1e-6)
        mha = nn.MultiheadAttention(8, 2)
        torch.testing.assert_close(sp.SparseLinear.from_dense(mha.out_proj, format="csr")(x), mha.out_proj(x),
                                   rtol=1e-5, atol=1e-6)


def test_gradual_schedule_cannot_start_above_its_end():
    m = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    with pytest.raises(ValueError, match="initial_sparsity"):
        GradualPruner(m, final_sparsity=0.5, initial_sparsity=0.9)
    GradualPruner(m, final_sparsity=0.5, initial_sparsity=0.5)  # equal: a constant schedule


def _bn(n):
    b = nn.BatchNorm2d(n)
    b.running_mean.normal_()
    b.running_var.uniform_(0.5, 2)
    return b


class ConvWeightRead(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 6, 3, padding=1), _bn(6)

    def forward(self, x):
        return self.bn(self.conv(x)) + torch.nn.functional.conv2d(x, self.conv.weight, padding=1)


class BNRead(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 6, 3, padding=1), _bn(6)

    def forward(self, x):
        return self.bn(self.conv(x)) * self.bn.weight.view(1, -1, 1, 1) + self.bn.running_mean.view(1, -1, 1, 1)


@pytest.mark.parametrize("arch", [ConvWeightRead, BNRead])
def test_batchnorm_is_not_folded_when_the_forward_reads_its_tensors_elsewhere(arch):
    from sparseprune.fold import fold_batchnorm
    torch.manual_seed(0)
    m = arch().eval()
    x = torch.randn(2, 4, 8, 8)
    folded, pairs = fold_batchnorm(m)
    assert pairs == []
    with torch.no_grad():
        torch.testing.assert_close(folded(x), m(x))
        torch.testing.assert_close(sp.convert(m, x, time_budget=0.5)(x), m(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("wdt", [torch.float32, torch.bfloat16, torch.int8])
def test_channels_last_model_cast_keeps_packed_arrays_readable(wdt):
    """model.to(memory_format=torch.channels_last) restrides every 4-D tensor: the packed (blocks, r, c / g, g)
    values of int8 / bf16 layers stay laid out as the kernels read them."""
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 32, 3, padding=1)
    lin = nn.Linear(32, 64)
    with torch.no_grad():
        lin.weight.copy_(lin.weight * (torch.rand(64, 32) > 0.5))
    model = nn.Sequential(sp.SparseConv2d.from_dense(conv, format="bsr", block_size=(16, 16), weight_dtype=wdt),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          sp.SparseLinear.from_dense(lin, format="bsr", block_size=(16, 16), weight_dtype=wdt)).eval()
    x = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        want = model(x)
        model.to(memory_format=torch.channels_last)
        assert all(t.is_contiguous() for m in model if isinstance(m, sp.nn.SparseModule)
                   for t in m._buffers.values() if t is not None)
        torch.testing.assert_close(model(x), want)
        torch.testing.assert_close(model(x.to(memory_format=torch.channels_last)), want, rtol=1e-4, atol=1e-4)


def test_dense_format_layer_keeps_its_dtype_and_saves(tmp_path):
    """A dense-format SparseLinear holds float32 like the sparse formats (validate() and saved files rely on it):
    casting it raises, a model cast leaves it (with a warning), and the model saves and loads."""
    lin = nn.Linear(8, 8)
    s = sp.SparseLinear.from_dense(lin, format="dense")
    with pytest.raises(TypeError, match="keeps its weight dtype"):
        s.half()
    model = nn.Sequential(s, nn.ReLU())
    with pytest.warns(UserWarning, match="keeps its weight dtype"):
        model.double()
    with pytest.raises(TypeError, match="float32"):
        model(torch.randn(2, 8, dtype=torch.float64))
    sp.save(model, tmp_path / "m.sp")
    back = sp.load(tmp_path / "m.sp", nn.Sequential(nn.Linear(8, 8), nn.ReLU()))
    x = torch.randn(2, 8)
    with torch.no_grad():
        torch.testing.assert_close(back(x), lin(x).relu())


@pytest.mark.filterwarnings("ignore:There is a performance drop")
def test_torch_func_grad_and_per_sample_gradients_through_a_sparse_linear():
    from torch.func import functional_call, grad, jacrev, vmap
    torch.manual_seed(0)
    lin = nn.Linear(16, 8)
    with torch.no_grad():
        lin.weight[:, :8] = 0
    s = sp.SparseLinear.from_dense(lin, format="csr")
    x = torch.randn(16)
    torch.testing.assert_close(grad(lambda v: s(v).tanh().sum())(x), grad(lambda v: lin(v).tanh().sum())(x))
    torch.testing.assert_close(jacrev(s)(x), jacrev(lin)(x))
    from torch.func import hessian
    torch.testing.assert_close(hessian(lambda v: s(v).tanh().sum())(x), hessian(lambda v: lin(v).tanh().sum())(x),
                               rtol=1e-5, atol=1e-6)
    xs = torch.randn(5, 16)  # per-sample gradients of the bias: functional_call + grad + vmap

    def loss(mod, p, v):
        return functional_call(mod, p, (v,)).square().sum()
    got = vmap(grad(lambda p, v: loss(s, p, v)), in_dims=(None, 0))({"bias": s.bias.detach()}, xs)["bias"]
    want = vmap(grad(lambda p, v: loss(lin, p, v)), in_dims=(None, 0))({"bias": lin.bias.detach()}, xs)["bias"]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_load_state_dict_assign_installs_checked_arrays():
    torch.manual_seed(0)
    lin = nn.Linear(16, 16)
    with torch.no_grad():
        lin.weight.copy_(lin.weight * (torch.rand(16, 16) > 0.5))
    s = sp.SparseLinear.from_dense(lin, format="csr")
    sd = s.state_dict()
    sd["col_idx"] = sd["col_idx"].repeat_interleave(2)[::2]  # the same values, not contiguous
    s.load_state_dict(sd, assign=True)
    assert all(t.is_contiguous() for t in s._buffers.values())
    x = torch.randn(3, 16)
    with torch.no_grad():
        torch.testing.assert_close(s(x), lin(x), rtol=1e-5, atol=1e-6)
    sd = s.state_dict()
    sd["bias"] = sd["bias"].double()
    before = {k: v.clone() for k, v in s.state_dict().items()}
    with pytest.raises(ValueError, match="bias must be float32"):
        s.load_state_dict(sd, assign=True)
    assert all(torch.equal(before[k], v) for k, v in s.state_dict().items())


def test_load_into_a_model_with_a_lazy_layer(tmp_path):
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.head = nn.Linear(16, 16), nn.LazyLinear(8)

        def forward(self, x):
            return self.head(self.fc(x))
    torch.manual_seed(0)
    m = M()
    x = torch.randn(4, 16)
    m(x)
    with torch.no_grad():
        m.head.weight[:, :8] = 0
    m.head = sp.SparseLinear.from_dense(m.head, format="csr")
    sp.save(m.eval(), tmp_path / "m.sp")
    back = sp.load(tmp_path / "m.sp", M().eval())
    with torch.no_grad():
        torch.testing.assert_close(back(x), m(x))


def test_int8_rows_whose_range_overflows_float32(isa):
    """A finite row wider than float32's range (+-2e38: max - min overflows) is quantized with its scale taken
    part by part, not replaced by 1 (a finite wrong row); every ISA path and the conv planes kernel agree."""
    torch.manual_seed(0)
    lin = nn.Linear(64, 32)
    w = lin.weight.detach() * (torch.rand(32, 64) > 0.3)
    with torch.no_grad():
        lin.weight.copy_(w)
    q = sp.SparseLinear.from_dense(lin, format="bsr", block_size=(16, 16), weight_dtype=torch.int8)
    x = torch.randn(3, 64)
    x[0] = torch.tensor([2e38, -2e38] * 32)
    with torch.no_grad():
        got, dense = q(x), lin(x)
    assert torch.isfinite(got).all()
    rel = ((got[0] - dense[0]).abs().max() / dense[0].abs().max()).item()
    assert rel < 0.2, rel  # int8 error, not a row computed with scale 1
    from sparseprune import quant
    torch.testing.assert_close(got, quant.reference_qspmm(x, q.packed(), q.bias), rtol=0, atol=0)
    conv = nn.Conv2d(16, 16, 3, padding=1)
    qc = sp.SparseConv2d.from_dense(conv, format="bsr", block_size=(16, 16), weight_dtype=torch.int8)
    xi = torch.randn(1, 16, 6, 6)
    xi[0, :, 2, 3] = torch.tensor([2e38, -2e38] * 8)
    with torch.no_grad():
        yc, yd = qc(xi), conv(xi)
    assert torch.isfinite(yc).all() and ((yc - yd).abs().max() / yd.abs().max()).item() < 0.2


def test_int8_packing_refuses_non_finite_weights_and_stores_tiny_rows_as_zero():
    w = torch.randn(32, 32)
    for bad in (float("nan"), float("inf")):
        wb = w.clone()
        wb[3, 5] = bad
        with pytest.raises(ValueError, match=r"must be finite: output row\(s\) \[3\]"):
            sp.SparseLinear.from_dense(_with_weight(wb), format="bsr", block_size=(16, 16), weight_dtype=torch.int8)
    wt = w.clone()
    wt[3] = 1e-44  # denormal: no normal float32 scale
    lin = _with_weight(wt)
    q = sp.SparseLinear.from_dense(lin, format="bsr", block_size=(16, 16), weight_dtype=torch.int8)
    x = torch.randn(4, 32)
    with torch.no_grad():
        y = q(x)
    assert torch.equal(y[:, 3], lin.bias.detach()[3].expand(4))


def _with_weight(w):
    lin = nn.Linear(w.shape[1], w.shape[0])
    with torch.no_grad():
        lin.weight.copy_(w)
    return lin


def test_a_bare_layer_is_refused_by_convert_and_listed_by_summary():
    lin = nn.Linear(32, 32)
    with pytest.raises(ValueError, match="single Linear"):
        sp.convert(lin, torch.randn(2, 32))
    s = sp.SparseLinear.from_dense(lin, format="csr")
    rows = sp.summary(s, print_fn=None)
    assert len(rows) == 1 and rows[0]["format"] == "csr"


def test_summary_table_keeps_one_line_per_layer_and_aligned_columns():
    m = nn.ModuleDict({"ok": nn.Linear(8, 8), "new\nline": nn.Linear(8, 8), "层层层": nn.Linear(8, 8),
                       "x" * 300: nn.Linear(8, 8)})
    table = sp.summary(nn.ModuleDict({"d": m}), print_fn=None).table()
    lines = table.splitlines()
    rows = [ln for ln in lines if "Linear" in ln]
    assert len(rows) == 4 and all(len(ln) < 200 for ln in rows)
    import unicodedata

    def width(s):
        return sum(2 if unicodedata.east_asian_width(c) in ("W", "F") else 1 for c in s)
    cols = {width(ln[:ln.index("Linear")]) for ln in rows}
    assert len(cols) == 1  # the type column starts at the same terminal column on every row
