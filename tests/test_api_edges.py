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
