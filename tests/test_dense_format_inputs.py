"""format='dense' layers take the same input dtypes as the packed formats, and weight_dtype=torch.int8 with
format='auto' packs BSR for any weight (int8 has no dense kernel), as README's example calls it."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparseprune as sp


def _layers(wdt):
    torch.manual_seed(0)
    lin, conv = nn.Linear(20, 12), nn.Conv2d(5, 8, 3, padding=1)
    return [(sp.SparseLinear.from_dense(lin, format="dense", weight_dtype=wdt), torch.randn(3, 20)),
            (sp.SparseConv2d.from_dense(conv, format="dense", weight_dtype=wdt), torch.randn(2, 5, 6, 7))]


@pytest.mark.parametrize("bad", [torch.float64, torch.float16])
def test_dense_float32_refuses_other_dtypes(bad):
    for layer, x in _layers(torch.float32):
        with pytest.raises(TypeError, match="computes in float32"):
            layer(x.to(bad))


@pytest.mark.parametrize("bad", [torch.float64, torch.float16])
def test_dense_bf16_refuses_other_dtypes(bad):
    for layer, x in _layers(torch.bfloat16):
        with pytest.raises(TypeError, match="float32 or bfloat16"):
            layer(x.to(bad))
        for ok in (torch.float32, torch.bfloat16):  # still served, in the input's dtype
            assert layer(x.to(ok)).dtype == ok


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("sparsity", [0.0, 0.3])
def test_int8_auto_format_packs_bsr(kind, sparsity):
    torch.manual_seed(1)
    dense = nn.Linear(64, 48) if kind == "linear" else nn.Conv2d(8, 16, 3, padding=1)
    with torch.no_grad():
        dense.weight.mul_((torch.rand_like(dense.weight) >= sparsity).float())
    cls = sp.SparseLinear if kind == "linear" else sp.SparseConv2d
    q = cls.from_dense(dense, weight_dtype=torch.int8)
    assert q.format == "bsr" and q.weight_dtype == "int8" and q.block_size[1] % 4 == 0
    x = torch.randn(5, 64) if kind == "linear" else torch.randn(2, 8, 9, 10)
    with torch.no_grad():
        ref = dense(x)
        y = q(x)
    assert float((y - ref).norm() / ref.norm()) < 0.03  # int8 quantization error, not a wrong layer
    with pytest.raises(ValueError, match="block-sparse kernel"):  # asked for dense explicitly: still refused
        cls.from_dense(dense, format="dense", weight_dtype=torch.int8)
