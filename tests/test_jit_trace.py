"""torch.jit.trace of sparse modules and converted models records the registered ops (a raw kernel call is
invisible to the tracer: the trace replayed only the output's allocation, uninitialised memory)."""
import warnings

import pytest
import torch
from torch import nn

import sparseprune as sp
from helpers import block_sparse_weight


def _lin(wdt, act="none"):
    lin = nn.Linear(32, 48)
    with torch.no_grad():
        lin.weight.copy_(block_sparse_weight(48, 32, (16, 16), 0.5))
    return sp.SparseLinear.from_dense(lin, format="bsr", block_size=(16, 16), weight_dtype=wdt, activation=act)


MODULES = {
    "linear_fp32": lambda: _lin(torch.float32),
    "linear_fp32_gelu": lambda: _lin(torch.float32, "gelu"),
    "linear_int8": lambda: _lin(torch.int8),
    "linear_bf16": lambda: _lin(torch.bfloat16),
    "conv_fp32": lambda: sp.SparseConv2d.from_dense(nn.Conv2d(4, 16, 3, padding=1), format="csr"),
    "conv_int8": lambda: sp.SparseConv2d.from_dense(nn.Conv2d(4, 16, 3, padding=1), format="bsr", block_size=(16, 4),
                                                    weight_dtype=torch.int8),
    "maxpool": lambda: sp.nn.MaxPool2d(3, 2, 1),
}


@pytest.mark.parametrize("kind", list(MODULES))
def test_traced_module_recomputes(kind):
    torch.manual_seed(0)
    m = MODULES[kind]().eval()
    shape = (5, 32) if kind.startswith("linear") else (2, 4, 9, 9)
    x, other = torch.randn(shape), torch.randn(shape)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(m, (x,), check_trace=False)
        torch.testing.assert_close(traced(other), m(other))  # another input: the graph computes, not replays
        kinds = {n.kind() for n in traced.inlined_graph.nodes()}
    assert any(k.startswith("sparseprune::") for k in kinds) or kind == "maxpool"


def test_traced_converted_model(sparse_layers_win):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16)).eval()
    sp.prune_blocks(net, 0.75, block_size=(16, 16), dense_first_last=False)
    x = torch.randn(8, 32)
    fast = sp.convert(net, x, time_budget=0.5, end_to_end=False)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(fast, (x,), check_trace=False)
        y = torch.randn(8, 32)
        torch.testing.assert_close(traced(y), net(y), rtol=1e-4, atol=1e-5)
