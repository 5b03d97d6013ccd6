"""Probe findings for sp.distill, sp.prune_channels and the command line: each test failed before its fix."""
import copy

import pytest
import torch
from torch import nn

import sparseprune as sp
from sparseprune.distill import distill

pytestmark = pytest.mark.usefixtures("one_thread")


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                         nn.Linear(32, 8))


def _batches(k, shape=(8, 16)):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(*shape, generator=g) for _ in range(k)]


# -- distill ---------------------------------------------------------------------------------------------
def test_distill_gives_each_module_its_own_training_mode_back():
    """A BatchNorm the caller froze in eval mode inside a model in train mode stayed in train mode after a
    successful run (only the top module's mode was put back, recursively)."""
    model = _mlp().train()
    model[1].eval()
    before = [m.training for m in model.modules()]
    distill(model, _batches(3), sparsity=0.5, pattern="unstructured", steps=3, init="magnitude", progress=False)
    assert [m.training for m in model.modules()] == before


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_distill_teacher_in_another_dtype_gets_inputs_in_its_dtype(dtype):
    """A teacher kept in bf16 (or float64) while the student trains in float32 failed on its first call
    with torch's 'mat1 and mat2 must have the same dtype'."""
    model = _mlp()
    teacher = copy.deepcopy(model).to(dtype)
    distill(model, _batches(3), sparsity=0.5, pattern="unstructured", steps=3, init="magnitude",
            teacher=teacher, progress=False)
    assert model._sparseprune_distill["steps"] == 3
    assert all(p.dtype == dtype for p in teacher.parameters())
    assert all(p.dtype == torch.float32 for p in model.parameters())


# -- prune_channels --------------------------------------------------------------------------------------
def _by_position_net(fn, cin_b):
    import torch.nn.functional as F

    def cbr(i, o):
        return nn.Sequential(nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.h = cbr(3, 8), cbr(cin_b, 4), nn.Linear(4, 3)

        def forward(self, x):
            return self.h(F.relu(self.b(fn(F.relu(self.a(x))))).mean((2, 3)))
    return Net


@pytest.mark.parametrize("case", ["roll", "slice", "select", "narrow", "gather"])
def test_prune_channels_ops_addressing_channels_by_position_never_give_a_wrong_model(case):
    """``torch.roll`` over the channel dim, or a slice / select not starting at 0, addresses channels by
    position: after pruning the same positions are other channels, and the pruned model ran with silently
    wrong outputs (``y[:, 2:6]`` of the 4 kept channels [0, 3, 5, 7] is 5, 7 instead of 3, 5)."""
    import warnings

    from test_prune_channels import _randomize_norms, _silence
    fn, cin = {"roll": (lambda y: torch.roll(y, -3, 1), 8), "slice": (lambda y: y[:, 2:6], 4),
               "select": (lambda y: torch.stack([y[:, 0], y[:, 3]], 1), 2),
               "narrow": (lambda y: y.narrow(1, 1, 5), 5),
               "gather": (lambda y: y.gather(1, torch.full((2, 2, 4, 4), 5)), 2)}[case]
    for seed in range(5):
        x = torch.randn(2, 3, 4, 4)
        model = _randomize_norms(_by_position_net(fn, cin)().eval(), seed)
        ref = copy.deepcopy(model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sp.prune_channels(model, x, ratio=0.5, importance="random", seed=seed)
        assert model.b[0].weight.shape[0] == 2  # the consumer's own outputs still go
        silenced = _silence(copy.deepcopy(ref), model, ["a.1", "b.1"])
        with torch.no_grad():
            torch.testing.assert_close(model(x), silenced(x), rtol=1e-5, atol=1e-6)


def test_prune_channels_positional_ops_along_other_dims_still_prune():
    """A slice over tokens / spatial positions (the CLS token, a shifted window) says nothing about channels."""
    import torch.nn.functional as F

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.h = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 1), nn.Linear(8, 3)

        def forward(self, x):
            y = torch.roll(F.relu(self.a(x)), (1, 1), (2, 3))[:, :, 1:, :3]
            return self.h(F.relu(self.b(y))[:, :, 0].mean(-1))
    model = Net().eval()
    x = torch.randn(2, 3, 5, 5)
    sp.prune_channels(model, x, ratio=0.5)
    assert model.a.out_channels == 4 and model.b.out_channels == 4


# -- command line ----------------------------------------------------------------------------------------
def test_cli_bench_arch_that_fails_to_build_is_a_clear_error(tmp_path, capsys):
    """``--arch torch.nn:Linear`` (a callable that needs arguments) ended in a raw traceback."""
    from sparseprune.cli import main
    rc = main(["bench", str(tmp_path / "missing.sp"), "--arch", "torch.nn:Linear", "--input-shape", "2,3"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "--arch torch.nn:Linear" in err and "without arguments" in err and "Traceback" not in err
