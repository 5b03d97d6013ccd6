"""Shared test helpers: masked random weights with a known sparsity pattern."""
import math

import torch


def block_sparse_weight(m, k, block, sparsity, generator=None):
    """Random m x k weight whose zeros come in whole r x c blocks (edge blocks clipped)."""
    r, c = block
    mb, kb = math.ceil(m / r), math.ceil(k / c)
    keep = torch.rand(mb, kb, generator=generator) >= sparsity
    if sparsity >= 1.0:
        keep[:] = False
    mask = keep.repeat_interleave(r, 0).repeat_interleave(c, 1)[:m, :k]
    w = torch.randn(m, k, generator=generator)
    w[w == 0] = 1.0  # a kept element is never an accidental zero
    return w * mask


def assert_close(actual, expected, rtol=1e-4, atol=1e-4):
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


def distill_mlp(dropout=0.0):
    """The tiny MLP the distill tests prune (seeded: the same weights every call)."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Dropout(dropout),
                               torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))


def distill_batches(k=6, rows=8, d=16, seed=1):
    """k random (rows, d) input batches from their own generator."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(rows, d, generator=g) for _ in range(k)]
