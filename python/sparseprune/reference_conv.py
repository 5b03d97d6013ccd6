"""Pure-torch references for the sparse Conv2d ops: slow, obviously correct, independent of the kernels."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .reference import bsr_to_dense


def conv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: Sequence[int], padding: Sequence[int],
           dilation: Sequence[int], groups: int) -> Tensor:
    """Dense conv2d in float64; ``padding`` is (top, bottom, left, right)."""
    pt, pb, pl, pr = padding
    xp = F.pad(x.double(), (pl, pr, pt, pb))
    return F.conv2d(xp, weight.double(), None if bias is None else bias.double(), tuple(stride), 0,
                    tuple(dilation), groups).float()


def packed_weight(row_ptr: Tensor, col_idx: Tensor, values: Tensor, out_channels: int, in_channels: int,
                  kernel_size: Sequence[int], groups: int, r: int) -> Tensor:
    """Rebuild the (Cout, Cin/groups, kh, kw) weight element by element from the packed (r x 1) BSR."""
    kh, kw = kernel_size
    cols = (in_channels // groups) * kh * kw
    w = bsr_to_dense(row_ptr, col_idx, values, out_channels, cols, r, 1)
    return w.reshape(out_channels, in_channels // groups, kh, kw)


def sparse_conv2d(x, row_ptr, col_idx, values, bias, in_channels, out_channels, kernel_size, stride, padding,
                  dilation, groups, r) -> Tensor:
    w = packed_weight(row_ptr, col_idx, values, out_channels, in_channels, kernel_size, groups, r)
    return conv2d(x, w, bias, stride, padding, dilation, groups)
