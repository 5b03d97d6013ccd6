"""A layer named exactly in a sparsity dict or ``overrides=`` is pruned even where ``dense_first_last`` (the
default when ``layers`` is not given) would keep it dense: naming it is asking for it. Globs and rules still
leave the first conv and the last layer dense."""
import pytest
import torch
from torch import nn

import sparseprune as sp


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 16))


def _zeros(layer):
    return float((layer.weight == 0).float().mean())


def test_a_sparsity_dict_naming_the_last_layer_prunes_it():
    m = _mlp()
    sp.prune_unstructured(m, {"2": 0.5, "4": 0.75})
    assert _zeros(m[0]) == 0.0 and _zeros(m[2]) == pytest.approx(0.5, abs=1e-3)
    assert _zeros(m[4]) == pytest.approx(0.75, abs=1e-3)


def test_overrides_naming_the_last_layer_prune_it_and_none_keeps_it_dense():
    m = _mlp()
    sp.prune_unstructured(m, 0.5, overrides={"4": 0.9})
    assert _zeros(m[4]) == pytest.approx(0.9, abs=1e-3) and _zeros(m[2]) == pytest.approx(0.5, abs=1e-3)
    m = _mlp()
    sp.prune_unstructured(m, 0.5, overrides={"4": None})
    assert _zeros(m[4]) == 0.0


def test_globs_and_rules_still_keep_the_last_layer_dense():
    m = _mlp()
    sp.prune_unstructured(m, {"*": 0.5})
    assert _zeros(m[4]) == 0.0 and _zeros(m[2]) == pytest.approx(0.5, abs=1e-3)
    m = _mlp()
    sp.prune_unstructured(m, 0.5)
    assert _zeros(m[4]) == 0.0
