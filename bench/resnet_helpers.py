"""Helpers for the end-to-end ResNet-50 benchmark: block pruning by L2 norm and module swapping.

(``sp.prune_blocks`` / ``sp.convert`` are being written separately; these small stand-ins keep the
benchmark self-contained.)
"""
import math

import torch
from torch import nn

import sparseprune as sp
from sparseprune.nn import SparseConv2d


def conv_block_mask(weight: torch.Tensor, sparsity: float, block=(16, 16)) -> torch.Tensor:
    """Keep the top (1 - sparsity) r x c x kh x kw blocks of a conv weight by L2 norm (per layer)."""
    cout, cin_g = weight.shape[:2]
    r, c = block
    mb, kb = math.ceil(cout / r), math.ceil(cin_g / c)
    sq = weight.detach().float().pow(2).sum(dim=(2, 3))
    padded = sq.new_zeros(mb * r, kb * c)
    padded[:cout, :cin_g] = sq
    norms = padded.reshape(mb, r, kb, c).sum(dim=(1, 3)).flatten()
    keep = torch.zeros_like(norms, dtype=torch.bool)
    keep[norms.topk(max(1, round(norms.numel() * (1 - sparsity)))).indices] = True
    mask = keep.reshape(mb, kb).repeat_interleave(r, 0).repeat_interleave(c, 1)[:cout, :cin_g]
    return mask[:, :, None, None].to(weight.dtype)


def prune_convs(model: nn.Module, sparsity: float, block=(16, 16), skip=("embedder",)) -> int:
    """Zero all but the strongest blocks of every Conv2d except those whose name contains a skip word."""
    n = 0
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, nn.Conv2d) and not any(s in name for s in skip):
                mod.weight.mul_(conv_block_mask(mod.weight, sparsity, block))
                n += 1
    return n


def sparsify_convs(model: nn.Module, format="bsr", block=(16, 16), skip=("embedder",), num_threads=None) -> int:
    """Replace (in place) every Conv2d except the skipped ones by a SparseConv2d."""
    todo = [(name, mod) for name, mod in model.named_modules()
            if isinstance(mod, nn.Conv2d) and not any(s in name for s in skip)]
    for name, mod in todo:
        parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        setattr(parent, name.rsplit(".", 1)[-1],
                SparseConv2d.from_dense(mod, format=format, block_size=block, num_threads=num_threads))
    return len(todo)
