"""Pure-torch references for every op: slow, obviously correct, independent of the kernels.

Tests compare the kernels against these (and against ``F.linear`` on the original dense weight).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def bsr_to_dense(row_ptr: Tensor, col_idx: Tensor, values: Tensor, rows: int, cols: int, r: int, c: int) -> Tensor:
    """Rebuild W element by element from the packed arrays (a loop, not the formats module)."""
    mb, kb = math.ceil(rows / r), math.ceil(cols / c)
    w = torch.zeros(mb * r, kb * c, dtype=torch.float64)
    v = values.reshape(-1, c, r).double()
    rp = row_ptr.tolist()
    ci = [int(i) & 0xFFFF if col_idx.dtype == torch.int16 else int(i) for i in col_idx.tolist()]
    for br in range(mb):
        for b in range(rp[br], rp[br + 1]):
            kc = ci[b]
            w[br * r:(br + 1) * r, kc * c:(kc + 1) * c] = v[b].T
    return w[:rows, :cols]


def spmm(x: Tensor, row_ptr, col_idx, values, bias: Optional[Tensor], rows, cols, r, c) -> Tensor:
    w = bsr_to_dense(row_ptr, col_idx, values, rows, cols, r, c)
    y = x.double() @ w.T
    if bias is not None:
        y = y + bias.double()
    return y.float()


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """The dense baseline, in float64 for a tighter reference."""
    return F.linear(x.double(), weight.double(), None if bias is None else bias.double()).float()
