"""Masked (pattern-pruned, not yet converted) models called with tensors the caller lends for one call
(``torch.func.functional_call``, ensembles of ``stack_module_state``): the lent tensors are never written,
the call computes with them masked, and the module's own weight comes back afterwards."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

import sparseprune as sp
from sparseprune.prune import masks


def _masked(seed=0):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 5))
    sp.prune_unstructured(m, 0.5, dense_first_last=False)
    return m


def _reference(m, params, x):
    """Dense PyTorch on the lent weights times the masks (an independent computation)."""
    w0 = params["0.weight"] * m[0].weight_mask
    w2 = params["2.weight"] * m[2].weight_mask
    return F.linear(F.relu(F.linear(x, w0, params["0.bias"])), w2, params["2.bias"])


@pytest.mark.parametrize("kind", ["plain", "leaf_grad", "parameter_of_other_masked_model"])
def test_functional_call_never_writes_lent_tensors(kind):
    m = _masked()
    own = {k: v for k, v in m.named_parameters()}
    own_before = {k: v.detach().clone() for k, v in own.items()}
    if kind == "parameter_of_other_masked_model":
        other = _masked(seed=1)
        params = dict(other.named_parameters())
        with torch.no_grad():  # revive some pruned weights of the other model by hand
            other[0].weight.add_(1.0)
    else:
        g = torch.Generator().manual_seed(3)
        params = {k: torch.randn(v.shape, generator=g) for k, v in own.items()}
        if kind == "leaf_grad":
            params = {k: v.requires_grad_() for k, v in params.items()}
    before = {k: v.detach().clone() for k, v in params.items()}
    x = torch.randn(7, 12)
    y = functional_call(m, params, (x,))
    for k in params:
        assert torch.equal(params[k].detach(), before[k]), k  # never written
    torch.testing.assert_close(y, _reference(m, before, x))
    for name, p in own.items():  # the module's own Parameters are back in their slots, unchanged
        assert dict(m.named_parameters())[name] is p
        assert torch.equal(p.detach(), own_before[name])
    if kind == "leaf_grad":
        y.sum().backward()
        g0 = params["0.weight"].grad
        assert g0 is not None and bool((g0[~m[0].weight_mask] == 0).all()) and bool(g0[m[0].weight_mask].abs().sum() > 0)


def test_lent_weight_is_put_back_after_an_exception():
    m = _masked()
    own = m[0].weight
    params = {k: torch.randn_like(v) for k, v in m.named_parameters()}
    with pytest.raises(RuntimeError):
        functional_call(m, params, (torch.randn(3, 11),))  # wrong input size: the forward raises
    assert m[0].weight is own and "_sparseprune_lent" not in m[0].__dict__
    with pytest.raises(ValueError, match="masked with shape"):
        functional_call(m, {"0.weight": torch.randn(16, 13)}, (torch.randn(3, 13),))
    assert m[0].weight is own


def test_vmapped_ensemble_of_a_masked_model():
    members = [_masked(seed=s) for s in range(3)]
    for mm in members[1:]:  # one mask for all (an ensemble of one pruned architecture)
        for i in (0, 2):
            masks.apply_mask(mm[i], members[0][i].weight_mask)
    params, bufs = stack_module_state(members)
    x = torch.randn(4, 12)
    # the masks are buffers: each member's own (the same here) is passed along
    ys = vmap(lambda p, b: functional_call(members[0], (p, b), (x,)))(params, bufs)
    for i, mm in enumerate(members):
        want = _reference(members[0], {k: v[i] for k, v in params.items()}, x)
        torch.testing.assert_close(ys[i], want)
        torch.testing.assert_close(ys[i], mm(x))


def test_own_weight_is_still_masked_in_place_and_remove_masks_drops_the_restore_hook():
    m = _masked()
    functional_call(m, {k: torch.randn_like(v) for k, v in m.named_parameters()}, (torch.randn(2, 12),))
    assert any(h is masks._restore_lent for h in m[0]._forward_hooks.values())
    with torch.no_grad():
        m[0].weight.fill_(1.0)  # revive every pruned weight of the own Parameter
    m(torch.randn(2, 12))
    assert torch.equal(m[0].weight == 0, ~m[0].weight_mask)  # the forward pre-hook zeroed them again
    dup = copy.deepcopy(m)  # a copy's new Parameters are its own (masked in place), not lent
    with torch.no_grad():
        dup[0].weight.fill_(2.0)
    dup(torch.randn(2, 12))
    assert torch.equal(dup[0].weight == 0, ~dup[0].weight_mask)
    sp.remove_masks(m)
    assert not m[0]._forward_hooks and not m[0]._forward_hooks_always_called


def test_layer_resized_after_pruning_gets_a_clear_error():
    """A pruned layer whose weight changes shape afterwards (resize_token_embeddings on a pruned lm_head tied to
    its embedding): the mask no longer fits; the forward says so and names the way out (it failed with torch's
    broadcasting error inside the mask hook)."""
    import sparseprune as sp
    lin = torch.nn.Linear(32, 64)
    sp.prune_blocks(torch.nn.Sequential(lin), sparsity=0.5, block_size=(16, 16), dense_first_last=False)
    lin.weight = torch.nn.Parameter(torch.randn(80, 32))
    lin.bias = torch.nn.Parameter(torch.zeros(80))
    with pytest.raises(ValueError, match=r"now \(80, 32\) but it was pruned with a mask of shape \(64, 32\)"):
        lin(torch.randn(2, 32))
    sp.remove_masks(lin)
    assert lin(torch.randn(2, 32)).shape == (2, 80)
