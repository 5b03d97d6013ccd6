"""convert() keeps the user's hooks on the layers it replaces (they see what they saw on the source
model), drops sparseprune's own mask hooks, and leaves hooked modules out of the fusions that would step
over a hook or change what it sees."""
import importlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparseprune as sp
from sparseprune.convert.registry import user_hooks
from sparseprune.prune import masks
from helpers import block_sparse_weight

fuse_mod = importlib.import_module("sparseprune.convert.fuse")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(64, 128), nn.Linear(128, 32)

    def forward(self, x):
        return self.b(F.relu(self.a(x)))


def _net(masked=True):
    torch.manual_seed(0)
    net = Net()
    if masked:
        sp.prune_blocks(net, 0.8, block_size=(8, 8), dense_first_last=False)
    else:
        with torch.no_grad():
            net.a.weight.copy_(block_sparse_weight(128, 64, (8, 8), 0.8))
            net.b.weight.copy_(block_sparse_weight(32, 128, (8, 8), 0.8))
    return net.eval()


@pytest.mark.parametrize("masked", [True, False])
@pytest.mark.parametrize("measured", [True, False])
def test_hooks_on_replaced_layers_keep_running(sparse_layers_win, masked, measured):
    net = _net(masked)
    seen, pre_seen = [], []
    net.a.register_forward_hook(lambda mod, args, out: seen.append(out.detach().clone()))
    net.b.register_forward_hook(lambda mod, args, out: out * 2)  # changes the model's output
    net.b.register_forward_pre_hook(lambda mod, args, kwargs: pre_seen.append(args[0].shape), with_kwargs=True)
    net.a.register_forward_hook(lambda mod, args, out: None, always_call=True)
    x = torch.randn(16, 64)
    with torch.no_grad():
        want = net(x)
    fast = sp.convert(net, x if measured else None, time_budget=2.0, end_to_end=False, fuse=False)
    assert type(fast.a).__name__ == "SparseLinear" and type(fast.b).__name__ == "SparseLinear"
    assert not any(masks._forward_pre_hook is h for h in fast.a._forward_pre_hooks.values())  # the mask is baked in
    seen.clear(), pre_seen.clear()
    with torch.no_grad():
        got = fast(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert len(seen) == 1 and len(pre_seen) == 1
    w = net.a.weight.detach() * (net.a.weight_mask if masked else 1)
    torch.testing.assert_close(seen[0], F.linear(x, w, net.a.bias), rtol=1e-4, atol=1e-5)  # the layer's own output
    assert any(fast.a._forward_hooks_always_called.values()) and any(fast.b._forward_pre_hooks_with_kwargs.values())


def test_a_hooked_layer_or_activation_is_not_fused(sparse_layers_win):
    """Fused, a hook on the layer would see the activation's output: a hooked pair stays apart."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32), nn.GELU(), nn.Linear(32, 8))
    with torch.no_grad():
        net[0].weight.copy_(block_sparse_weight(128, 64, (8, 8), 0.8))
        net[2].weight.copy_(block_sparse_weight(32, 128, (8, 8), 0.8))
    seen = []
    net[0].register_forward_hook(lambda mod, args, out: seen.append(out.detach().clone()))
    x = torch.randn(16, 64)
    fast = sp.convert(net.eval(), x, time_budget=2.0, end_to_end=False)
    fused = sp.summary(fast, print_fn=None).totals["fused"]
    assert [f["layer"] for f in fused] == ["2"]  # the unhooked pair only
    seen.clear()
    with torch.no_grad():
        fast(x)
    assert len(seen) == 1 and bool((seen[0] < 0).any())  # before the ReLU, as on the source


def test_hooked_conv_or_batchnorm_is_not_folded():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8)).eval()
    for bn in (net[1], net[4]):
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2)
    seen = []
    net[0].register_forward_hook(lambda mod, args, out: seen.append(out.detach().clone()))
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        raw = net[0](x)
    seen.clear()
    fast = sp.convert(net, x, time_budget=1.0)
    folded = [f["bn"] for f in sp.summary(fast, print_fn=None).totals["folded"]]
    assert folded == ["4"]
    seen.clear()
    with torch.no_grad():
        torch.testing.assert_close(fast(x), net(x), rtol=1e-4, atol=1e-5)
    assert len(seen) == 2 and torch.allclose(seen[0], raw, atol=1e-5)  # the conv's own output, not the BatchNorm's


def test_user_hooks_ignores_sparseprunes_mask_hooks():
    net = _net(masked=True)
    assert not user_hooks(net.a)
    h = net.a.register_forward_hook(lambda *a: None)
    assert user_hooks(net.a)
    h.remove()
    net.a.register_full_backward_hook(lambda *a: None)
    assert user_hooks(net.a)


@pytest.mark.parametrize("norm", ["weight_norm", "spectral_norm"])
def test_hook_based_weight_norms_are_baked_in(norm):
    """torch.nn.utils.weight_norm / spectral_norm compute the weight in a pre-hook: the replacement holds the
    weight they computed (the hook is not carried to a module without weight_g / weight_orig)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8))
    getattr(torch.nn.utils, norm)(net[0])
    net.eval()
    x = torch.randn(4, 32)
    with torch.no_grad():
        want = net(x)
    fast = sp.convert(net, x, time_budget=0.5)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), want, rtol=1e-4, atol=1e-5)
    assert not user_hooks(fast[0])


def test_measure_times_layers_without_the_users_hooks(sparse_layers_win):
    """Per-layer timings call the layers' forward (the dense twin has no hooks to charge against the sparse
    layer); the densified copy of the end-to-end comparison carries the same hooks as the model."""
    net = _net(masked=False)
    x = torch.randn(16, 64)
    fast = sp.convert(net, x, time_budget=1.0, end_to_end=False, fuse=False)
    calls = []
    fast.b.register_forward_hook(lambda mod, args, out: calls.append(1))
    sp.measure(fast, x, time_budget=0.5, end_to_end=False)
    assert len(calls) == 1  # the one capturing call of the model, not the layer timings
    dense = sp.densify(fast)
    calls.clear()
    with torch.no_grad():
        dense(x)
    assert len(calls) == 1
