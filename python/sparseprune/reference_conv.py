"""Pure-torch references for the sparse Conv2d ops: slow, obviously correct, independent of the kernels."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .reference import bsr_to_dense


def conv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: Sequence[int], padding: Sequence[int],
           dilation: Sequence[int], groups: int) -> Tensor:
    """Dense conv2d in float64 as unfold + matmul (no oneDNN: PyTorch's own conv crashes on some odd
    channels_last geometries); ``padding`` is (top, bottom, left, right). Output is contiguous."""
    pt, pb, pl, pr = padding
    xp = F.pad(x.double(), (pl, pr, pt, pb))
    n, c, h, w = xp.shape
    cout, cin_g, kh, kw = weight.shape
    ho = (h - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (w - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    cols = F.unfold(xp, (kh, kw), dilation=tuple(dilation), stride=tuple(stride))  # (n, c*kh*kw, ho*wo)
    cols = cols.reshape(n, groups, cin_g * kh * kw, ho * wo)
    wg = weight.double().reshape(groups, cout // groups, cin_g * kh * kw)
    out = torch.einsum("gok,ngkl->ngol", wg, cols).reshape(n, cout, ho, wo)
    if bias is not None:
        out = out + bias.double().reshape(1, -1, 1, 1)
    return out.float()


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
